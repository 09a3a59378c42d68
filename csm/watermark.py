"""Sony's silentcipher audio watermark, as Sesame applies it to every CSM clip.

Embedding: 24 kHz audio -> 44.1 kHz -> silentcipher `encode_wav(..., message_sdr=36)` -> back to
the input rate. Detection gives the verdict of `decode_wav(..., phase_shift_decoding=True)` (a clip
is watermarked with `key` iff the decoder reports success and its first message equals `key`), but
without its cost: that call runs the message decoder once for each of 205 alignments (every 10th
sample of a 2048-sample hop) before decoding, minutes per second of audio on a CPU. `Watermarker.locate`
decodes the unshifted clip first and searches the alignments coarse-to-fine only when that finds no
key; see `_search_shift`.

The weights are the 44.1 kHz model of the Hugging Face repo `sony/silentcipher`
(`44_1_khz/73999_iteration`). We resolve them ourselves (explicit folder, then
$CSM_WATERMARK_MODEL, then the Hub cache / download) and never call silentcipher's own download
path, which prints to stdout. silentcipher is imported lazily, only by `Watermarker.load`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from csm.audio import resample
from csm.errors import CsmError

PUBLIC_KEY: tuple[int, ...] = (212, 211, 146, 56, 201)
WATERMARK_ENV = "CSM_WATERMARK_MODEL"

HUB_REPO = "sony/silentcipher"
MODEL_SUBDIR = "44_1_khz/73999_iteration"
WATERMARK_SAMPLE_RATE = 44_100
MESSAGE_SDR = 36
KEY_LENGTH = 5
# One copy of the key spans `message_len` (21) STFT frames of `HOP_LENGTH` (2048) samples at
# 44.1 kHz (the released model's hparams.yaml): shorter audio cannot carry the whole key.
MESSAGE_SECONDS = 21 * 2048 / WATERMARK_SAMPLE_RATE  # 0.975 s

_FIX = (
    "Download them once with `huggingface-cli download sony/silentcipher`, or pass "
    "--watermark-model DIR / set CSM_WATERMARK_MODEL, or use --no-watermark."
)


# --- keys ------------------------------------------------------------------------------------


def validate_key(key: Sequence[int]) -> tuple[int, ...]:
    try:
        values = tuple(key)
    except TypeError:
        raise CsmError(f"watermark key must be {KEY_LENGTH} integers 0..255, got {key!r}") from None
    if len(values) != KEY_LENGTH or not all(
        isinstance(v, (int, np.integer)) and not isinstance(v, bool) and 0 <= v <= 255 for v in values
    ):
        raise CsmError(
            f"watermark key must be {KEY_LENGTH} integers 0..255, got {key!r}; "
            f"write it like {','.join(map(str, PUBLIC_KEY))}"
        )
    return tuple(int(v) for v in values)


def parse_key(text: str) -> tuple[int, ...]:
    """Parse "212,211,146,56,201" (spaces allowed) into a 5-byte key."""
    example = ",".join(map(str, PUBLIC_KEY))
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) != KEY_LENGTH or any(p == "" for p in parts):
        raise CsmError(
            f"watermark key {text!r} must be {KEY_LENGTH} comma-separated integers 0..255, e.g. {example}"
        )
    values = []
    for part in parts:
        try:
            value = int(part, 10)
        except ValueError:
            raise CsmError(
                f"watermark key {text!r}: {part!r} is not an integer; write the key as "
                f"{KEY_LENGTH} comma-separated integers 0..255, e.g. {example}"
            ) from None
        if not 0 <= value <= 255:
            raise CsmError(
                f"watermark key {text!r}: {value} is outside 0..255; every byte of the key must be 0..255, "
                f"e.g. {example}"
            )
        values.append(value)
    return tuple(values)


def format_key(key: Sequence[int]) -> str:
    return ",".join(str(int(v)) for v in key)


# --- weights -----------------------------------------------------------------------------------


def _n_messages(hparams: Path) -> int:
    try:
        import yaml

        config = yaml.safe_load(hparams.read_text(encoding="utf-8"))
    except Exception as exc:
        raise CsmError(f"cannot read silentcipher {hparams}: {exc}. Re-download sony/silentcipher.") from exc
    if not isinstance(config, dict):
        raise CsmError(f"silentcipher {hparams} is not a YAML mapping. Re-download sony/silentcipher.")
    return int(config.get("n_messages", 1))


def _check_model_dir(folder: Path, origin: str) -> Path:
    hparams = folder / "hparams.yaml"
    if not hparams.is_file():
        raise CsmError(
            f"silentcipher watermark model folder {folder} ({origin}) has no hparams.yaml. "
            f"Point it at the folder holding hparams.yaml and the .ckpt files "
            f"(sony/silentcipher's {MODEL_SUBDIR}), or use --no-watermark."
        )
    required = ["enc_c.ckpt", "dec_c.ckpt"] + [f"dec_m_{i}.ckpt" for i in range(_n_messages(hparams))]
    for name in required:
        if not (folder / name).is_file():
            raise CsmError(
                f"silentcipher watermark model folder {folder} ({origin}) is missing {name}. "
                f"Re-download it with `huggingface-cli download sony/silentcipher`, or use --no-watermark."
            )
    return folder


def _model_dir_from(path: Path, origin: str) -> Path:
    """`path` is either the model folder itself or a snapshot root holding 44_1_khz/73999_iteration."""
    path = path.expanduser()
    if not path.exists():
        raise CsmError(
            f"silentcipher watermark model folder {path} ({origin}) does not exist. "
            f"Pass the folder holding hparams.yaml and the .ckpt files, or use --no-watermark."
        )
    if not path.is_dir():
        raise CsmError(f"silentcipher watermark model path {path} ({origin}) is not a folder. " + _FIX)
    nested = path / MODEL_SUBDIR
    if not (path / "hparams.yaml").exists() and nested.is_dir():
        path = nested
    return _check_model_dir(path, origin)


def _hub_snapshot() -> Path:
    from huggingface_hub import snapshot_download

    kwargs = dict(repo_id=HUB_REPO, allow_patterns=[f"{MODEL_SUBDIR.split('/')[0]}/*"])
    try:
        # The cache first: no network round trip when the weights are already there.
        return Path(snapshot_download(**kwargs, local_files_only=True))
    except Exception:
        pass
    try:
        return Path(snapshot_download(**kwargs))
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CsmError(
            f"silentcipher watermark weights not found (not in the Hugging Face cache and the Hub "
            f"download of {HUB_REPO} failed: {reason}). " + _FIX
        ) from exc


def resolve_watermark_dir(path: str | os.PathLike | None = None) -> Path:
    """The folder holding silentcipher's hparams.yaml and checkpoints.

    Order: the explicit `path`, then $CSM_WATERMARK_MODEL, then the Hub repo sony/silentcipher
    (local cache first; works offline when it was downloaded once)."""
    if path is not None and str(path) != "":
        return _model_dir_from(Path(path), "given with --watermark-model")
    env = os.environ.get(WATERMARK_ENV)
    if env:
        return _model_dir_from(Path(env), f"from ${WATERMARK_ENV}")
    root = _hub_snapshot()
    folder = root / MODEL_SUBDIR
    if not folder.is_dir():
        raise CsmError(
            f"silentcipher watermark weights not found (the {HUB_REPO} snapshot at {root} has no {MODEL_SUBDIR}). "
            + _FIX
        )
    return _check_model_dir(folder, f"Hugging Face snapshot of {HUB_REPO}")


# --- the model ------------------------------------------------------------------------------------


def _import_silentcipher():
    with warnings.catch_warnings():
        # pydub warns at import when ffmpeg is absent; silentcipher only uses it for file I/O.
        warnings.simplefilter("ignore")
        try:
            import silentcipher
        except ImportError as exc:
            raise CsmError(
                f"cannot import silentcipher ({exc}). Install it with `pip install silentcipher==1.0.5`, "
                f"or use --no-watermark."
            ) from exc
    return silentcipher


def _as_mono(audio: np.ndarray) -> np.ndarray:
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim != 1:
        raise CsmError(f"watermarking expects mono 1-D audio, got shape {audio.shape}; mix it down to mono first")
    if not np.all(np.isfinite(audio)):
        raise CsmError("audio contains NaN or infinite samples; fix the audio before watermarking it")
    return audio


def _fit_length(audio: np.ndarray, length: int) -> np.ndarray:
    if audio.shape[0] > length:
        return audio[:length]
    if audio.shape[0] < length:
        return np.pad(audio, (0, length - audio.shape[0]))
    return audio


# Coarse-to-fine alignment search (see `Watermarker._search_shift`): coarse steps in samples at
# 44.1 kHz, and how many copies of the message (0.975 s each) the search reads.
COARSE_STEP = 160
SEARCH_COPIES = 3


@dataclass(frozen=True)
class Detection:
    """What `Watermarker.locate` found: the key (None when none decodes) and the shift, in
    samples at 44.1 kHz dropped from the clip's start, it decoded at (None when the clip is
    too short or silent to decode at all). `agreement` is the share of frames whose symbol
    matches the other copies of the message (1.0: all copies agree)."""

    key: tuple[int, ...] | None
    shift: int | None
    agreement: float = 0.0


class Watermarker:
    """A loaded silentcipher 44.1 kHz model. Build with `Watermarker.load()`."""

    def __init__(self, model, model_dir: Path, device: str = "cpu"):
        self.model = model
        self.model_dir = model_dir
        self.device = device

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, device: str = "cpu") -> Watermarker:
        """Resolve the weights (see `resolve_watermark_dir`) and load them on `device` (CPU by
        default; MPS is mapped to CPU because silentcipher does not run there)."""
        import torch

        folder = resolve_watermark_dir(path)
        device = str(device)
        if device.startswith("mps"):
            device = "cpu"
        silentcipher = _import_silentcipher()
        try:
            with torch.no_grad():
                model = silentcipher.get_model(
                    model_type="44.1k",
                    ckpt_path=str(folder),
                    config_path=str(folder / "hparams.yaml"),
                    device=device,
                )
        except CsmError:
            raise
        except Exception as exc:
            raise CsmError(
                f"cannot load the silentcipher watermark model from {folder}: {exc}. "
                f"Re-download it with `huggingface-cli download sony/silentcipher`, or use --no-watermark."
            ) from exc
        return cls(model, folder, device)

    def embed(self, audio: np.ndarray, sample_rate: int, key: Sequence[int] = PUBLIC_KEY) -> np.ndarray:
        """Watermark mono `audio`; returns float32 audio of the same length and sample rate."""
        import torch

        key = validate_key(key)
        audio = _as_mono(audio)
        if not np.any(audio):
            return audio.copy()  # silence carries no watermark (silentcipher would print a warning and skip it)
        high = resample(audio, sample_rate, WATERMARK_SAMPLE_RATE)
        with torch.no_grad():
            marked, _ = self.model.encode_wav(
                high, WATERMARK_SAMPLE_RATE, list(key), calc_sdr=False, message_sdr=MESSAGE_SDR
            )
        out = resample(np.asarray(marked, dtype=np.float32), WATERMARK_SAMPLE_RATE, sample_rate)
        return np.ascontiguousarray(_fit_length(out, audio.shape[0]), dtype=np.float32)

    def detect(self, audio: np.ndarray, sample_rate: int) -> tuple[int, ...] | None:
        """The 5-byte key watermarked into mono `audio`, or None when no watermark decodes."""
        return self.locate(audio, sample_rate).key

    def check(self, audio: np.ndarray, sample_rate: int, key: Sequence[int] = PUBLIC_KEY) -> bool:
        """True iff `audio` carries the watermark `key`."""
        key = validate_key(key)
        return self.detect(audio, sample_rate) == key

    def locate(self, audio: np.ndarray, sample_rate: int) -> Detection:
        """The key watermarked into mono `audio` and the alignment it decoded at.

        The verdict is meant to be that of silentcipher's `decode_wav(..., phase_shift_decoding=True)`,
        which keeps the alignment (0, 10, ..., 2040 samples skipped) whose copies of the message
        agree best and decodes there. It is exactly that when the unshifted copies agree in every
        frame (no alignment can score higher, so that search settles on 0 too), and for clips too
        short to decode. A key on which every copy in the clip's first 3 seconds agrees is read
        from those alone (it differs only where later audio carries another watermark). When the
        unshifted clip yields a key with less agreement, we keep it: a better-agreeing alignment of
        the same watermark decodes the same key; only a key read from unmarked audio could come out
        another one. Otherwise `_search_shift` finds the alignment."""
        import torch

        audio = _as_mono(audio)
        if audio.shape[0] == 0 or not np.any(audio):
            return Detection(None, None)  # silence carries no watermark (and silentcipher would divide by zero)
        high = resample(audio, sample_rate, WATERMARK_SAMPLE_RATE)
        # The same level as silentcipher's decoder sees: the clip scaled to its reference power.
        high = high * np.sqrt(self.model.average_energy_VCTK / np.mean(high**2))
        with torch.no_grad():
            if self._frames(high[self._shifts()[-1] :]) < self._message_len():
                # silentcipher's search fails on the whole clip as soon as one alignment leaves
                # less than one copy of the message (0.84-0.88 s); shorter clips fail at once.
                return Detection(None, None)
            opening = self._opening(high)
            if opening.shape[0] < high.shape[0]:
                rows = self._symbols(opening, 0)
                key = _key_from(rows)
                if key is not None and _agreement(rows) == 1.0:
                    # Every copy at the clip's start reads the same key: the whole clip's vote is
                    # that key too unless later audio carries another watermark (a splice), so the
                    # other copies need not be decoded. This is what makes a check of a file this
                    # package wrote take a few seconds, whatever its length.
                    return Detection(key, 0, 1.0)
            rows = self._symbols(high, 0)
            key, agreement = _key_from(rows), _agreement(rows)
            if key is not None or agreement == 1.0:
                # A file this package wrote decodes here. With full agreement no other alignment
                # can score higher, so silentcipher's search would also have stopped at 0.
                return Detection(key, 0, agreement)
            shift, agreement = self._search_shift(high, agreement)
            if shift == 0:
                return Detection(None, 0, agreement)
            rows = self._symbols(high, shift)
            return Detection(_key_from(rows), shift, _agreement(rows))

    # --- detection internals ---

    def _message_len(self) -> int:
        return int(self.model.config.message_len)

    def _shifts(self) -> list[int]:
        """The alignments silentcipher's phase-shift search tries: every 10th sample of one hop."""
        return list(range(0, int(self.model.config.HOP_LENGTH), 10))

    def _frames(self, samples: np.ndarray) -> int:
        magnitude, _ = self.model.stft.transform(self._tensor(samples))
        return int(magnitude.shape[-1])

    def _opening(self, scaled: np.ndarray) -> np.ndarray:
        """The clip's first `SEARCH_COPIES` copies of the message at every alignment the search
        tries (the whole clip when shorter)."""
        hop = int(self.model.config.HOP_LENGTH)
        n_fft = int(self.model.config.N_FFT)
        return scaled[: (SEARCH_COPIES * self._message_len() + 1) * hop + n_fft + self._shifts()[-1]]

    def _tensor(self, samples: np.ndarray):
        import torch

        return torch.from_numpy(np.ascontiguousarray(samples, np.float32))[None].to(self.model.device)

    def _symbols(self, scaled: np.ndarray, shift: int) -> np.ndarray:
        """The decoder's symbol for every frame of `scaled[shift:]`, one row per whole copy of the
        message (the released model has one message decoder, the one whose key we read)."""
        import torch

        magnitude, _ = self.model.stft.transform(self._tensor(scaled[shift:]))
        logits = self.model.dec_m[0](magnitude[:, None])  # (1, 1, symbols, frames)
        symbols = torch.argmax(logits[0, 0], dim=0).cpu().numpy()
        length = self._message_len()
        copies = symbols.shape[0] // length
        return symbols[: copies * length].reshape(copies, length)

    def _search_shift(self, scaled: np.ndarray, agreement_at_0: float) -> tuple[int, float]:
        """The alignment whose copies of the message agree best (the first of equals), as
        silentcipher's search picks it, from about a fifth of its 205 decoder runs.

        Why coarse-to-fine finds the same alignment: each frame's symbol is written into the
        magnitudes of one 4096-sample Hann window every 2048 samples, so misaligning the analysis
        by d samples keeps the window on (4096 - d) / 4096 of the samples it was written into.
        The agreement of the copies therefore falls off smoothly over hundreds of samples around
        the true alignment; the 10-sample steps oversample that peak. A coarse pass every
        `COARSE_STEP` samples lands within half a step of the peak, and a fine pass at silentcipher's
        10-sample steps around the best two coarse alignments (two guard against a near tie)
        pins it down. The search reads only the clip's first `SEARCH_COPIES` copies of the
        message (the whole clip when shorter): the alignment is the same all along a file, and
        the verdict is then decoded from the whole clip at the alignment found.

        Where it can differ from the exhaustive search: on audio with no such peak (unmarked
        audio, where both almost always find no key), and on a clip whose first 3 seconds carry
        no watermark while later ones do (other audio put in front), which the exhaustive search
        may still read from the votes of the later copies."""
        shifts = self._shifts()
        excerpt = self._opening(scaled)
        scores: dict[int, float] = {}

        def score(shift: int) -> float:
            if shift not in scores:
                if shift == 0 and excerpt.shape[0] == scaled.shape[0]:
                    scores[shift] = agreement_at_0
                else:
                    scores[shift] = _agreement(self._symbols(excerpt, shift))
            return scores[shift]

        coarse = shifts[:: COARSE_STEP // 10]
        ranked = sorted(coarse, key=lambda s: (-score(s), s))
        for center in ranked[:2]:
            for shift in shifts:
                if abs(shift - center) < COARSE_STEP // 2 + 10:
                    score(shift)
        best = min(scores, key=lambda s: (-scores[s], s))
        return best, scores[best]


def _agreement(rows: np.ndarray) -> float:
    """How well the copies (rows) agree: per position, the share of copies holding its most
    common symbol, averaged over positions. Summed in position order, so equal scores compare
    equal exactly as in silentcipher's search."""
    total = 0.0
    for column in rows.T:
        total += np.bincount(column).max() / rows.shape[0]
    return float(total / rows.shape[1])


def _key_from(rows: np.ndarray) -> tuple[int, ...] | None:
    """The key the copies vote for, or None when the vote is no key.

    Per position the most common symbol wins (the smallest on a tie). Symbol 0 marks the end of
    the message, symbols 1..4 carry two bits each (value - 1, high bits first), and the message
    starts right after the end mark. Anything but exactly one end mark and 4 * KEY_LENGTH
    two-bit symbols is no key (silentcipher fails on it or returns something that is not 5 bytes)."""
    votes = [int(np.bincount(column).argmax()) for column in rows.T]
    if votes.count(0) != 1:
        return None
    end = votes.index(0)
    symbols = [v - 1 for v in votes[end + 1 :] + votes[:end]]
    if len(symbols) != 4 * KEY_LENGTH or not all(0 <= s <= 3 for s in symbols):
        return None
    return tuple(
        (symbols[i] << 6) | (symbols[i + 1] << 4) | (symbols[i + 2] << 2) | symbols[i + 3]
        for i in range(0, len(symbols), 4)
    )
