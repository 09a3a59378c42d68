"""Voice profiles (csm.voices): the store, its archives, generating with a voice on the tiny
model, and the csm-voice / csm-generate --voice command lines."""

import io
import json
import tarfile
import zipfile

import numpy as np
import pytest
import soundfile as sf

import csm
from csm.audio import MODEL_SAMPLE_RATE, read_audio
from csm.errors import CsmError
from csm.voices import VoiceStore

pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.fixture(autouse=True)
def csm_home(tmp_path, monkeypatch):
    home = tmp_path / "csm-home"
    monkeypatch.setenv("CSM_HOME", str(home))
    return home


def write_clip(path, seconds=0.5, freq=220.0, rate=MODEL_SAMPLE_RATE):
    t = np.arange(int(seconds * rate)) / rate
    sf.write(path, (0.3 * np.sin(2 * np.pi * freq * t) * np.sin(2 * np.pi * 3 * t)).astype(np.float32), rate)
    return path


@pytest.fixture
def clips(tmp_path):
    return [write_clip(tmp_path / "one.wav", 0.5, 220.0), write_clip(tmp_path / "two.flac", 0.4, 330.0, 16_000)]


@pytest.fixture
def store(clips):
    store = VoiceStore()
    store.create("Ada", 3, "warm and calm", references=[(clips[0], "Hi there."), (clips[1], "Nice to meet you.")],
                 gender="female", language="en", topk=1)
    return store


@pytest.fixture(scope="module")
def gen(tiny_model_dir):
    return csm.load(str(tiny_model_dir), device="cpu", dtype="float32")


# --- the store --------------------------------------------------------------------------------

def test_create_copies_the_clips_into_the_store(store, clips, csm_home):
    voice = store.get("Ada")
    assert store.root == csm_home / "voices" and [v.name for v in store.list()] == ["Ada"]
    assert voice.speaker_id == 3 and voice.description == "warm and calm" and voice.topk == 1
    assert [r.transcript for r in voice.references] == ["Hi there.", "Nice to meet you."]
    assert voice.references[0].duration_s == 0.5 and voice.references[1].duration_s == 0.4
    for ref, source in zip(voice.references, clips, strict=True):
        assert (store.root / ref.file).read_bytes() == source.read_bytes()
        assert ref.file.startswith(f"clips/{voice.id}/")
    saved = json.loads(store.file.read_text())
    assert saved["schema"] == 1 and saved["voices"][0]["name"] == "Ada"
    clips[0].unlink()  # the user's file is not needed any more
    assert store.get(3) == store.get("3") == voice


def test_update_and_delete(store, clips, tmp_path):
    store.update("Ada", name="Bea", speaker_id=4, accent="Scottish", temperature=0.5,
                 references=[(clips[1], "Only this one.")])
    voice = store.get("Bea")
    assert (voice.speaker_id, voice.accent, voice.temperature) == (4, "Scottish", 0.5)
    assert [r.transcript for r in voice.references] == ["Only this one."]
    assert sorted(p.name for p in (store.root / voice.clip_folder).iterdir()) == ["ref-01.flac"]
    store.update("Bea", accent=None)
    assert store.get("Bea").accent is None
    store.delete("Bea")
    assert store.list() == [] and not (store.root / voice.clip_folder).exists()


@pytest.mark.parametrize("name", ["", "  ", "a/b", "a\\b", "..", "x..y", "tab\there", "42", "x" * 65])
def test_a_name_is_never_a_path(store, name):
    with pytest.raises(CsmError, match="voice name"):
        store.create(name, 9)


def test_duplicates_are_refused(store):
    with pytest.raises(CsmError, match="'Ada' exists already"):
        store.create("Ada", 7)
    with pytest.raises(CsmError, match="speaker id 3 on the same model"):
        store.create("Bob", 3)
    store.create("Bob", 3, adapter="some/adapter")  # the same id on another model is another speaker
    with pytest.raises(CsmError, match="several voices"):
        store.get(3)
    assert [v.name for v in store.list()] == ["Ada", "Bob"]


def test_unknown_voice_lists_the_known_ones(store):
    with pytest.raises(CsmError, match="no voice 'Zed'.*known voices: Ada"):
        store.get("Zed")
    with pytest.raises(CsmError, match="no voice speaker id 8"):
        store.get(8)


def test_missing_or_unreadable_reference_clip(store, tmp_path):
    with pytest.raises(CsmError, match="reference clip not found"):
        store.create("Bob", 5, references=[(tmp_path / "gone.wav", "words")])
    (tmp_path / "noise.wav").write_bytes(b"not audio at all")
    with pytest.raises(CsmError, match="cannot read audio file"):
        store.create("Bob", 5, references=[(tmp_path / "noise.wav", "words")])
    with pytest.raises(CsmError, match="needs its transcript"):
        store.create("Bob", 5, references=[(write_clip(tmp_path / "ok.wav"), " ")])
    assert store.names() == ["Ada"]
    assert [p.name for p in (store.root / "clips").iterdir()] == [store.get("Ada").id]  # nothing half-made left


def test_a_corrupt_store_is_reported_and_left_intact(store):
    broken = store.file.read_text()[:-20]
    store.file.write_text(broken)
    for action in (store.list, lambda: store.get("Ada"), lambda: store.create("Bob", 5), lambda: store.delete("Ada")):
        with pytest.raises(CsmError, match=f"voice store {store.file}.*cannot be read"):
            action()
    assert store.file.read_text() == broken
    store.file.write_text(json.dumps({"schema": 99, "voices": []}))
    with pytest.raises(CsmError, match="schema 99"):
        store.list()


# --- archives ---------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".tar.gz", ".zip"])
def test_export_then_import_gives_the_same_profile(store, tmp_path, suffix):
    archive = store.export("Ada", tmp_path / f"ada{suffix}")
    with pytest.raises(CsmError, match="already exists"):
        store.export("Ada", archive)
    store.export("Ada", archive, force=True)
    with pytest.raises(CsmError, match="exists already"):
        store.import_(archive)
    other = VoiceStore(tmp_path / "elsewhere")
    imported = other.import_(archive)
    original = store.get("Ada")
    same = ("name", "speaker_id", "description", "gender", "language", "topk", "created")
    assert {k: getattr(imported, k) for k in same} == {k: getattr(original, k) for k in same}
    for a, b in zip(imported.references, original.references, strict=True):
        assert (a.transcript, a.sha256, a.duration_s) == (b.transcript, b.sha256, b.duration_s)
        assert (other.root / a.file).read_bytes() == (store.root / b.file).read_bytes()
    renamed = store.import_(archive, rename="Ada2", speaker_id=8)
    assert (renamed.name, renamed.speaker_id) == ("Ada2", 8) and renamed.id != original.id


def _tar(path, members):
    with tarfile.open(path, "w:gz") as tar:
        for name, data, kind in members:
            info = tarfile.TarInfo(name)
            info.type = kind
            if kind == tarfile.SYMTYPE:
                info.linkname = "/etc/passwd"
            info.size = len(data) if kind == tarfile.REGTYPE else 0
            tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
    return path


@pytest.mark.parametrize("member, kind, message", [
    ("../escape.wav", tarfile.REGTYPE, "unexpected member"),
    ("/etc/escape", tarfile.REGTYPE, "unexpected member"),
    ("clips/../../x.wav", tarfile.REGTYPE, "unexpected member"),
    ("clips/ref-02.wav", tarfile.SYMTYPE, "not a regular file"),
    ("notes.txt", tarfile.REGTYPE, "unexpected member"),
])
def test_import_refuses_a_hostile_archive(store, tmp_path, member, kind, message):
    good = store.export("Ada", tmp_path / "ada.tar.gz")
    with tarfile.open(good) as tar:
        members = [(m.name, tar.extractfile(m).read(), tarfile.REGTYPE) for m in tar]
    bad = _tar(tmp_path / "bad.tar.gz", [*members, (member, b"x", kind)])
    target = VoiceStore(tmp_path / "target")
    with pytest.raises(CsmError, match=message):
        target.import_(bad)
    assert not target.root.exists() and not (tmp_path / "escape.wav").exists()


def test_import_checks_the_clips_against_the_profile(store, tmp_path):
    good = store.export("Ada", tmp_path / "ada.zip")
    with zipfile.ZipFile(good) as zf:
        files = {n: zf.read(n) for n in zf.namelist()}
    files["clips/ref-01.wav"] = files["clips/ref-01.wav"][:-10]
    with zipfile.ZipFile(tmp_path / "bad.zip", "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    with pytest.raises(CsmError, match="does not match the sha256"):
        VoiceStore(tmp_path / "target").import_(tmp_path / "bad.zip")
    with pytest.raises(CsmError, match=r"\.tar\.gz, \.tgz or \.zip"):
        store.export("Ada", tmp_path / "ada.rar")


# --- generating with a voice ------------------------------------------------------------------

def clips_as_context(voice):
    return [csm.Segment(voice.speaker_id, r.transcript, read_audio(voice.root / r.file)) for r in voice.references]


def test_a_voice_is_its_clips_as_context(gen, store):
    voice = store.get("Ada")
    with_voice = gen.generate_codes("Hello.", voice="Ada", max_audio_length_ms=400)  # topk=1: the voice's default
    by_hand = gen.generate_codes("Hello.", speaker=3, context=clips_as_context(voice), topk=1,
                                 max_audio_length_ms=400)
    np.testing.assert_array_equal(with_voice, by_hand)
    plain = gen.generate_codes("Hello.", speaker=3, topk=1, max_audio_length_ms=400)
    assert not np.array_equal(with_voice, plain)
    # an explicit speaker wins over the voice's
    prompt_speaker = gen.voice_turn("Ada", "Hello.", 5, (), 400, None, None, None, None)[0]
    assert prompt_speaker == 5


def test_reference_codes_are_encoded_once_per_codec(gen, store, monkeypatch):
    calls = []
    encode = gen._backend.encode_audio
    monkeypatch.setattr(gen._backend, "encode_audio", lambda audio: calls.append(len(audio)) or encode(audio))
    first = gen.generate_codes("Hello.", voice="Ada", max_audio_length_ms=240)
    assert len(calls) == 2
    again = gen.generate_codes("Hello.", voice=3, max_audio_length_ms=240)
    assert len(calls) == 2
    np.testing.assert_array_equal(first, again)
    monkeypatch.setattr(gen._backend, "_codec_identity", "mimi-0123456789abcdef")  # another Mimi
    gen.generate_codes("Hello.", voice="Ada", max_audio_length_ms=240)
    assert len(calls) == 4


def test_the_newest_clips_that_fit_are_used(gen, store):
    voice = store.get("Ada")
    speaker, context, _ = gen.voice_turn(voice, "Hello.", None, (), 400, None, None, None, None)
    assert [s.text for s in context] == ["Hi there.", "Nice to meet you."] and speaker == 3
    used = len(gen.prompt("Hello.", 3))
    newest = context[-1]
    size = len(gen.tokenizer.encode_turn(newest.text, 3)) + len(newest.codes) + 1
    max_frames = gen.config.backbone.max_seq_len - used - size - 1  # room for the newest clip only
    _, context, _ = gen.voice_turn(voice, "Hello.", None, (), max_frames * 80, None, None, None, None)
    assert [s.text for s in context] == ["Nice to meet you."]


def test_sampling_defaults_and_explicit_values(gen, store):
    store.update("Ada", topk=50, temperature=0.9)
    _, _, sampling = gen.voice_turn("Ada", "Hi.", None, (), 400, None, None, None, None)
    assert (sampling.topk, sampling.temperature) == (50, 0.9)
    _, _, sampling = gen.voice_turn("Ada", "Hi.", None, (), 400, 0.5, 1, None, None)
    assert (sampling.topk, sampling.temperature) == (1, 0.5)


def test_batch_with_a_voice(gen, store):
    batch = gen.generate_codes_batch(["Hello.", "Bye."], voice="Ada", max_audio_length_ms=240)
    solo = [gen.generate_codes(t, voice="Ada", max_audio_length_ms=240) for t in ("Hello.", "Bye.")]
    for a, b in zip(batch, solo, strict=True):
        np.testing.assert_array_equal(a, b)


def test_segment_codes_are_checked(gen, tmp_path):
    codes = gen.codec.encode(read_audio(write_clip(tmp_path / "clip.wav")))
    assert np.array_equal(gen.prompt("Hi.", 0, [csm.Segment(1, "a", codes=codes)]).tokens,
                          gen.prompt("Hi.", 0, [csm.Segment(1, "a", codes=codes.astype(np.int16))]).tokens)
    with pytest.raises(CsmError, match="segment codes must be integer Mimi codes"):
        csm.Segment(1, "a", codes=np.zeros((3, 31), dtype=np.int64))
    with pytest.raises(CsmError, match="not Mimi codes"):
        csm.Segment(1, "a", codes=np.full((3, 32), 2048))


def test_stream_with_a_voice(gen, store):
    chunks = list(gen.stream("Hello.", voice="Ada", max_audio_length_ms=400, watermark=False, first_chunk_frames=2,
                             chunk_frames=2))
    whole = gen.generate("Hello.", voice="Ada", max_audio_length_ms=400, watermark=False)
    np.testing.assert_allclose(np.concatenate(chunks), whole, atol=1e-4)


def test_a_voice_of_another_model_needs_its_own_load(gen, store, tiny_model_dir, tmp_path):
    store.create("Cy", 6, "fine-tuned", model=tmp_path / "finetuned")
    with pytest.raises(CsmError, match=r"csm.load\(voice='Cy'\)"):
        gen.generate_codes("Hi.", voice="Cy", max_audio_length_ms=160)
    store.create("Dee", 7, "the tiny model", model=tiny_model_dir, topk=1)
    own = csm.load(voice="Dee", device="cpu", dtype="float32")
    codes = own.generate_codes("Hi.", voice="Dee", max_audio_length_ms=160)
    np.testing.assert_array_equal(codes, gen.generate_codes("Hi.", speaker=7, topk=1, max_audio_length_ms=160))
    with pytest.raises(CsmError, match="leave the model out"):
        csm.load(tmp_path / "other", voice="Dee")


# --- command lines ----------------------------------------------------------------------------

def run_main(main, args, capsys):
    """(exit code, stdout, stderr) of a csm command run in this process."""
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_voice_cli(clips, tmp_path, capsys, tiny_model_dir):
    from csm.cli.voice import main

    code, out, _ = run_main(main, ["create", "Ada", 3, "warm", "--reference", f"{clips[0]}:Hi: there.",
                                   "--language", "en", "--top-k", 1, "--model-path", tiny_model_dir], capsys)
    assert code == 0 and "created voice 'Ada'" in out
    assert VoiceStore().get("Ada").references[0].transcript == "Hi: there."
    code, out, _ = run_main(main, ["list"], capsys)
    assert code == 0 and out.splitlines()[0].split() == ["NAME", "SPEAKER", "CLIPS", "MODEL", "DESCRIPTION"]
    assert out.splitlines()[1].split()[:3] == ["Ada", "3", "1"]
    code, out, _ = run_main(main, ["show", 3], capsys)
    assert code == 0 and "language: en" in out and "Hi: there." in out
    code, _, _ = run_main(main, ["update", "Ada", "--accent", "Irish"], capsys)
    assert code == 0 and VoiceStore().get("Ada").accent == "Irish"
    out_wav = tmp_path / "sample.wav"
    args = ["sample", "Ada", "--text", "Hello.", "-o", out_wav, "--device", "cpu", "--no-watermark",
            "--max-audio-length-ms", 400]
    code, _, err = run_main(main, args, capsys)
    assert code == 0, err
    assert sf.info(str(out_wav)).frames == 5 * 1920
    report = json.loads((tmp_path / "sample.eval.json").read_text())  # the clip measured against the voice
    assert report["duration_s"] == pytest.approx(0.4, abs=0.01) and "similarity" in report
    code, _, err = run_main(main, args, capsys)
    assert code != 0 and err.startswith("error:") and "--force" in err and len(err.splitlines()) == 1
    code, _, _ = run_main(main, ["export", "Ada", tmp_path / "ada.tgz"], capsys)
    assert code == 0
    code, out, _ = run_main(main, ["import", tmp_path / "ada.tgz", "--rename", "Ada2", "--speaker-id", 4], capsys)
    assert code == 0 and "imported voice 'Ada2'" in out
    code, out, _ = run_main(main, ["delete", "Ada2"], capsys)
    assert code == 0 and VoiceStore().names() == ["Ada"]


@pytest.mark.parametrize("args, fragment", [
    (["show", "Nobody"], "known voices: Ada"),
    (["create", "Ada", 9, "again"], "exists already"),
    (["create", "a/b", 9, "x"], "looks like a path"),
    (["create", "Bob", 9, "x", "--reference", "gone.wav:words"], "reference clip not found"),
    (["create", "Bob", 9, "x", "--reference", "no-transcript.wav"], "needs a transcript"),
    (["update", "Ada"], "nothing to update"),
    (["import", "missing.zip"], "voice archive not found"),
])
def test_voice_cli_errors_are_one_line(store, capsys, args, fragment):
    from csm.cli.voice import main

    code, _, err = run_main(main, args, capsys)
    assert code != 0 and len(err.splitlines()) == 1 and err.startswith("error:") and fragment in err, err


def test_generate_cli_with_a_voice_or_a_reference_clip(store, clips, tmp_path, capsys, tiny_model_dir):
    from csm.cli.generate import main

    base = ["--model", tiny_model_dir, "--device", "cpu", "--no-watermark", "--max-audio-length-ms", 400]
    code, _, err = run_main(main, ["--text", "Hello.", *base, "--voice", "Ada", "-o", tmp_path / "a.wav"], capsys)
    assert code == 0, err
    assert "for voice 'Ada'" in err
    code, _, err = run_main(main, ["--text", "Hello.", *base, "--ref-audio", clips[0], "--ref-text", "Hi there.",
                                   "--top-k", 1, "-o", tmp_path / "b.wav"], capsys)
    assert code == 0, err
    code, _, err = run_main(main, ["--text", "Hello.", *base, "--ref-audio", clips[0]], capsys)
    assert code != 0 and "--ref-audio and --ref-text go together" in err
    code, _, err = run_main(main, ["--text", "Hello.", *base, "--voice", "Nobody"], capsys)
    assert code != 0 and "known voices: Ada" in err


def test_csm_voice_is_csm_voice():
    from click.testing import CliRunner

    from csm.cli.main import group
    from csm.cli.voice import group as voice_group

    assert group.commands["voice"] is voice_group
    result = CliRunner().invoke(group, ["voice", "list"])
    assert result.exit_code == 0 and "no voices yet" in result.output
