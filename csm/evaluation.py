"""Objective checks of a generated clip: numpy audio in, a `Report` out. No network at run time.

    from csm.evaluation import evaluate
    report = evaluate(audio, 24_000, text="Hello there.", reference=ref, reference_sample_rate=24_000)
    print(report.table()); report.figure("eval.png")

What it measures (the `eval` extra: `pip install 'csm-speech[eval]'`):

- speaker similarity: cosine of resemblyzer speaker embeddings (its VoiceEncoder weights ship in the
  wheel), at 16 kHz. Calibrated per run: the reference's two halves against each other give the
  same-speaker ceiling, the reference against `other_voice` (a different speaker) the floor;
  calibrated = (raw - floor) / (ceiling - floor), so 1 sounds as much like the reference as the
  reference does itself, 0 no more than the other voice. Without `other_voice` it is raw / ceiling.
  Halves of a short reference (under ~6 s) embed less reliably than whole clips, so the ceiling is
  low and the calibrated score can exceed 1: read it with the raw cosine beside it.
- pauses: silero-vad (its model ships in the wheel) finds speech; pauses are the gaps of at least
  `MIN_PAUSE_S` between speech segments (leading and trailing silence are not pauses; they are
  reported on their own, the leading one being the gap a turn leaves before it speaks). When silero
  is missing or hears no speech at all (pure tones, noise) an energy detector takes over; the report
  names the detector used.
- speech rate from the known text: words and syllables (a vowel-group estimate) per second of speech,
  speech being the time from the first to the last speech sample less the pauses.
- pitch: librosa's pyin (librosa comes with resemblyzer anyway, so no extra dependency; pyin is
  robust on speech and returns unvoiced frames as NaN; praat-parselmouth would be
  one more compiled wheel for the same numbers). Median in Hz and the spread in semitones
  (standard deviation of the voiced contour around its median); with a reference, the offset of the
  medians in semitones.
- energy: RMS over the speech in dBFS (a full-scale square wave is 0 dBFS, a full-scale sine -3 dBFS).
- duration against the text's expected length at `WORDS_PER_SECOND`: ratio > 2 is flagged
  "runaway", < 0.5 "truncated".

Not here yet: word error rate with a speech recogniser (an optional extra to come).
"""

from __future__ import annotations

import functools
import math
import re
import warnings
from dataclasses import dataclass, field, fields

import numpy as np

from csm.audio import as_samples, resample, to_mono
from csm.errors import CsmError

ANALYSIS_RATE = 16_000  # resemblyzer and silero-vad both work at 16 kHz
MIN_PAUSE_S = 0.15  # shorter gaps are part of articulation, not pauses
WORDS_PER_SECOND = 2.5  # a typical conversational rate (150 words a minute)
RUNAWAY_RATIO = 2.0
TRUNCATED_RATIO = 0.5
PITCH_FMIN, PITCH_FMAX = 50.0, 600.0
_FRAME_S = 0.02  # the energy detector's frame
_HOP = 256  # pyin hop at 16 kHz: 16 ms


@dataclass
class Report:
    """The numbers; None where a measure needs an input that was not given (text, reference)."""

    duration_s: float
    speech_s: float
    pause_detector: str
    pause_count: int
    pause_total_s: float
    longest_pause_s: float
    leading_silence_s: float | None  # before the first speech (None: no speech found)
    trailing_silence_s: float | None  # after the last speech
    energy_dbfs: float | None
    pitch_median_hz: float | None
    pitch_spread_semitones: float | None
    words: int | None = None
    syllables: int | None = None
    words_per_s: float | None = None
    syllables_per_s: float | None = None
    expected_duration_s: float | None = None
    duration_ratio: float | None = None
    duration_flag: str | None = None  # "ok", "runaway" or "truncated"
    reference_pitch_median_hz: float | None = None
    pitch_offset_semitones: float | None = None
    similarity: float | None = None  # raw cosine, generated vs reference
    similarity_ceiling: float | None = None  # reference half vs half
    similarity_floor: float | None = None  # reference vs the other voice
    similarity_calibrated: float | None = None
    # contours for the figure: (times in s, f0 in Hz with NaN where unvoiced)
    pitch_contour: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False, compare=False)
    reference_pitch_contour: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        """The numbers (no contours), JSON-ready."""
        return {f.name: getattr(self, f.name) for f in fields(self) if "contour" not in f.name}

    def table(self) -> str:
        """Aligned `name  value` lines for the terminal; measures that were not taken are left out."""
        rows = [(k, v) for k, v in self.to_dict().items() if v is not None]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {_fmt(v)}" for k, v in rows)

    def figure(self, path) -> None:
        """Write a PNG: pitch contours (generated, and the reference if given) and a bar chart of the metrics."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (ax_pitch, ax_bars) = plt.subplots(2, 1, figsize=(9, 7), gridspec_kw={"height_ratios": [3, 2]})
        for contour, label in ((self.pitch_contour, "generated"), (self.reference_pitch_contour, "reference")):
            if contour is not None:
                ax_pitch.plot(contour[0], contour[1], ".", markersize=3, label=label)
        ax_pitch.set(xlabel="time (s)", ylabel="f0 (Hz)", title="pitch (pyin)")
        ax_pitch.legend(loc="upper right")
        names = ["words_per_s", "pitch_spread_semitones", "pause_count", "pause_total_s", "longest_pause_s",
                 "duration_ratio", "similarity", "similarity_calibrated"]
        bars = [(n, getattr(self, n)) for n in names if getattr(self, n) is not None]
        labels, values = [n for n, _ in bars], [float(v) for _, v in bars]
        ax_bars.barh(labels, values, color="tab:blue")
        for y, (_, v) in enumerate(bars):
            ax_bars.annotate(_fmt(v), (float(v), y), xytext=(3, 0), textcoords="offset points", va="center")
        ax_bars.invert_yaxis()
        ax_bars.set_title(f"metrics (energy {_fmt(self.energy_dbfs)} dBFS, pauses by {self.pause_detector})")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)


def _fmt(value) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.3f}"
    return str(value)


def evaluate(audio, sample_rate: int, text: str | None = None, reference=None, reference_sample_rate: int | None = None,
             other_voice=None, other_sample_rate: int | None = None, pause_detector: str = "auto",
             pitch: bool = True) -> Report:
    """Measure a clip. `audio`, `reference`, `other_voice`: mono (or [N, channels]) float samples.

    `reference_sample_rate` and `other_sample_rate` default to `sample_rate`. `pause_detector`:
    "auto" (silero-vad, the energy detector when silero hears no speech or is not installed),
    "silero" or "energy". `pitch=False` skips the pitch measures (pyin is the slowest part).
    """
    if pause_detector not in ("auto", "silero", "energy"):
        raise CsmError(f"pause_detector must be auto, silero or energy, not {pause_detector!r}")
    wav = _prepare(audio, sample_rate, "audio")
    segments, detector = _speech_segments(wav, pause_detector)
    duration = len(wav) / ANALYSIS_RATE
    pauses = [b[0] - a[1] for a, b in zip(segments, segments[1:], strict=False) if b[0] - a[1] >= MIN_PAUSE_S]
    speech_s = (segments[-1][1] - segments[0][0] - sum(pauses)) if segments else 0.0
    speech = np.concatenate([wav[int(s * ANALYSIS_RATE):int(e * ANALYSIS_RATE)] for s, e in segments]) \
        if segments else wav[:0]
    energy = _dbfs(speech) if len(speech) else None
    times, f0 = _pitch(wav) if pitch else (None, None)
    median, spread = _pitch_stats(f0) if pitch else (None, None)
    report = Report(duration_s=duration, speech_s=float(speech_s), pause_detector=detector, pause_count=len(pauses),
                    pause_total_s=float(sum(pauses)), longest_pause_s=float(max(pauses, default=0.0)),
                    leading_silence_s=float(segments[0][0]) if segments else None,
                    trailing_silence_s=float(duration - segments[-1][1]) if segments else None,
                    energy_dbfs=energy, pitch_median_hz=median, pitch_spread_semitones=spread,
                    pitch_contour=(times, f0) if pitch else None)
    if text is not None:
        _text_measures(report, text)
    if reference is not None:
        ref = _prepare(reference, reference_sample_rate or sample_rate, "reference")
        if pitch:
            ref_times, ref_f0 = _pitch(ref)
            report.reference_pitch_contour = (ref_times, ref_f0)
            report.reference_pitch_median_hz, _ = _pitch_stats(ref_f0)
            if median and report.reference_pitch_median_hz:
                report.pitch_offset_semitones = 12 * math.log2(median / report.reference_pitch_median_hz)
        other = None if other_voice is None else _prepare(other_voice, other_sample_rate or sample_rate, "other voice")
        _similarity(report, wav, ref, other)
    elif other_voice is not None:
        raise CsmError("other_voice calibrates the similarity to a reference: give a reference too")
    return report


def _prepare(audio, rate: int, what: str) -> np.ndarray:
    samples = to_mono(as_samples(audio))
    if samples.size == 0:
        raise CsmError(f"{what} is empty")
    if not np.all(np.isfinite(samples)):
        raise CsmError(f"{what} has NaN or infinite samples")
    return resample(samples, int(rate), ANALYSIS_RATE)


def _dbfs(x: np.ndarray) -> float:
    rms = float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))
    return 20 * math.log10(max(rms, 1e-10))


# --- pauses -------------------------------------------------------------------------------------


def _speech_segments(wav: np.ndarray, detector: str) -> tuple[list[tuple[float, float]], str]:
    if detector in ("auto", "silero"):
        try:
            segments = _silero_segments(wav)
        except ImportError:
            if detector == "silero":
                raise CsmError("silero-vad is not installed: pip install 'csm-speech[eval]'") from None
            segments = []
        if segments or detector == "silero":
            return segments, "silero"
    return _energy_segments(wav), "energy"


@functools.lru_cache(maxsize=1)
def _silero_model():
    from silero_vad import load_silero_vad

    with warnings.catch_warnings():  # its loader's deprecation notices are not the user's to act on
        warnings.simplefilter("ignore")
        return load_silero_vad()  # the packaged JIT model: no download


def _silero_segments(wav: np.ndarray) -> list[tuple[float, float]]:
    import torch
    from silero_vad import get_speech_timestamps

    stamps = get_speech_timestamps(torch.from_numpy(np.ascontiguousarray(wav)), _silero_model(),
                                   sampling_rate=ANALYSIS_RATE, min_silence_duration_ms=100)
    return [(s["start"] / ANALYSIS_RATE, s["end"] / ANALYSIS_RATE) for s in stamps]


def _energy_segments(wav: np.ndarray, floor_db: float = -50.0, below_peak_db: float = 35.0) -> list[tuple]:
    """Speech = 20 ms frames louder than max(floor_db, loudest frame - below_peak_db) dBFS."""
    frame = int(_FRAME_S * ANALYSIS_RATE)
    n = len(wav) // frame
    if n == 0:
        return []
    rms = np.sqrt(np.mean(np.square(wav[: n * frame].reshape(n, frame), dtype=np.float64), axis=1))
    db = 20 * np.log10(np.maximum(rms, 1e-10))
    active = db > max(floor_db, db.max() - below_peak_db)
    segments, start = [], None
    for i, a in enumerate(np.append(active, False)):
        if a and start is None:
            start = i
        elif not a and start is not None:
            segments.append((start * _FRAME_S, i * _FRAME_S))
            start = None
    merged: list[tuple[float, float]] = []  # gaps too short to be pauses join their neighbours
    for s, e in segments:
        if merged and s - merged[-1][1] < MIN_PAUSE_S:
            merged[-1] = (merged[-1][0], e)
        else:
            merged.append((s, e))
    return merged


# --- pitch --------------------------------------------------------------------------------------


def _pitch(wav: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    import librosa

    f0, _, _ = librosa.pyin(wav, fmin=PITCH_FMIN, fmax=PITCH_FMAX, sr=ANALYSIS_RATE, frame_length=1024,
                            hop_length=_HOP, resolution=0.2)  # 0.2-semitone bins: 5x faster than 0.1
    times = np.arange(len(f0)) * _HOP / ANALYSIS_RATE
    return times, f0.astype(np.float64)


def _pitch_stats(f0: np.ndarray) -> tuple[float | None, float | None]:
    voiced = f0[np.isfinite(f0)]
    if voiced.size == 0:
        return None, None
    median = float(np.median(voiced))
    semitones = 12 * np.log2(voiced / median)
    return median, float(np.std(semitones))


# --- text ---------------------------------------------------------------------------------------


def count_syllables(word: str) -> int:
    """A vowel-group estimate for English (a silent final e does not count); at least 1 per word."""
    w = word.lower()
    groups = len(re.findall(r"[aeiouy]+", w))
    if w.endswith("e") and not w.endswith(("le", "ee")) and groups > 1:
        groups -= 1
    return max(groups, 1)


def _text_measures(report: Report, text: str) -> None:
    words = re.findall(r"[A-Za-z0-9']+", text)
    report.words = len(words)
    report.syllables = sum(count_syllables(w) for w in words)
    if report.speech_s > 0:
        report.words_per_s = report.words / report.speech_s
        report.syllables_per_s = report.syllables / report.speech_s
    if words:
        report.expected_duration_s = len(words) / WORDS_PER_SECOND
        report.duration_ratio = report.duration_s / report.expected_duration_s
        report.duration_flag = ("runaway" if report.duration_ratio > RUNAWAY_RATIO
                                else "truncated" if report.duration_ratio < TRUNCATED_RATIO else "ok")


# --- speaker similarity -------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _voice_encoder():
    try:
        with warnings.catch_warnings():  # webrtcvad's pkg_resources deprecation notice
            warnings.simplefilter("ignore")
            from resemblyzer import VoiceEncoder
    except ImportError:
        raise CsmError("speaker similarity needs resemblyzer: pip install 'csm-speech[eval]'") from None
    return VoiceEncoder("cpu", verbose=False)  # weights from the wheel


def speaker_embedding(wav16k: np.ndarray) -> np.ndarray:
    """resemblyzer's unit-length speaker embedding of 16 kHz mono audio."""
    return _voice_encoder().embed_utterance(np.asarray(wav16k, dtype=np.float32))


def _similarity(report: Report, wav: np.ndarray, ref: np.ndarray, other: np.ndarray | None) -> None:
    ref_emb = speaker_embedding(ref)
    report.similarity = float(speaker_embedding(wav) @ ref_emb)
    half = len(ref) // 2
    report.similarity_ceiling = float(speaker_embedding(ref[:half]) @ speaker_embedding(ref[half:]))
    if other is not None:
        report.similarity_floor = float(speaker_embedding(other) @ ref_emb)
        span = report.similarity_ceiling - report.similarity_floor
        report.similarity_calibrated = (report.similarity - report.similarity_floor) / span if span > 1e-6 else None
    elif report.similarity_ceiling > 1e-6:
        report.similarity_calibrated = report.similarity / report.similarity_ceiling


__all__ = ["Report", "evaluate", "count_syllables", "speaker_embedding"]
