"""Conversational evaluation on the tiny random model: real turns spoken by two espeak-ng voices
(made offline) are the context and the reference; the model's turns are measured against them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf

import csm
from csm.audio import resample
from csm.conversation_eval import Conversation, conversations_from_dataset, evaluate_conversations
from csm.errors import CsmError
from csm.prompt import Segment
from fakes.speech import FEMALE, MALE, require_espeak, speak

pytest.importorskip("resemblyzer", reason="needs the eval extra: pip install 'csm-speech[eval]'")

pytestmark = pytest.mark.usefixtures("torch_single_thread")

LINES = [
    (0, "Did you see the game last night?"),
    (1, "I did, it was a close one."),
    (0, "They nearly lost it at the end."),
    (1, "My brother was shouting."),
]
LIMIT = dict(limit_factor=1.0, limit_margin_s=0.5)  # short turns: the tiny random model rarely stops


@pytest.fixture(scope="module")
def gen(tiny_model_dir):
    return csm.load(str(tiny_model_dir), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def talk(tmp_path_factory):
    """Four real turns, speaker 0 and 1 in two clearly different espeak voices, at 24 kHz."""
    require_espeak()
    folder = tmp_path_factory.mktemp("talk")
    turns = []
    for i, (speaker, text) in enumerate(LINES):
        audio, rate = speak(folder / f"{i}.wav", text, MALE if speaker == 0 else FEMALE)
        turns.append(Segment(speaker, text, audio=resample(audio, rate, 24_000)))
    return Conversation("game", turns)


@pytest.fixture(scope="module")
def report(gen, talk):
    calls = []
    result = evaluate_conversations(gen, [talk], seed=3, on_turn=lambda done, total: calls.append((done, total)),
                                    **LIMIT)
    result.calls = calls
    return result


def test_every_later_turn_is_generated_and_measured(report, talk):
    assert [(r.turn, r.speaker, r.text) for r in report.turns] == [(k, *LINES[k]) for k in range(1, 4)]
    assert report.calls == [(k, 3) for k in range(1, 4)]
    for r in report.turns:
        real_s = len(talk.turns[r.turn].audio) / 24_000
        assert r.reference_duration_s == pytest.approx(real_s)
        limit_s = real_s + 0.5
        # a turn that ended by itself stopped before its limit; one cut at the limit ran to it
        ran_to_limit = r.duration_s == pytest.approx(limit_s, abs=0.08)
        assert (r.duration_s < limit_s - 0.08) if r.ended_by_itself else ran_to_limit
        assert r.reference_words_per_s is not None and r.reference_words_per_s > 0
        assert 1 <= r.context_turns <= r.turn


def _assert_newest_that_fit(gen, conversation, report):
    """Each turn's context is the newest earlier turns that fit, and one more would not have."""
    coded = [Segment(t.speaker, t.text, codes=gen.encode(t.audio)) for t in conversation.turns]
    for r in report.turns:
        room = 256 - int((r.reference_duration_s + 0.5) * 1000 // 80)  # the tiny model's 256 positions
        turn, earlier = coded[r.turn], coded[:r.turn]
        assert len(gen.prompt(turn.text, turn.speaker, earlier[r.turn - r.context_turns:])) < room
        if r.context_turns < r.turn:
            assert len(gen.prompt(turn.text, turn.speaker, earlier[r.turn - r.context_turns - 1:])) >= room


def test_context_is_the_newest_turns_that_fit(report, gen, talk):
    _assert_newest_that_fit(gen, talk, report)
    # a first turn longer than the positions can hold is dropped whole, never cut
    long = Segment(0, "All of it at once.", audio=np.concatenate([t.audio for t in talk.turns] * 2))
    conversation = Conversation("long", [long, talk.turns[0], talk.turns[1]])
    trimmed = evaluate_conversations(gen, [conversation], seed=1, **LIMIT)
    assert [r.context_turns for r in trimmed.turns] == [0, 1]
    _assert_newest_that_fit(gen, conversation, trimmed)


def test_real_turns_are_consistent_per_speaker(report):
    # each speaker's real turns sound like that speaker's other real turns
    for r in report.turns:
        assert r.reference_consistency is not None and r.reference_consistency > 0.6
        assert r.similarity is not None and -1.0 <= r.similarity <= 1.0
    # generated turns are compared with the same speaker's other generated turns: speaker 1 has two
    by_turn = {r.turn: r for r in report.turns}
    assert by_turn[2].consistency is None
    assert -1.0 <= by_turn[1].consistency <= 1.0 and by_turn[1].consistency == pytest.approx(by_turn[3].consistency)
    summary = report.summary()
    assert set(summary["speakers"]) == {"0", "1"} and summary["turns"] == 3
    assert summary["eos_rate"] == sum(r.ended_by_itself for r in report.turns) / 3


def test_report_is_reproducible_and_writes_json_table_and_figure(gen, talk, report, tmp_path):
    again = evaluate_conversations(gen, [Conversation("game", talk.turns[:2])], seed=3, **LIMIT)
    assert again.turns[0].duration_s == report.turns[0].duration_s
    json.dumps(report.to_dict())  # JSON-ready
    table = report.table()
    assert "eos_rate" in table and "consistency" in table
    report.figure(tmp_path / "conv.png")
    assert (tmp_path / "conv.png").read_bytes()[:4] == b"\x89PNG"


def test_conversations_from_a_prepared_dataset_and_the_cli(tiny_model_dir, tmp_path, capsys):
    from csm.training.data import prepare_dataset

    rate = 24_000
    t = np.arange(int(2.0 * rate)) / rate
    sf.write(str(tmp_path / "talk.wav"), (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), rate)
    rows = [{"audio": "talk.wav", "text": f"turn {k}", "speaker": k % 2, "conversation": "c0",
             "start": 0.5 * k, "end": 0.5 * k + 0.5} for k in range(3)]
    rows.append({"audio": "talk.wav", "text": "a single clip", "speaker": 0, "start": 0.0, "end": 0.5})
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    dataset = prepare_dataset(tmp_path / "m.jsonl", output_dir=tmp_path / "prepared", model_path=tiny_model_dir,
                              validation_split=0.0)
    (conversation,) = conversations_from_dataset(dataset, split="train")
    assert [(s.speaker, s.text) for s in conversation.turns] == [(k % 2, f"turn {k}") for k in range(3)]
    stored = dataset.stored_examples("train")
    keys = [t["key"] for e in stored for t in e["turns"] if len(e["turns"]) == 3]
    for segment, key in zip(conversation.turns, keys, strict=True):
        assert segment.audio is None and np.array_equal(segment.codes, dataset.codes(key))
    with pytest.raises(CsmError, match="no conversation"):
        conversations_from_dataset(dataset, split="validation")

    # the same from the command line: a table, JSON and a figure; bad inputs are one error line
    from csm.cli.evaluate import main

    out = tmp_path / "conv.json"
    main(["--conversations", str(tmp_path / "prepared"), "--model", str(tiny_model_dir), "--split", "train",
          "--backend", "torch", "--device", "cpu", "--json", str(out), "--figure", str(tmp_path / "conv.png")])
    assert "eos_rate" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["summary"]["turns"] == 2 and [t["turn"] for t in data["turns"]] == [1, 2]
    for args in (["--conversations", str(tmp_path / "prepared")],  # no --model
                 ["--conversations", str(tmp_path / "prepared"), "--model", str(tiny_model_dir)],  # no validation
                 ["--conversations", str(tmp_path), "--model", str(tiny_model_dir)],  # not a prepared dataset
                 [str(out), "--conversations", str(tmp_path / "prepared")]):  # FILE and --conversations
        with pytest.raises(SystemExit) as exc:
            main(args)
        assert exc.value.code == 2
        assert capsys.readouterr().err.count("error:") == 1
