"""Incremental detokenization: text out as tokens come, never half a UTF-8 character, never a
word-piece boundary artefact. Decodes a short window of the ids (as TGI and vLLM do) rather than the
whole sequence at every step."""

from __future__ import annotations

from typing import Any


class IncrementalDecoder:
    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # start of the window whose text has already been emitted
        self._read = 0  # end of that window

    def push(self, token_id: int) -> str:
        """Add a token; the new text it completes (maybe empty)."""
        self._ids.append(token_id)
        before = self._tokenizer.decode(self._ids[self._prefix:self._read], skip_special_tokens=False)
        after = self._tokenizer.decode(self._ids[self._prefix:], skip_special_tokens=False)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        before = self._tokenizer.decode(self._ids[self._prefix:self._read], skip_special_tokens=False)
        after = self._tokenizer.decode(self._ids[self._prefix:], skip_special_tokens=False)
        self._prefix = self._read = len(self._ids)
        return after[len(before):]
