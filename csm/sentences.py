"""Long text -> turns short enough for CSM to speak well, cut at sentence ends.

CSM keeps a voice steady over a sentence or two; a paragraph spoken as one turn drifts and may
not fit the model's positions. `split_turns` cuts text at sentence ends and packs whole sentences
into turns of at most `max_chars` characters; only a single sentence longer than that is cut
inside, at a clause mark (, ; : and dashes) where it can, else between words.

    split_turns("First one. Second one! A third?", max_chars=20)
    # ['First one.', 'Second one!', 'A third?']

`csm.longform` speaks such turns one after another, each with the previous ones as context.
"""

from __future__ import annotations

import re

from csm.errors import CsmError

DEFAULT_TURN_CHARS = 200  # about 12 s of speech: long enough to sound natural, short enough not to drift

# a run of end marks, then any closing quotes or brackets; a split needs whitespace after it
_SENTENCE_END = re.compile(r"[.!?\u2026\u3002\uff01\uff1f]+[\"'\u201d\u2019\u00bb)\]]*(?=\s|$)")
_CLAUSE_END = re.compile(r"[,;:\u2014\u2013]+(?=\s)|\s-\s")
# titles that end in a period but hardly ever end a sentence ("Dr. Smith")
_TITLES = frozenset({"mr", "mrs", "ms", "dr", "prof", "st", "sr", "jr", "vs", "mt"})


def split_sentences(text: str) -> list[str]:
    """The sentences of `text`, whitespace collapsed. A period followed by a lower-case letter or
    a digit ("e.g. this", "No. 5"), or after a title ("Dr. Smith"), does not end a sentence."""
    if not isinstance(text, str):
        raise CsmError(f"text must be a string, got {type(text).__name__}")
    text = " ".join(text.split())
    sentences, start = [], 0
    for match in _SENTENCE_END.finditer(text):
        following = text[match.end():].lstrip()[:1]
        if following and (following.islower() or following.isdigit()):
            continue
        word = text[:match.start()].rsplit(" ", 1)[-1].lower()
        if match.group() == "." and word in _TITLES:
            continue
        piece = text[start:match.end()].strip()
        if piece:
            sentences.append(piece)
        start = match.end()
    rest = text[start:].strip()
    if rest:
        sentences.append(rest)
    return sentences


def split_turns(text: str, max_chars: int = DEFAULT_TURN_CHARS) -> list[str]:
    """Whole sentences packed into turns of at most `max_chars` characters (see the module)."""
    if isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars < 8:
        raise CsmError(f"max_chars must be a whole number >= 8, got {max_chars!r}")
    turns: list[str] = []
    for sentence in split_sentences(text):
        for piece in _cut(sentence, max_chars):
            if turns and len(turns[-1]) + 1 + len(piece) <= max_chars:
                turns[-1] = f"{turns[-1]} {piece}"
            else:
                turns.append(piece)
    return turns


def _cut(sentence: str, max_chars: int) -> list[str]:
    """A sentence as pieces of at most `max_chars`: at the last clause mark that fits, else the
    last space, else (one unbroken word) at `max_chars`."""
    pieces = []
    while len(sentence) > max_chars:
        head = sentence[: max_chars + 1]
        clauses = [m.end() for m in _CLAUSE_END.finditer(head) if m.end() <= max_chars]
        cut = clauses[-1] if clauses and clauses[-1] >= max_chars // 3 else head.rfind(" ")
        if cut <= 0:
            cut = max_chars
        pieces.append(sentence[:cut].strip())
        sentence = sentence[cut:].strip()
    if sentence:
        pieces.append(sentence)
    return pieces
