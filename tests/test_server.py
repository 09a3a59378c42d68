"""The OpenAI-compatible server (`csm serve`): real uvicorn servers on 127.0.0.1 in threads, the
official `openai` client and raw httpx against them, on the tiny model with random watermark
weights. Formats agree byte for byte, every bad request gets OpenAI's error shape before any
audio, concurrent streams equal their solo runs, a full queue answers 429 and a client that
disconnects frees its slot."""

import base64
import io
import json
import socket
import threading
import time

import httpx
import numpy as np
import openai
import pytest
import soundfile as sf
import uvicorn

import csm
from csm.server import ServerSettings, create_app
from csm.voices import VoiceStore

pytestmark = pytest.mark.usefixtures("torch_single_thread")

KEY = "test-key"
TEXT = "Hello there, how are you?"
SHORT_MS = 320  # 4 frames: one watermarked chunk per clip keeps the tests quick
GREEDY = {"top_k": 1, "seed": 5}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running:
    def __init__(self, engine, settings):
        self.engine = engine
        self.url = f"http://127.0.0.1:{free_port()}"
        config = uvicorn.Config(create_app(engine, settings), host="127.0.0.1", port=int(self.url.rsplit(":", 1)[1]),
                                log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)
        self.engine.close()

    def client(self, key=KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=120)

    def post(self, body, key=KEY, **kwargs) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        content = body if isinstance(body, (bytes, str)) else json.dumps(body)
        return httpx.post(f"{self.url}/v1/audio/speech", content=content, headers=headers, timeout=120, **kwargs)

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=10).json()


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A voice store with one profile, Ada (one reference clip), for every test here."""
    path = tmp_path_factory.mktemp("csm-home")
    clip = path / "ada.wav"
    t = np.arange(12_000) / 24_000
    sf.write(clip, (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 24_000)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CSM_HOME", str(path))
        VoiceStore().create("Ada", 3, references=[(clip, "Hi there.")])
        yield path


@pytest.fixture(scope="module")
def gen(tiny_model_dir, watermark_dir):
    return csm.load(tiny_model_dir, device="cpu", dtype="float32", watermark_model=str(watermark_dir))


@pytest.fixture(scope="module")
def server(gen, home):
    settings = ServerSettings(api_key=KEY, voice_map={"alloy": "Ada", "echo": 2}, max_audio_length_ms=SHORT_MS,
                              max_body_bytes=64 * 1024)
    with Running(gen.engine(max_batch_size=8, max_queue=16), settings) as running:
        yield running


def speech(**fields) -> dict:
    return {"model": "tts-1", "input": TEXT, "voice": "echo", "response_format": "pcm", **GREEDY, **fields}


# --- formats ------------------------------------------------------------------------------------

def sse_events(response: httpx.Response) -> list[dict]:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            events.append(json.loads(line[len("data: "):]))
    return events


def test_wav_pcm_flac_and_sse_are_the_same_samples(server):
    client = server.client()
    args = dict(model="tts-1", voice="echo", input=TEXT, extra_body=GREEDY)
    wav = client.audio.speech.create(response_format="wav", **args).content
    audio, rate = sf.read(io.BytesIO(wav), dtype="int16")
    assert rate == 24_000 and audio.ndim == 1 and len(audio) == 4 * 1920
    assert wav.count(b"RIFF") == 1  # the server streams every response: one header, however it was chunked
    with client.audio.speech.with_streaming_response.create(response_format="pcm", **args) as response:
        assert response.headers["content-type"] == "audio/pcm"
        pcm = b"".join(response.iter_bytes())
    assert pcm == wav[44:]
    np.testing.assert_array_equal(np.frombuffer(pcm, "<i2"), audio)

    with httpx.stream("POST", f"{server.url}/v1/audio/speech", json=speech(stream_format="sse"),
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert [e["type"] for e in events[:-1]] == ["speech.audio.delta"] * (len(events) - 1)
    assert b"".join(base64.b64decode(e["audio"]) for e in events[:-1]) == pcm
    assert events[-1]["type"] == "speech.audio.done" and events[-1]["usage"]["output_tokens"] == 4

    flac = server.post(speech(response_format="flac"))  # encoded whole, lossless: the same samples
    assert flac.status_code == 200 and flac.headers["content-type"] == "audio/flac"
    np.testing.assert_array_equal(sf.read(io.BytesIO(flac.content), dtype="int16")[0], audio)


def test_models_voices_health_and_readiness(server):
    client = server.client()
    assert {"csm-1b", "tts-1"} <= {m.id for m in client.models.list()}
    voices = httpx.get(f"{server.url}/v1/audio/voices", headers={"Authorization": f"Bearer {KEY}"}).json()["voices"]
    assert {"alloy", "echo", "Ada"} <= {v["name"] for v in voices}
    assert next(v for v in voices if v["name"] == "alloy")["maps_to"] == "Ada"
    assert server.health()["status"] == "ok"  # liveness and readiness need no key (load balancers)
    ready = httpx.get(f"{server.url}/ready").json()
    assert ready["status"] == "ready" and ready["max_batch_size"] == 8


# --- bad requests -------------------------------------------------------------------------------

BAD = [
    (speech(voice="nobody"), 400, "voice", "no voice 'nobody'"),
    (speech(model="gpt-5"), 404, "model", "is not served here"),
    (speech(input=""), 400, "input", "at least 1 character"),
    (speech(input="   "), 400, "input", "no words"),
    (speech(input="a" * 4097), 400, "input", "4097 characters long"),
    (speech(response_format="aac"), 400, "response_format", "use one of wav, pcm, flac"),
    (speech(response_format="wma"), 400, "response_format", "not supported"),
    (speech(speed=1.5), 400, "speed", "CSM speaks at its own pace"),
    (speech(speed=5), 400, "speed", "less than or equal to 4"),
    (speech(stream_format="sse", response_format="flac"), 400, "response_format", "sse"),
    (speech(stream_format="webrtc"), 400, "stream_format", "'audio' or 'sse'"),
    (speech(instructions="whisper"), 400, "instructions", "does not follow instructions"),
    (speech(temperature=-1), 400, "temperature", "greater than or equal to 0"),
    (speech(max_audio_length_ms=60_000), 400, "max_audio_length_ms", "at most"),
    (speech(voices="echo"), 400, "voices", "unknown field"),
    ({"model": "tts-1", "input": TEXT}, 400, "voice", "'voice' is required"),
    (speech(context=[{"text": "Hi.", "speaker": 1, "audio": "not base64!"}]), 400, "context[0].audio", "base64"),
    (speech(context=[{"text": "Hi.", "speaker": 1, "audio": base64.b64encode(b"RIFF nonsense").decode()}]), 400,
     "context[0].audio", "not an audio file"),
    (speech(context=[{"text": "Hi.", "speaker": 1, "audio": "QUFB" * 30_000}]), 413, None, "over 65536 bytes"),
    (b"{not json", 400, None, "not valid JSON"),
    (b"[1, 2]", 400, None, "JSON object"),
]


@pytest.mark.parametrize("body, status, param, message", BAD, ids=[f"{i}-{b[1]}" for i, b in enumerate(BAD)])
def test_bad_requests_get_openais_error_shape(server, body, status, param, message):
    response = server.post(body)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and message in error["message"], error


@pytest.mark.parametrize("key", ["wrong", None])
def test_a_key_is_required(server, key):
    response = server.post(speech(), key=key)
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        server.client(key or "none").models.list()


def test_the_openai_client_raises_its_own_classes(server):
    client = server.client()
    with pytest.raises(openai.NotFoundError):
        client.audio.speech.create(model="nope", voice="echo", input=TEXT)
    with pytest.raises(openai.BadRequestError, match="no voice"):
        client.audio.speech.create(model="tts-1", voice="nobody", input=TEXT)
    unknown_route = httpx.get(f"{server.url}/v1/nothing", headers={"Authorization": f"Bearer {KEY}"})
    assert unknown_route.status_code == 404 and "error" in unknown_route.json()


# --- many at once -------------------------------------------------------------------------------

def stream_pcm(url, body) -> bytes:
    with httpx.stream("POST", f"{url}/v1/audio/speech", json=body, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=120) as response:
        assert response.status_code == 200, response.read()
        return b"".join(response.iter_bytes())


def test_eight_concurrent_streams_each_equal_their_solo_run(server):
    # two distinct requests (a mapped voice profile with its clip, a mapped speaker id), four times each
    distinct = [speech(voice="alloy"), speech(voice="echo", input="Short.")]
    bodies = distinct * 4
    results: dict[int, bytes] = {}

    def run(i):
        results[i] = stream_pcm(server.url, bodies[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert len(results) == 8
    solo = [stream_pcm(server.url, body) for body in distinct]
    assert solo[0] != solo[1] and all(solo)  # the requests really differ
    for i, body in enumerate(bodies):
        assert results[i] == solo[i % 2], f"stream {i} ({body['voice']}) differs from its solo run"
    assert server.engine.active == 0 and server.engine.waiting == 0


class GatedEngine(csm.Engine):
    """An engine whose loop takes a step only with a permit (or while `open` is set), so a test
    decides when slots fill and free."""

    def __init__(self, *args, **kwargs):
        self.permits = threading.Semaphore(0)
        self.open = threading.Event()
        super().__init__(*args, **kwargs)

    def step(self, max_frames=None):
        while not self.open.is_set() and not self.permits.acquire(timeout=0.05):
            pass
        return super().step(max_frames)

    def close(self):
        self.open.set()
        super().close()


@pytest.fixture(scope="module")
def small(gen, home):
    """One slot and one place in the queue, on a gated engine; turns of up to 16 characters and 12.8 s."""
    settings = ServerSettings(api_key=KEY, max_audio_length_ms=12_800, voice_map={"nova": "Gone"}, turn_chars=16)
    with Running(GatedEngine(gen, max_batch_size=1, max_queue=1), settings) as running:
        yield running


def wait_for(condition, what: str, seconds: float = 60):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_full_queue_answers_429_and_a_disconnect_frees_the_slot(small):
    engine = small.engine
    with httpx.stream("POST", f"{small.url}/v1/audio/speech", json=speech(max_audio_length_ms=12_800),
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as long_one:
        assert long_one.status_code == 200  # validated and queued: the 200 goes out before any audio
        engine.permits.release()  # one step: the long request takes the only slot (160 frames to go)
        wait_for(lambda: engine.active == 1, "the long request to start")
        queued: dict = {}
        short = speech(max_audio_length_ms=SHORT_MS)
        waiter = threading.Thread(target=lambda: queued.update(pcm=stream_pcm(small.url, short)))
        waiter.start()
        wait_for(lambda: engine.waiting == 1, "the second request to queue")
        full = small.post(speech())
        assert full.status_code == 429 and full.headers["retry-after"] == "1"
        assert full.json()["error"]["code"] == "rate_limit_exceeded"
        with pytest.raises(openai.RateLimitError):
            small.client().audio.speech.create(model="tts-1", voice="echo", input=TEXT)
    # the long request's client has gone: the server cancels it before the loop takes another step
    wait_for(lambda: small.health()["finished"].get("cancelled") == 1, "the disconnect to cancel the request")
    engine.open.set()
    waiter.join(120)
    assert len(queued["pcm"]) == 2 * 4 * 1920 * 2  # two turns of 4 frames
    assert engine.frames < 20  # the loop never ran the long request's 160 frames: its slot went at once
    assert engine.active == 0 and engine.waiting == 0


def test_long_input_is_spoken_in_turns_as_one_stream(small):
    small.engine.open.set()
    body = speech(input="Hello there. How are you?", stream_format="sse", max_audio_length_ms=SHORT_MS)
    with httpx.stream("POST", f"{small.url}/v1/audio/speech", json=body, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=120) as response:
        events = sse_events(response)
    audio = b"".join(base64.b64decode(e["audio"]) for e in events[:-1])
    assert events[-1]["usage"]["output_tokens"] == 8 and len(audio) == 8 * 1920 * 2  # two turns, one stream


def test_a_voice_mapped_to_a_missing_profile_says_so(small):
    response = small.post(speech(voice="nova"))
    assert response.status_code == 400
    assert "voice 'nova' maps to 'Gone', which is not in the voice store" in response.json()["error"]["message"]


# --- the web page -------------------------------------------------------------------------------

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture
def browser(tmp_path):
    """Debian's headless Chromium driven by selenium (both installed by .ci/run)."""
    import os

    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip("chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (the dev extra)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--autoplay-policy=no-user-gesture-required", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-quic", "--window-size=1000,900",
                 f"--user-data-dir={tmp_path / 'chromium'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def test_the_page_speaks_streams_and_keeps_the_conversation(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server.url + "/")
    key = browser.find_element(By.ID, "key")
    browser.execute_script("arguments[0].value = arguments[1]; arguments[0].dispatchEvent(new Event('change'))",
                           key, KEY)
    WebDriverWait(browser, 30).until(lambda b: "Ada" in b.find_element(By.ID, "voice").text)
    for i, line in enumerate(["Hello there, how are you?", "Fine, thanks."]):
        browser.find_element(By.ID, "text").send_keys(line)
        browser.find_element(By.ID, "speak").click()
        WebDriverWait(browser, 300).until(
            lambda b, n=i + 1: len(b.find_elements(By.CSS_SELECTOR, ".turn a.download")) == n)
        assert browser.find_element(By.ID, "status").text.startswith("Done"), browser.find_element(By.ID, "status").text
    played = browser.execute_script("return window.csmPage")
    assert played["chunksPlayed"] >= 2 and played["firstAudioMs"] is not None
    # every sample that arrived was played, and each turn's WAV holds that turn's samples
    durations = browser.execute_script(
        "return Promise.all([...document.querySelectorAll('.turn audio')].map(a => a.duration || "
        "new Promise(r => a.addEventListener('loadedmetadata', () => r(a.duration)))))")
    assert len(durations) == 2 and all(0 < d <= SHORT_MS / 1000 + 1e-6 for d in durations)
    assert played["samplesPlayed"] == pytest.approx(sum(durations) * 24_000, abs=2)
    assert [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".turn p")] == [
        "Hello there, how are you?", "Fine, thanks."]
    assert server.health()["finished"].get("end_of_speech", 0) + server.health()["finished"].get("max_length", 0) >= 2
    browser.save_screenshot(str(tmp_path / "page.png"))
    assert (tmp_path / "page.png").read_bytes()[:4] == b"\x89PNG"


# --- the command line ---------------------------------------------------------------------------

def test_csm_serve_is_a_csm_command(capsys):
    from csm.cli.main import main

    main(["serve", "--help"])
    assert "--voice-map" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--voice-map", "robot=Ada"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --voice-map maps OpenAI's voice names") and len(err.strip().splitlines()) == 1
