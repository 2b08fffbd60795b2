"""Stop texts: generation ends where the output first contains one of them, and the text before it
is the answer (the ``stop`` of OpenAI's completions API).

The aligner uses its template's markers (:func:`~metaaligner_core.templates.stop_texts`). Three
places apply them, with one meaning: the batched decoding loop checks each row's last tokens
(:func:`tail_check`) and :func:`cut_at_stop` trims the decoded text; a stream of text deltas goes
through :class:`StopCut`, which holds back what could be the start of a stop until it is decided.

**Loops.** Stop texts that carry the draft (:class:`Stops`) also end a correction that loops: once
it has written one sentence (four or more words; case and punctuation ignored) three times and at
least twice more than the draft has it, generation stops at the end of that sentence, and the text
up to there is the answer (:func:`loop_end`). An edit of a draft has no reason to write a sentence
of its own over and over; a small aligner that loses its place in a draft can, until the token
limit. The same three places apply it, with the same result.
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Callable, Iterable, Iterator, Sequence

# a sentence: up to . ! or ? followed by white space, or a line's text before its newline
_UNIT = re.compile(r"[^\n]*?[.!?](?=\s)|[^\n]+(?=\n)")
_WORD = re.compile(r"\w+")
LOOP_MIN_WORDS = 4


def _units(text: str, final: bool = True) -> Iterator[tuple[str, int]]:
    """``(normalised sentence, end offset)`` of each complete sentence of 4+ words; ``final``: the
    text has ended, so its last sentence is complete too."""
    for m in _UNIT.finditer(text + "\n" if final else text):
        words = _WORD.findall(m.group(0).lower())
        if len(words) >= LOOP_MIN_WORDS:
            yield " ".join(words), min(m.end(), len(text))


def sentence_counts(text: str) -> Counter:
    """How often each sentence of 4+ words occurs in ``text`` (normalised as :func:`loop_end` does)."""
    return Counter(u for u, _ in _units(text))


def loop_end(text: str, draft: Counter | str, final: bool = True) -> int | None:
    """Where ``text`` has written one sentence three times and twice more than ``draft`` has it:
    the offset just after that copy, or None."""
    counts = sentence_counts(draft) if isinstance(draft, str) else draft
    seen: Counter = Counter()
    for unit, end in _units(text, final):
        seen[unit] += 1
        if seen[unit] >= max(3, counts[unit] + 2):
            return end
    return None


class Stops(tuple):
    """Stop texts that also stop a loop beyond ``draft`` (see the module's docstring).

    >>> Stops(["| Edit"], draft="A b c d.").draft_counts
    Counter({'a b c d': 1})
    """

    def __new__(cls, texts: Iterable[str] = (), *, draft: str = ""):
        self = super().__new__(cls, texts)
        self.draft_counts = sentence_counts(draft)
        return self

    def __getnewargs__(self):
        return (tuple(self),)


def _counts(stops) -> Counter | None:
    return getattr(stops, "draft_counts", None)


def cut_at_loop(text: str, stops) -> tuple[str, bool]:
    """``text`` up to the end of a loop (:func:`loop_end`) when ``stops`` carries a draft, and
    whether it looped."""
    counts = _counts(stops)
    end = loop_end(text, counts) if counts is not None else None
    return (text, False) if end is None else (text[:end], True)


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to its first stop, and whether one was found."""
    at = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return (text[:min(at)], True) if at else (text, False)


class StopCut:
    """Text deltas in, the deltas of the text before the first stop out (up to the end of a loop,
    when ``stops`` carries a draft: :class:`Stops`).

    >>> cut = StopCut(["| Edit"])
    >>> [cut.feed(d) for d in ["A b |", " Ed", "it: A b"]], cut.hit
    (['A b ', '', ''], True)
    """

    def __init__(self, stops: Sequence[str] = ()):
        self.stops = tuple(s for s in stops if s)
        self.counts = _counts(stops)
        self.text = ""  # everything fed, before any cut
        self.sent = 0  # characters of it given out
        self.hit = False
        self.looped = False

    def _give(self, end: int) -> str:
        out, self.sent = self.text[self.sent:end], max(self.sent, end)
        return out

    def feed(self, delta: str) -> str:
        if self.hit:
            return ""
        self.text += delta
        if not self.stops and self.counts is None:
            return self._give(len(self.text))
        before, self.hit = cut_at_stop(self.text, self.stops)
        end = len(before)
        if self.counts is not None and (self.hit or any(c in self.text[-len(delta) - 2:] for c in ".!?\n")):
            at = loop_end(self.text[:end], self.counts, final=self.hit)  # before a marker the text has ended
            if at is not None:
                end, self.hit, self.looped = at, True, True
        if self.hit:
            return self._give(end)
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
        return self._give(len(self.text) - hold)

    def finish(self) -> str:
        """What was held back, when the text ended without a stop (up to a loop's end)."""
        if self.hit:
            return ""
        end = len(self.text)
        if self.counts is not None:
            at = loop_end(self.text, self.counts, final=True)
            if at is not None:
                end, self.hit, self.looped = at, True, True
        return self._give(end)


def cut_stream(deltas: Iterable[str], stops: Sequence[str]) -> Iterator[str]:
    """``deltas`` up to the first stop; on a stop the source iterator is closed (its row stops)."""
    it = iter(deltas)
    cut = StopCut(stops)
    try:
        for d in it:
            out = cut.feed(d)
            if out:
                yield out
            if cut.hit:
                return
        rest = cut.finish()
        if rest:
            yield rest
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()


def tail_check(tokenizer, stops: Sequence[Sequence[str]] | None) -> Callable[[int, list[int]], bool] | None:
    """``check(row, output ids)``: True once row's output contains one of ``stops[row]``, or
    loops (when ``stops[row]`` is a :class:`Stops`).

    Only the last few tokens are decoded (enough to hold the longest stop): checked after every
    token, a stop is found at the step that completes it. A loop is looked for (the whole output
    decoded) only when the last tokens end a sentence or a line. None when no row has a stop.
    """
    if not stops or not any(s or _counts(s) is not None for s in stops):
        return None
    texts = [s for row in stops for s in row]
    longest = max((len(tokenizer(s, add_special_tokens=False).input_ids) for s in texts), default=0)
    window = max(longest, 1) + 2  # tokens merged across the stop's edges

    def check(row: int, out: list[int]) -> bool:
        mine = stops[row]
        if not out or (not mine and _counts(mine) is None):
            return False
        tail = tokenizer.decode(out[-window:], skip_special_tokens=True)
        if any(s in tail for s in mine):
            return True
        counts = _counts(mine)
        if counts is None or not any(c in tokenizer.decode(out[-2:], skip_special_tokens=True) for c in ".!?\n"):
            return False
        return loop_end(tokenizer.decode(out, skip_special_tokens=True), counts, final=False) is not None

    return check
