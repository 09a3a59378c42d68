"""The Llama-3.2 text tokenizer and CSM's text template.

A turn's text is `"[{speaker}]{text}"` (no space after `]`) wrapped as
`<|begin_of_text|> ... <|end_of_text|>`. The real `tokenizer.json` already adds
`<|begin_of_text|>` in its post-processor, so the ids are assembled here from the bare encoding:
the template holds whatever post-processor a tokenizer file carries.
"""

from __future__ import annotations

import os
from pathlib import Path

from csm.errors import CsmError

DEFAULT_TOKENIZER_REPO = "unsloth/Llama-3.2-1B"  # ungated copy of meta-llama/Llama-3.2-1B's tokenizer
TOKENIZER_ENV = "CSM_TOKENIZER"
TOKENIZER_FILE = "tokenizer.json"
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"


class TextTokenizer:
    def __init__(self, tokenizer):
        self._tok = tokenizer
        self.bos_id = tokenizer.token_to_id(BOS)
        self.eos_id = tokenizer.token_to_id(EOS)
        if self.bos_id is None or self.eos_id is None:
            raise CsmError(f"the tokenizer has no {BOS} / {EOS} tokens: it is not a Llama-3 tokenizer")

    @classmethod
    def from_file(cls, path: str | Path) -> TextTokenizer:
        from tokenizers import Tokenizer

        try:
            return cls(Tokenizer.from_file(str(path)))
        except Exception as exc:
            raise CsmError(f"cannot read tokenizer {path}: {exc}") from None

    @property
    def vocab_size(self) -> int:
        """Ids the tokenizer can produce, its special tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode_turn(self, text: str, speaker: int) -> list[int]:
        ids = self._tok.encode(f"[{speaker}]{text}", add_special_tokens=False).ids
        return [self.bos_id, *ids, self.eos_id]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)


def load_tokenizer(model_dir: Path | None, tokenizer: str | None = None) -> TextTokenizer:
    """`tokenizer` (a tokenizer.json, a folder holding one, or a Hub repo id), else the model
    folder's tokenizer.json, else $CSM_TOKENIZER, else the Hub (`unsloth/Llama-3.2-1B`)."""
    in_model_dir = model_dir / TOKENIZER_FILE if model_dir else None
    source = tokenizer or (str(in_model_dir) if in_model_dir and in_model_dir.is_file() else None)
    source = source or os.environ.get(TOKENIZER_ENV) or DEFAULT_TOKENIZER_REPO
    path = Path(source)
    if path.is_dir():
        path = path / TOKENIZER_FILE
    if path.is_file():
        return TextTokenizer.from_file(path)
    if path.suffix == ".json" or source.startswith((".", "/")) or source.count("/") != 1:
        raise CsmError(f"tokenizer not found: {source}")
    from csm.hub import hub_file

    return TextTokenizer.from_file(hub_file(source, TOKENIZER_FILE, what="the Llama-3.2 tokenizer"))
