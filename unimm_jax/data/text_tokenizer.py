"""The text tokenizer of a checkpoint directory: `tokenizer.json` read with `tokenizers`.

Janus checkpoints ship a HuggingFace fast tokenizer; the shapes world trains its own
word-level one (data/shapes_vocab.py) and saves it beside the model the same way, so
sampling and training read text through this one class.
"""
from __future__ import annotations

import os
from typing import Sequence

TOKENIZER_FILE = "tokenizer.json"


class TextTokenizer:
    """Thin wrapper over `tokenizers.Tokenizer` with BOS handling done by us, not the post-processor.

    encode(text) -> list[int] with no special tokens added; callers add BOS where the
    DeepSeek template puts it (chat_format.py).
    """

    def __init__(self, tokenizer, path: str | None = None):
        self._tok = tokenizer
        self.path = path

    @classmethod
    def from_file(cls, path: str) -> "TextTokenizer":
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(path), path)

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def save(self, path: str) -> None:
        self._tok.save(path)


def load_text_tokenizer(checkpoint_dir: str) -> TextTokenizer:
    """Reads `checkpoint_dir/tokenizer.json`; a clear error when it is missing."""
    path = os.path.join(checkpoint_dir, TOKENIZER_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"no {TOKENIZER_FILE} in {checkpoint_dir!r}: text prompts need the checkpoint's tokenizer. "
            f"Copy the tokenizer.json of the released model (or the one unimm-train wrote into "
            f"WORKDIR/model) into that directory, or pass token ids directly through the Python API."
        )
    return TextTokenizer.from_file(path)
