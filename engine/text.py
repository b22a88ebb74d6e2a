"""Text in and out through a model folder's ``tokenizer.json``, with the
``tokenizers`` package (the ``text`` extra: ``pip install 'kvcache-xp[text]'``).
"""

from __future__ import annotations

import os
from pathlib import Path

from .checkpoint import CheckpointError

__all__ = ["TextStream", "Tokenizer", "load_tokenizer"]

TOKENIZER_NAME = "tokenizer.json"


class Tokenizer:
    """A ``tokenizer.json`` loaded with the ``tokenizers`` package."""

    def __init__(self, path: str | os.PathLike) -> None:
        try:
            import tokenizers
        except ImportError:
            raise ImportError(
                "text needs the 'tokenizers' package: pip install 'kvcache-xp[text]'"
            ) from None
        file = Path(path)
        if file.is_dir():
            file = file / TOKENIZER_NAME
        elif not file.exists() and not file.parent.is_dir():
            raise CheckpointError(f"{file}: no such file or folder")
        if not file.is_file():
            raise CheckpointError(f"{file.parent}: no {file.name}")
        try:
            self._tokenizer = tokenizers.Tokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises its own Exception type on bad files
            raise CheckpointError(
                f"{file}: not a tokenizer the tokenizers package reads: {e}"
            ) from e
        self.path = file

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text`` (with the BOS token when the tokenizer adds one)."""
        return list(self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: list[int], *, skip_special_tokens: bool = True) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def stream(self, context: list[int] = ()) -> TextStream:
        """A decoder for tokens arriving one at a time, continuing after ``context``
        (the prompt's ids: its last tokens give the first new one its leading space)."""
        return TextStream(self, context)


class TextStream:
    """Incremental detokenization: ``push(token)`` returns the text that token
    completes ("" while it ends inside a multi-byte character).

    Each step decodes only a short window (the tokens since the last emitted text,
    plus those before it for context), never the whole sequence, so spaces that a
    decoder attaches to word starts come out right and the cost stays linear.
    """

    def __init__(self, tokenizer: Tokenizer, context: list[int] = ()) -> None:
        self._decode = tokenizer.decode
        self._ids: list[int] = [int(t) for t in list(context)[-8:]]  # not emitted
        self._prefix = 0  # window start: context for the decoder
        self._read = len(self._ids)  # tokens before this are emitted (or context)

    def push(self, token: int) -> str:
        self._ids.append(int(token))
        before = self._decode(self._ids[self._prefix : self._read])
        text = self._decode(self._ids[self._prefix :])
        if len(text) > len(before) and not text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return text[len(before) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        before = self._decode(self._ids[self._prefix : self._read])
        text = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return text[len(before) :]


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """The tokenizer of a model folder (its ``tokenizer.json``) or of a file."""
    return Tokenizer(path)
