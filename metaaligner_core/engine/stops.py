"""Stop texts: generation ends where the output first contains one of them, and the text before it
is the answer (the ``stop`` of OpenAI's completions API).

The aligner uses its template's markers (:func:`~metaaligner_core.templates.stop_texts`). Three
places apply them, with one meaning: the batched decoding loop checks each row's last tokens
(:func:`tail_check`) and :func:`cut_at_stop` trims the decoded text; a stream of text deltas goes
through :class:`StopCut`, which holds back what could be the start of a stop until it is decided.
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator, Sequence


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to its first stop, and whether one was found."""
    at = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return (text[:min(at)], True) if at else (text, False)


class StopCut:
    """Text deltas in, the deltas of the text before the first stop out.

    >>> cut = StopCut(["| Edit"])
    >>> [cut.feed(d) for d in ["A b |", " Ed", "it: A b"]], cut.hit
    (['A b ', '', ''], True)
    """

    def __init__(self, stops: Sequence[str] = ()):
        self.stops = tuple(s for s in stops if s)
        self.pending = ""
        self.hit = False

    def feed(self, delta: str) -> str:
        if self.hit:
            return ""
        if not self.stops:
            return delta
        text, self.hit = cut_at_stop(self.pending + delta, self.stops)
        if self.hit:
            self.pending = ""
            return text
        hold = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self.pending = text[len(text) - hold:] if hold else ""
        return text[:len(text) - hold]

    def finish(self) -> str:
        """What was held back, when the text ended without a stop."""
        rest, self.pending = ("" if self.hit else self.pending), ""
        return rest


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
    """``check(row, output ids)``: True once row's output contains one of ``stops[row]``.

    Only the last few tokens are decoded (enough to hold the longest stop): checked after every
    token, a stop is found at the step that completes it. None when no row has a stop.
    """
    if not stops or not any(stops):
        return None
    longest = max(len(tokenizer(s, add_special_tokens=False).input_ids) for row in stops for s in row)
    window = longest + 2  # tokens merged across the stop's edges

    def check(row: int, out: list[int]) -> bool:
        mine = stops[row]
        if not mine or not out:
            return False
        tail = tokenizer.decode(out[-window:], skip_special_tokens=True)
        return any(s in tail for s in mine)

    return check
