"""csm.evaluation on signals whose answers are known: tones for pitch and energy, gaps for pauses,
espeak-ng voices (made offline) for speaker similarity and silero-vad on speech."""

import json
import math

import numpy as np
import pytest
import soundfile as sf

pytest.importorskip("resemblyzer", reason="needs the eval extra: pip install 'csm-speech[eval]'")
pytest.importorskip("silero_vad", reason="needs the eval extra: pip install 'csm-speech[eval]'")

from csm.evaluation import count_syllables, evaluate  # noqa: E402
from fakes.speech import FEMALE, MALE, require_espeak, speak  # noqa: E402

SR = 16_000


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the CPUs are shared; the models here are small
    yield
    torch.set_num_threads(before)


def tone(freq, seconds, amplitude=0.3, rate=SR):
    t = np.arange(int(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def silence(seconds, rate=SR):
    return np.zeros(int(seconds * rate), dtype=np.float32)


@pytest.mark.parametrize("freq", [150.0, 300.0])
def test_median_pitch_of_a_tone(freq):
    report = evaluate(tone(freq, 1.0), SR, pause_detector="energy")
    assert abs(12 * math.log2(report.pitch_median_hz / freq)) < 0.5
    assert report.pitch_spread_semitones < 0.3


def test_a_glide_has_spread():
    # one octave, exponential in time: semitones uniform over 0..12, standard deviation 12 / sqrt(12)
    rate, seconds = 16_000, 2.0
    t = np.arange(int(seconds * rate)) / rate
    f = 120.0 * 2 ** (t / seconds)
    glide = (0.3 * np.sin(2 * np.pi * np.cumsum(f) / rate)).astype(np.float32)
    report = evaluate(glide, rate, pause_detector="energy")
    assert 2.5 < report.pitch_spread_semitones < 4.5
    assert abs(12 * math.log2(report.pitch_median_hz / (120 * 2**0.5))) < 1.0


def test_energy_of_a_known_sine_at_another_rate():
    report = evaluate(tone(220.0, 1.0, amplitude=0.5, rate=24_000), 24_000, pause_detector="energy")
    assert abs(report.energy_dbfs - 20 * math.log10(0.5 / math.sqrt(2))) < 0.5  # -9.03 dBFS


def test_two_inserted_silences_are_two_pauses_energy_detector():
    # silero-vad hears no speech in pure tones, so this is the energy detector (named in the report)
    signal = np.concatenate([tone(200, 1.0), silence(0.5), tone(200, 0.8), silence(0.3), tone(200, 0.7)])
    report = evaluate(signal, SR, text="one two three four five six seven", pause_detector="energy")
    assert report.pause_detector == "energy"
    assert report.pause_count == 2
    assert abs(report.longest_pause_s - 0.5) < 0.1
    assert abs(report.pause_total_s - 0.8) < 0.15
    assert abs(report.speech_s - 2.5) < 0.15
    assert report.words == 7 and abs(report.words_per_s - 7 / report.speech_s) < 1e-9
    assert report.duration_flag == "ok"


def test_auto_falls_back_to_energy_when_silero_hears_no_speech():
    report = evaluate(np.concatenate([tone(200, 0.6), silence(0.4), tone(200, 0.6)]), SR)
    assert report.pause_detector == "energy" and report.pause_count == 1


def test_duration_flags_and_syllables():
    assert [count_syllables(w) for w in ["cat", "table", "make", "beautiful", "rhythm"]] == [1, 2, 1, 3, 1]
    clip = tone(200, 4.0)
    assert evaluate(clip, SR, text="Hi there.", pause_detector="energy").duration_flag == "runaway"
    long_text = " ".join(["word"] * 40)  # 16 s expected
    assert evaluate(clip, SR, text=long_text, pause_detector="energy").duration_flag == "truncated"


def test_bad_input_is_a_csm_error():
    from csm.errors import CsmError

    with pytest.raises(CsmError, match="empty"):
        evaluate(np.zeros(0, dtype=np.float32), SR)
    with pytest.raises(CsmError, match="reference"):
        evaluate(tone(200, 0.5), SR, other_voice=tone(300, 0.5))


# --- real speech, made offline with espeak-ng ---------------------------------------------------


@pytest.fixture(scope="module")
def voices(tmp_path_factory):
    require_espeak("no offline speech for the similarity tests")
    folder = tmp_path_factory.mktemp("espeak")
    lines = {
        "a1": (MALE, "The quick brown fox jumps over the lazy dog near the river bank."),
        "a2": (MALE, "Yesterday we walked to the market and bought some fresh bread."),
        "b2": (FEMALE, "Yesterday we walked to the market and bought some fresh bread."),
    }
    out = {}
    for name, (voice, text) in lines.items():
        path = folder / f"{name}.wav"
        audio, rate = speak(path, text, voice)
        loud = np.flatnonzero(np.abs(audio) > 1e-3)  # espeak pads its clips with silence: trim it
        audio = audio[loud[0]:loud[-1] + 1]
        sf.write(str(path), audio, rate)
        out[name] = (audio, rate, text, path)
    return out


def test_same_speaker_is_more_similar_than_another_voice(voices):
    a1, a2, b2 = (voices[k][0] for k in ("a1", "a2", "b2"))
    rate = voices["a1"][1]
    same = evaluate(a2, rate, reference=a1, other_voice=b2, pause_detector="energy")
    cross = evaluate(b2, rate, reference=a1, pause_detector="energy")
    assert same.similarity > cross.similarity + 0.1
    assert same.similarity_floor == pytest.approx(cross.similarity, abs=1e-5)
    assert same.similarity_calibrated > 0.5
    assert same.similarity_ceiling > same.similarity_floor
    assert cross.pitch_offset_semitones > 2  # the female variant at pitch 80 sits well above


def test_silero_finds_an_inserted_pause_in_speech(voices):
    a1, rate, text1, _ = voices["a1"]
    a2, _, text2, _ = voices["a2"]
    speech = np.concatenate([a1, np.zeros(int(0.6 * rate), dtype=np.float32), a2])
    report = evaluate(speech, rate, text=f"{text1} {text2}", pause_detector="silero")
    assert report.pause_detector == "silero"
    assert report.pause_count >= 1
    assert abs(report.longest_pause_s - 0.6) < 0.2
    assert 1.5 < report.words_per_s < 5 and report.duration_flag == "ok"
    assert -40 < report.energy_dbfs < 0


def test_report_outputs_and_cli(voices, tmp_path, capsys):
    from csm.cli.evaluate import main

    _, _, text, path = voices["a2"]
    ref, other = voices["a1"][3], voices["b2"][3]
    main([str(path), "--reference", str(ref), "--other", str(other), "--text", text,
          "--json", str(tmp_path / "r.json"), "--figure", str(tmp_path / "r.png")])
    printed = capsys.readouterr().out
    assert "similarity_calibrated" in printed and "pause_detector" in printed
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["words"] == 11 and data["similarity"] > data["similarity_floor"]
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit) as exc:  # outputs exist: refused before any work
        main([str(path), "--json", str(tmp_path / "r.json")])
    assert exc.value.code == 2
    assert capsys.readouterr().err.count("error:") == 1
    with pytest.raises(SystemExit):
        main([str(path), "--other", str(other)])
    assert "--reference" in capsys.readouterr().err
