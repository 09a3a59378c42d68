"""How well a model holds a conversation: each turn of held-out conversations is generated with the
real earlier turns as context, then measured against the real turn and the speaker's other turns.

    from csm.conversation_eval import conversations_from_dataset, evaluate_conversations
    conversations = conversations_from_dataset("prepared-data", split="validation")
    report = evaluate_conversations(gen, conversations, seed=0)
    print(report.table()); report.figure("conversations.png"); report.to_dict()

Per turn: whether it ended by itself (an end-of-speech frame before its length limit, which is
`LIMIT_FACTOR` times the real turn plus `LIMIT_MARGIN_S`), its duration against the real turn's,
speech rate, pauses inside it and the silence before its speech (a turn-taking gap), each beside
the real turn's. Voice consistency: speaker ids are roles within a conversation, so a turn is
compared with the same speaker's other turns of the same conversation: `consistency` is the cosine
of its speaker embedding to the mean of the speaker's other generated turns,
`reference_consistency` the same for the real turns (the speaker's first turn included; what a
perfect model would reach), and `similarity` the cosine to the mean of the speaker's real turns in
the conversation. The measures are those of `csm.evaluation` (the `eval` extra).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from csm.errors import CsmError
from csm.mimi_files import FRAME_MS
from csm.prompt import Segment, newest_that_fit, segment_positions

# a generated turn may run to LIMIT_FACTOR times the real one plus LIMIT_MARGIN_S before it is cut
LIMIT_FACTOR = 2.0
LIMIT_MARGIN_S = 2.0


@dataclass
class Conversation:
    """Turns in order: real speech as Mimi codes (or audio), each with its speaker and text."""

    id: str
    turns: list[Segment]


@dataclass
class TurnResult:
    conversation: str
    turn: int
    speaker: int
    text: str
    ended_by_itself: bool
    duration_s: float
    reference_duration_s: float
    words_per_s: float | None
    reference_words_per_s: float | None
    pause_count: int
    reference_pause_count: int
    leading_silence_s: float | None
    reference_leading_silence_s: float | None
    context_turns: int  # real turns that fitted before it
    consistency: float | None = None
    reference_consistency: float | None = None
    similarity: float | None = None


@dataclass
class ConversationReport:
    turns: list[TurnResult] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """Means over turns (None where no turn has the measure), and per speaker role."""
        t = self.turns

        def mean(name: str, rows=t) -> float | None:
            values = [getattr(r, name) for r in rows if getattr(r, name) is not None]
            return float(np.mean(values)) if values else None

        ratios = [r.duration_s / r.reference_duration_s for r in t if r.reference_duration_s > 0]
        speakers = sorted({r.speaker for r in t})
        return {
            "conversations": len({r.conversation for r in t}),
            "turns": len(t),
            "eos_rate": sum(r.ended_by_itself for r in t) / len(t) if t else None,
            "duration_ratio": float(np.mean(ratios)) if ratios else None,
            "words_per_s": mean("words_per_s"),
            "reference_words_per_s": mean("reference_words_per_s"),
            "leading_silence_s": mean("leading_silence_s"),
            "reference_leading_silence_s": mean("reference_leading_silence_s"),
            "pauses_per_turn": mean("pause_count"),
            "reference_pauses_per_turn": mean("reference_pause_count"),
            "consistency": mean("consistency"),
            "reference_consistency": mean("reference_consistency"),
            "similarity": mean("similarity"),
            "speakers": {
                str(s): {
                    "turns": sum(r.speaker == s for r in t),
                    "consistency": mean("consistency", [r for r in t if r.speaker == s]),
                    "reference_consistency": mean("reference_consistency", [r for r in t if r.speaker == s]),
                    "similarity": mean("similarity", [r for r in t if r.speaker == s]),
                } for s in speakers
            },
        }

    def to_dict(self) -> dict[str, Any]:
        return {"summary": self.summary(), "turns": [asdict(r) for r in self.turns]}

    def table(self) -> str:
        """`measure  generated  real` lines for the terminal."""
        s = self.summary()
        rows = [("conversations", s["conversations"], None), ("turns", s["turns"], None),
                ("eos_rate", s["eos_rate"], None), ("duration_ratio", s["duration_ratio"], None)]
        for name in ("words_per_s", "leading_silence_s", "consistency"):
            rows.append((name, s[name], s[f"reference_{name}"]))
        rows.append(("pauses_per_turn", s["pauses_per_turn"], s["reference_pauses_per_turn"]))
        rows.append(("similarity_to_real", s["similarity"], None))
        width = max(len(r[0]) for r in rows)
        lines = [f"{'':<{width}}  {'generated':>10}  {'real':>10}"]
        lines += [f"{n:<{width}}  {_fmt(g):>10}  {_fmt(r) if r is not None else '':>10}" for n, g, r in rows]
        return "\n".join(lines)

    def figure(self, path) -> None:
        """A PNG: generated against real duration per turn, and consistency per speaker role."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        s = self.summary()
        fig, (ax_len, ax_voice) = plt.subplots(1, 2, figsize=(11, 4.5))
        for ended, color, label in ((True, "tab:blue", "ended by itself"), (False, "tab:red", "cut at the limit")):
            rows = [r for r in self.turns if r.ended_by_itself is ended]
            ax_len.scatter([r.reference_duration_s for r in rows], [r.duration_s for r in rows], color=color,
                           label=label, s=18)
        top = max([r.duration_s for r in self.turns] + [r.reference_duration_s for r in self.turns] + [1.0])
        ax_len.plot([0, top], [0, top], color="grey", linewidth=0.8)
        ax_len.set(xlabel="real turn (s)", ylabel="generated turn (s)",
                   title=f"turn lengths (EOS rate {_fmt(s['eos_rate'])})")
        ax_len.legend(loc="upper left")
        speakers = list(s["speakers"])
        x = np.arange(len(speakers))
        for offset, key, label in ((-0.27, "consistency", "generated"), (0.0, "reference_consistency", "real"),
                                   (0.27, "similarity", "generated vs real")):
            values = [s["speakers"][k][key] if s["speakers"][k][key] is not None else 0.0 for k in speakers]
            ax_voice.bar(x + offset, values, width=0.27, label=label)
        ax_voice.set_xticks(x, [f"speaker {k}" for k in speakers])
        ax_voice.set(ylim=(0, 1), ylabel="cosine", title="voice consistency per speaker")
        ax_voice.legend(loc="lower right")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.3f}"
    return str(value)


def conversations_from_dataset(dataset, split: str = "validation", max_conversations: int | None = None,
                               min_turns: int = 2) -> list[Conversation]:
    """The conversations of a prepared dataset's split (a `PreparedDataset` or its folder), their
    turns as segments holding the stored Mimi codes. Single clips (no conversation) are left out:
    with fewer than `min_turns` turns there is no context and no consistency to measure."""
    from csm.training.data import PreparedDataset

    if not isinstance(dataset, PreparedDataset):
        dataset = PreparedDataset.open(dataset)
    conversations = []
    for stored in dataset.stored_examples(split):
        turns = [Segment(t["speaker"], t["text"], codes=np.asarray(dataset.codes(t["key"])))
                 for t in stored["turns"]]
        if len(turns) >= min_turns:
            conversations.append(Conversation(stored["id"], turns))
        if max_conversations is not None and len(conversations) >= max_conversations:
            break
    if not conversations:
        raise CsmError(f"the {split} split of {dataset.root} holds no conversation of {min_turns} or more turns; "
                       "prepare conversational data (a JSONL manifest with `conversation`, or Switchboard) "
                       "or choose another --split")
    return conversations


def evaluate_conversations(generator, conversations: Sequence[Conversation], seed: int = 0,
                           temperature: float | None = None, topk: int | None = None,
                           limit_factor: float = LIMIT_FACTOR, limit_margin_s: float = LIMIT_MARGIN_S,
                           on_turn=None) -> ConversationReport:
    """Generate every turn of every conversation after the first, with the real turns before it as
    context (as many as fit, oldest dropped first), and measure (see the module docstring).
    `on_turn(done, total)` is called after each turn (for a progress bar). Turn k of a
    conversation is sampled with seed `seed + k`, so a report is reproducible."""
    from csm.evaluation import ANALYSIS_RATE, evaluate, speaker_embedding
    from csm.mimi_files import SAMPLE_RATE

    total = sum(len(c.turns) - 1 for c in conversations)
    report = ConversationReport()
    done = 0
    for conv in conversations:
        # each real turn is encoded (or decoded) once: the context takes codes, the measures audio
        real_audio = [_real_audio(generator, t) for t in conv.turns]
        coded = [t if t.codes is not None else Segment(t.speaker, t.text, codes=generator.encode(a))
                 for t, a in zip(conv.turns, real_audio, strict=True)]
        real_emb = [speaker_embedding(_at(a, ANALYSIS_RATE)) for a in real_audio]
        generated: dict[int, tuple[TurnResult, np.ndarray]] = {}  # turn index -> (result, embedding)
        for k in range(1, len(coded)):
            turn, real = coded[k], real_audio[k]
            real_s = len(real) / SAMPLE_RATE
            limit_ms = (limit_factor * real_s + limit_margin_s) * 1000
            context = _fitting_context(generator, turn, coded[:k], limit_ms)
            codes = generator.generate_codes(turn.text, turn.speaker, context, max_audio_length_ms=limit_ms,
                                             temperature=temperature, topk=topk, seed=seed + k)
            max_frames = int(limit_ms // FRAME_MS)
            audio = generator.decode(codes)
            ended = len(codes) < max_frames
            if len(audio) == 0:  # an immediate end of speech: nothing to measure but the verdict
                audio = np.zeros(SAMPLE_RATE // 10, dtype=np.float32)
            gen_report = evaluate(audio, SAMPLE_RATE, text=turn.text, pitch=False)
            real_report = evaluate(real, SAMPLE_RATE, text=turn.text, pitch=False)
            result = TurnResult(
                conversation=conv.id, turn=k, speaker=int(turn.speaker), text=turn.text, ended_by_itself=ended,
                duration_s=len(codes) * FRAME_MS / 1000, reference_duration_s=real_s,
                words_per_s=gen_report.words_per_s, reference_words_per_s=real_report.words_per_s,
                pause_count=gen_report.pause_count, reference_pause_count=real_report.pause_count,
                leading_silence_s=gen_report.leading_silence_s,
                reference_leading_silence_s=real_report.leading_silence_s, context_turns=len(context))
            generated[k] = (result, speaker_embedding(_at(audio, ANALYSIS_RATE)))
            report.turns.append(result)
            done += 1
            if on_turn is not None:
                on_turn(done, total)
        for k, (result, emb) in generated.items():
            role = [j for j, t in enumerate(coded) if t.speaker == coded[k].speaker]
            other_real = [real_emb[j] for j in role if j != k]
            other_generated = [generated[j][1] for j in role if j != k and j in generated]
            result.similarity = _cosine(emb, np.mean([real_emb[j] for j in role], axis=0))
            if other_real:
                result.reference_consistency = _cosine(real_emb[k], np.mean(other_real, axis=0))
            if other_generated:
                result.consistency = _cosine(emb, np.mean(other_generated, axis=0))
    return report


def _real_audio(generator, turn: Segment) -> np.ndarray:
    if turn.codes is not None:
        return generator.decode(turn.codes)
    if turn.audio is None:
        raise CsmError(f"the turn {turn.text[:40]!r} has neither audio nor codes: a conversation to evaluate is "
                       "real speech")
    from csm.audio import as_samples

    return np.asarray(as_samples(turn.audio), dtype=np.float32)


def _fitting_context(generator, turn: Segment, earlier: list[Segment], limit_ms: float) -> list[Segment]:
    """The newest whole turns of `earlier` that fit the prompt with room for `limit_ms` of audio."""
    room = generator.context_room(turn.text, turn.speaker, int(limit_ms // FRAME_MS))
    if room <= 0:
        raise CsmError(f"the turn {turn.text[:40]!r} alone does not fit the model's "
                       f"{generator.config.backbone.max_seq_len} positions with room for its audio")
    sizes = [segment_positions(generator.tokenizer, s) for s in earlier]
    return [earlier[i] for i in newest_that_fit(sizes, room, contiguous=True)]


def _at(audio: np.ndarray, rate: int) -> np.ndarray:
    from csm.audio import resample
    from csm.mimi_files import SAMPLE_RATE

    return resample(np.asarray(audio, dtype=np.float32), SAMPLE_RATE, rate)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))


__all__ = ["Conversation", "ConversationReport", "TurnResult", "conversations_from_dataset", "evaluate_conversations"]
