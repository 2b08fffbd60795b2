"""Streaming detokenisation: token ids in, text deltas out, in time linear in the tokens.

:class:`IncrementalText` decodes only a short window of recent tokens per call (the prefix-offset
technique of transformers' ``TextStreamer`` and vLLM's detokenizer): the text of the tokens
already sent since the last *prefix offset* is decoded alongside the same tokens plus the new
ones, and the difference is the delta. A delta whose text ends in U+FFFD (a multi-byte character
split across tokens: emoji, CJK) is held back until the character is complete. The window only
covers tokens since the last delta, so each token is decoded a bounded number of times.

It decodes with the tokenizer's own ``decode`` (not ``tokenizers``' ``DecodeStream``) so that the
same post-processing (``clean_up_tokenization_spaces``, SentencePiece's leading space, slow
tokenizers) applies as to a whole decoding; :meth:`IncrementalText.finish` decodes the whole
answer once and sends whatever the windows had not, so the joined deltas equal
``tokenizer.decode(ids, skip_special_tokens=...)``.
"""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)


class IncrementalText:
    """Token ids → text deltas. ``skip_ids`` (e.g. end-of-sequence ids) are dropped before
    decoding; ``skip_special_tokens`` goes to ``tokenizer.decode``."""

    def __init__(self, tokenizer, skip_ids=(), skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = set(skip_ids)
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.sent = ""  # the text handed out so far
        self._prefix = 0  # ids[_prefix:_read] is the context decoded before the new tokens
        self._read = 0  # tokens whose text has been handed out

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, *tokens: int) -> str:
        """The new text after ``tokens`` (possibly empty: an incomplete character is held back)."""
        n = len(self.ids)
        self.ids.extend(int(t) for t in tokens if int(t) not in self.skip)
        if len(self.ids) == n:
            return ""
        before = self._decode(self.ids[self._prefix:self._read]) if self._read > self._prefix else ""
        after = self._decode(self.ids[self._prefix:])
        if len(after) > len(before) and after.startswith(before) and not after.endswith("\ufffd"):
            delta = after[len(before):]
            self._prefix, self._read = self._read, len(self.ids)
            self.sent += delta
            return delta
        return ""

    def finish(self) -> str:
        """The rest of the text: one decoding of the whole answer, minus what was sent."""
        text = self._decode(self.ids)
        self._prefix = self._read = len(self.ids)
        if not text.startswith(self.sent):  # the windows' text diverged from the whole (not seen so far)
            log.debug("streamed text diverged from the final decoding")
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta
