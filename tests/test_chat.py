"""Conversations (csm.Conversation) and `csm chat` on the tiny model: the context a turn gets,
the test and batch modes' files, every bad input as one line, and a session driven through stdin."""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

import csm
from csm.audio import MODEL_SAMPLE_RATE
from csm.cli.chat import main
from csm.prompt import newest_that_fit

pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.fixture(scope="module")
def gen(tiny_model_dir):
    return csm.load(str(tiny_model_dir), device="cpu", dtype="float32")


def codes(frames, seed):
    return np.random.default_rng(seed).integers(0, 2048, (frames, 32))


# --- the context of the next turn -------------------------------------------------------------

def test_newest_that_fit():
    assert newest_that_fit([3, 9, 2, 2], 6, contiguous=True) == [2, 3]
    assert newest_that_fit([3, 9, 2, 2], 6, contiguous=False) == [2, 3]
    assert newest_that_fit([1, 9, 2, 2], 6, contiguous=False) == [0, 2, 3]  # a voice's clips skip the big one
    assert newest_that_fit([1, 9, 2, 2], 6, contiguous=True) == [2, 3]  # a conversation never leaves a gap
    assert newest_that_fit([2, 2], 4, contiguous=True) == [1]  # the total stays below the room (check_fits)


def test_context_keeps_the_newest_whole_turns(gen):
    conv = csm.Conversation()
    for i in range(8):
        conv.add(i % 2, f"Turn number {i}.", codes=codes(20, i))
    max_ms, max_frames, limit = 400, 5, gen.config.backbone.max_seq_len
    context = conv.context(gen, "And now?", 0, max_audio_length_ms=max_ms)
    kept = len(context)
    assert 0 < kept < 8
    for segment, turn in zip(context, conv.turns[-kept:], strict=True):  # the newest, in order, none cut
        assert (segment.speaker, segment.text) == (turn.speaker, turn.text)
        np.testing.assert_array_equal(segment.codes, turn.codes)
    assert len(gen.prompt("And now?", 0, context)) + max_frames < limit
    one_more = [conv.turns[-kept - 1].segment(), *context]
    assert len(gen.prompt("And now?", 0, one_more)) + max_frames >= limit
    # a turn too big for the room stops the context there, though an older small one would fit
    conv.add(1, "A long one.", codes=codes(limit, 99))
    conv.add(0, "Short.", codes=codes(2, 100))
    assert [s.text for s in conv.context(gen, "And now?", 1, max_audio_length_ms=max_ms)] == ["Short."]
    conv.reset()
    assert conv.context(gen, "And now?", 1) == [] and len(conv) == 0


def test_speak_uses_the_conversation_as_context(gen):
    conv = csm.Conversation()
    heard = np.sin(np.arange(MODEL_SAMPLE_RATE // 2) / 20).astype(np.float32) * 0.3
    conv.add(1, "Hi! How was the trip?", heard)
    options = dict(max_audio_length_ms=400, topk=1, watermark=False)
    first = conv.speak(gen, "It was wonderful, thanks.", 0, **options)
    second = conv.speak(gen, "And yours?", **options)
    assert [t.speaker for t in conv.turns] == [1, 0, 0] and first.generated and not conv.turns[0].generated
    assert len(second.audio) == len(second.codes) * 1920 and second.audio.dtype == np.float32
    by_hand = gen.generate_codes("And yours?", 0, [csm.Segment(1, "Hi! How was the trip?", heard),
                                                   csm.Segment(0, "It was wonderful, thanks.", codes=first.codes)],
                                 max_audio_length_ms=400, topk=1)
    np.testing.assert_array_equal(second.codes, by_hand)
    with pytest.raises(csm.CsmError, match="text is empty"):
        conv.speak(gen, "  ", 0)
    with pytest.raises(csm.CsmError, match="speaker must be a non-negative integer"):
        conv.add(-1, "Hello.")


def test_a_voice_keeps_its_clips_and_the_conversation_fills_the_rest(gen, tmp_path, monkeypatch):
    from csm.voices import VoiceStore

    monkeypatch.setenv("CSM_HOME", str(tmp_path / "csm-home"))
    clip = tmp_path / "ada.wav"
    sf.write(clip, np.sin(np.arange(9600) / 25).astype(np.float32) * 0.3, MODEL_SAMPLE_RATE)
    VoiceStore().create("Ada", 3, references=[(clip, "Hi there.")], topk=1)
    conv = csm.Conversation(voices=["Ada"])
    for i in range(8):  # more than the tiny model's positions hold
        conv.add(i % 2, f"Turn number {i}.", codes=codes(20, i))
    calls = []
    generate_codes = gen.generate_codes
    monkeypatch.setattr(gen, "generate_codes", lambda *args: calls.append(args) or generate_codes(*args))
    turn = conv.speak(gen, "My turn.", max_audio_length_ms=400, watermark=False)  # the only voice's speaker
    text, speaker, context = calls[0][:3]
    assert (turn.speaker, speaker, text) == (3, 3, "My turn.")
    assert context[0].text == "Hi there." and context[0].speaker == 3  # the clip first
    kept = context[1:]
    assert 0 < len(kept) < 8 and [s.text for s in kept] == [t.text for t in conv.turns[8 - len(kept):8]]
    assert len(gen.prompt(text, speaker, context)) + 5 < gen.config.backbone.max_seq_len
    with pytest.raises(csm.CsmError, match="both speak as speaker 3"):
        csm.Conversation(voices=["Ada", 3])


# --- csm chat: files --------------------------------------------------------------------------

@pytest.fixture
def model_args(tiny_model_dir):
    return ["--model", str(tiny_model_dir), "--device", "cpu", "--top-k", "1", "--max-audio-length-ms", "400"]


@pytest.fixture
def loaded(gen, tiny_model_dir, monkeypatch):
    """csm.load gives the module's generator: the test mode's run loads the model for real, the
    others need not load it again (seconds each on a busy machine)."""

    def load(model, **kwargs):
        assert model == str(tiny_model_dir) and kwargs["device"] == "cpu"
        return gen

    monkeypatch.setattr(csm, "load", load)


def chat(args, capsys):
    """(exit code, stderr) of `csm chat ARGS` run in this process."""
    with pytest.raises(SystemExit) as exit_info:
        main([*map(str, args)])
        sys.exit(0)
    return exit_info.value.code, capsys.readouterr().err


def assert_one_error(code, err, *fragments):
    assert code == 2 and "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def test_test_mode_writes_a_wav_per_turn_and_the_transcript(tmp_path, model_args, watermark_dir, capsys):
    out = tmp_path / "out"
    code, err = chat(["--mode", "test", "-d", out, *model_args, "--watermark-model", watermark_dir], capsys)
    assert code == 0, err
    transcript = json.loads((out / "transcript.json").read_text())
    turns = transcript[0]["turns"]
    assert [t["speaker"] for t in turns] == [0, 1, 0, 1]
    assert [t["audio"] for t in turns] == [f"turn-0{i}.wav" for i in range(1, 5)]
    for turn in turns:
        info = sf.info(str(out / turn["audio"]))
        assert info.samplerate == MODEL_SAMPLE_RATE and info.channels == 1 and 0 < info.frames <= 5 * 1920
    assert (out / "transcript.txt").read_text().startswith("[0] Hey, did you")
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary file left behind
    before = (out / "turn-01.wav").read_bytes()
    assert_one_error(*chat(["--mode", "test", "-d", out, *model_args, "--no-watermark"], capsys),
                     "already exist", "--force")
    assert (out / "turn-01.wav").read_bytes() == before


def test_batch_mode(tmp_path, model_args, loaded, capsys):
    sf.write(tmp_path / "hi.wav", np.sin(np.arange(12_000) / 30).astype(np.float32) * 0.3, 16_000)
    conversations = [{"name": "trip", "turns": [{"speaker": 1, "text": "Hi! How was the trip?", "audio": "hi.wav"},
                                                {"speaker": 0, "text": "It was wonderful."},
                                                {"speaker": 1, "text": "Glad to hear it."}]},
                     {"turns": [{"speaker": 0, "text": "Hello."}]}]
    (tmp_path / "convs.json").write_text(json.dumps(conversations))
    out = tmp_path / "out"
    code, err = chat(["--mode", "batch", "--input", tmp_path / "convs.json", "-d", out, *model_args,
                      "--no-watermark"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in (out / "trip").iterdir()) == ["transcript.json", "transcript.txt", "turn-02.wav",
                                                               "turn-03.wav"]
    assert sorted(p.name for p in (out / "conversation-02").iterdir()) == ["transcript.json", "transcript.txt",
                                                                          "turn-01.wav"]
    turns = json.loads((out / "trip" / "transcript.json").read_text())[0]["turns"]
    assert turns[0]["audio"] == str(tmp_path / "hi.wav") and turns[1]["audio"] == "turn-02.wav"


@pytest.mark.parametrize("content, fragments", [
    (None, ["conversations file not found"]),
    ("[{", ["is not valid JSON"]),
    ({"turns": []}, ["non-empty list of conversations"]),
    ([{"turns": [{"speaker": -1, "text": "Hi."}]}], ["conversation 1, turn 1", "speaker must be a non-negative"]),
    ([{"turns": [{"speaker": "Ada", "text": "Hi."}]}], ["speaker must be a non-negative"]),
    ([{"turns": [{"speaker": 0, "text": ""}]}], ["text must be the words"]),
    ([{"turns": [{"speaker": 0, "text": "Hi.", "audio": "gone.wav"}, {"speaker": 1, "text": "Yo."}]}],
     ["audio file not found", "gone.wav"]),
    ([{"turns": [{"speaker": 0, "text": "Hi.", "voice": "Ada"}]}], ["unknown keys ['voice']"]),
    ([{"name": "../up", "turns": [{"speaker": 0, "text": "Hi."}]}], ["plain folder name"]),
    ([{"turns": [{"speaker": 0, "text": "Fine."}]}, {"turns": [{"speaker": 1, "text": "word " * 300}]}],
     ["conversation 'conversation-02', turn 1", "too long", "--max-audio-length-ms"]),
])
def test_batch_bad_input_is_one_line(tmp_path, model_args, loaded, capsys, content, fragments):
    if content is not None:
        (tmp_path / "convs.json").write_text(content if isinstance(content, str) else json.dumps(content))
    out = tmp_path / "out"
    assert_one_error(*chat(["--mode", "batch", "--input", tmp_path / "convs.json", "-d", out, *model_args,
                            "--no-watermark"], capsys), *fragments)
    assert not out.exists() or not any(out.rglob("*.wav"))  # nothing generated before the check


@pytest.mark.parametrize("args, fragments", [
    (["--mode", "batch"], ["--input FILE.json"]),
    (["--mode", "test", "--input", "x.json"], ["--input is the conversations of --mode batch"]),
    (["--mode", "test", "--record"], ["--record is for --mode interactive"]),
    (["--mode", "test", "--temperature", "-1"], ["temperature must be a number >= 0"]),
])
def test_bad_flags_are_one_line(tmp_path, capsys, args, fragments):
    assert_one_error(*chat([*args, "-d", tmp_path / "out", "--no-watermark"], capsys), *fragments)


# --- csm chat: interactive --------------------------------------------------------------------

def session(args, stdin, capsys, monkeypatch):
    """`csm chat ARGS` with `stdin` piped in."""
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    return chat(args, capsys)


def test_interactive_session_from_stdin(tmp_path, model_args, loaded, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    lines = "".join(f"{line}\n" for line in ["Hello there.", "1: Hi! Nice day.", "/speaker 0", "", "/bogus", "/reset",
                                              "/save", "10:30 works.", "1:", "Again.", "/quit", "never"])
    code, err = session(["--no-play", "--no-watermark", *model_args], lines, capsys, monkeypatch)
    assert code == 0, err
    out = tmp_path / "chat"
    assert sorted(p.name for p in out.iterdir()) == ["transcript.json", "transcript.txt", "turn-01.wav",
                                                     "turn-02.wav", "turn-03.wav", "turn-04.wav"]
    assert "unknown command '/bogus'" in err and "conversation cleared" in err
    # /reset started a new conversation: the transcript at the end holds the turns after it; "10:30" is
    # text, "1:" alone switches the speaker
    assert json.loads((out / "transcript.json").read_text())[0]["turns"] == [
        {"speaker": 0, "text": "10:30 works.", "audio": "turn-03.wav"},
        {"speaker": 1, "text": "Again.", "audio": "turn-04.wav"}]
    # a second session in the same folder would overwrite the first one's files
    assert_one_error(*session(["--no-play", "--no-watermark", *model_args], "Hi.\n", capsys, monkeypatch),
                     "already exist", "--force")


class FakeMicrophone:
    """sounddevice with a microphone that hears 0.5 s at 16 kHz as soon as it starts."""

    @staticmethod
    def query_devices(kind=None):
        return {"default_samplerate": 16000.0}

    class InputStream:
        def __init__(self, samplerate, channels, dtype, callback):
            self.callback = callback

        def start(self):
            self.callback(np.full((8000, 1), 0.1, dtype=np.float32), 8000, None, None)

        def stop(self):
            pass

        def close(self):
            pass


def test_record_takes_your_turns_from_the_microphone(tmp_path, model_args, loaded, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "sounddevice", FakeMicrophone)
    out = tmp_path / "out"
    code, err = session(["--no-play", "--no-watermark", "--record", "-d", out, *model_args],
                        "Hello there.\n\n1: Hi!\n", capsys, monkeypatch)
    assert code == 0, err
    turns = json.loads((out / "transcript.json").read_text())[0]["turns"]
    assert [(t["speaker"], t["text"]) for t in turns] == [(0, "Hello there."), (1, "Hi!")]
    assert sf.info(str(out / "turn-01.wav")).frames == 12_000  # what the microphone heard, at 24 kHz


class FakeSpeakers:
    """sounddevice with an output device that plays instantly."""

    played = []

    @staticmethod
    def query_devices(kind=None):
        return {"default_samplerate": 48000.0}

    @classmethod
    def play(cls, audio, rate):
        cls.played.append((len(audio), rate))

    @staticmethod
    def wait():
        pass


def test_interactive_plays_and_saves_on_request(tmp_path, model_args, loaded, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "sounddevice", FakeSpeakers)
    FakeSpeakers.played.clear()
    out = tmp_path / "out"
    code, err = session(["--no-watermark", "-d", out, *model_args], "Hello.\n/save\n1: Hi.\n", capsys,
                        monkeypatch)
    assert code == 0, err
    assert [rate for _, rate in FakeSpeakers.played] == [MODEL_SAMPLE_RATE] * 2 and "playing each turn" in err
    # played turns are written only by /save: the one before it
    assert sorted(p.name for p in out.iterdir()) == ["transcript.json", "transcript.txt", "turn-01.wav"]


def test_record_without_sounddevice_names_the_extra(tmp_path, model_args):
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "sounddevice.py").write_text("raise OSError('PortAudio library not found')\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(fake)}
    r = subprocess.run([sys.executable, "-m", "csm.cli.main", "chat", "--record", "--no-watermark", *model_args],
                       input="Hi.\n", capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("error: cannot record") and "csm-speech[audio]" in r.stderr
    assert "loaded" not in r.stderr  # before the model loads
