"""Objectives a program can check, seeded degradations of clean drafts, and the pairs they make.

The tiny aligner (``training/tiny/README.md``) learns four objectives whose violation a short
pure function can detect in a text:

* **Repetition**: a sentence of the draft stated twice;
* **Length**: stock filler sentences padding the draft;
* **Politeness**: a rude or dismissive remark added to the draft;
* **Formatting**: a sentence in capital letters, or a list flattened into one paragraph.

``check_<key>(text)`` is True when ``text`` is fine on that objective. ``DEGRADERS[key](text, rng)``
breaks one objective of a draft that passes every check and leaves the others fine.
:func:`make_records` turns clean drafts into records of the generic preference layout
(``{"query", "response_1", "response_2", "labels"}``, DESIGN.md) for ``metaaligner build-dataset
--source generic``: ``>`` for the objectives the second response breaks, ``=`` for the others.

Pure functions only (the RNG is passed in): the builder's tests and ``bench/bench_tiny_aligner.py``
use the same checks.
"""
from __future__ import annotations

import difflib
import random
import re
from typing import Callable, Iterable, Sequence

# The paper's way of writing objectives ("Name: the response should ..."). Repetition and Length
# are the exact strings of the paper's unseen objectives (metaaligner_core/objectives.py).
OBJECTIVES: dict[str, str] = {
    "repetition": "Repetition: the response should avoid repetitive statements of one point.",
    "length": "Length: the response should be concise and avoid redundant content.",
    "politeness": "Politeness: the response should be polite and respectful, without rude or dismissive remarks.",
    "formatting": "Formatting: the response should use normal capitalisation and keep list items on separate lines.",
}
KEYS = tuple(OBJECTIVES)

MIN_WORDS, MAX_WORDS = 12, 150  # clean drafts kept for training and evaluation (held-out models write 20-120)
MAX_QUERY_WORDS = 12             # longer queries keep their last words (the question is usually at the end)

# --------------------------------------------------------------------------------------------
# Text helpers

# Sentence ends (". ", "?!", '."') and line breaks: the text between two of them is a piece; the
# pieces that end in a sentence end and hold a letter are sentences ("1." is not). Linear time.
_BOUNDARY = re.compile(r"[.!?]+(?:[\"')\]]+)?|\n")
_LETTER = re.compile(r"[A-Za-z]")
_WORD = re.compile(r"[A-Za-z0-9']+")


def words(text: str) -> list[str]:
    return text.split()


def sentences(text: str) -> list[str]:
    """The sentences of ``text`` (within lines; a sentence ends at . ! or ?), stripped."""
    return [m.group(0).strip() for m in _sentence_matches(text)]


class _Span:
    """A sentence's place in the text (the shape of a ``re.Match`` the degradations use)."""

    def __init__(self, text: str, start: int, end: int):
        self._text, self._start, self._end = text, start, end

    def start(self) -> int:
        return self._start

    def end(self) -> int:
        return self._end

    def group(self, _=0) -> str:
        return self._text[self._start:self._end]


def _sentence_matches(text: str) -> list[_Span]:
    out, start = [], 0
    for b in _BOUNDARY.finditer(text):
        if b.group(0) != "\n" and _LETTER.search(text, start, b.start()):
            lead = len(text[start:b.start()]) - len(text[start:b.start()].lstrip())
            out.append(_Span(text, start + lead, b.end()))
        start = b.end()
    return out


def _norm(s: str) -> str:
    return " ".join(_WORD.findall(s.lower()))


def word_ratio(a: str, b: str, ignore_case: bool = False) -> float:
    """Similarity of two texts as word sequences (difflib ratio; line breaks count as spaces)."""
    wa, wb = (a.lower(), b.lower()) if ignore_case else (a, b)
    return difflib.SequenceMatcher(None, wa.split(), wb.split(), autojunk=False).ratio()


def same_words(a: str, b: str) -> bool:
    """Equal up to whitespace (spaces and line breaks)."""
    return a.split() == b.split()


def short_query(query: str, max_words: int = MAX_QUERY_WORDS) -> str:
    """The query with at most ``max_words`` words: its end kept, "..." in front when cut."""
    w = query.split()
    return query.strip() if len(w) <= max_words else "... " + " ".join(w[-max_words:])


# --------------------------------------------------------------------------------------------
# Checks: True when the text is fine on the objective

def check_repetition(text: str) -> bool:
    """No sentence of four or more words appears twice (case and punctuation ignored)."""
    seen = set()
    for s in sentences(text):
        n = _norm(s)
        if len(n.split()) < 4:
            continue
        if n in seen:
            return False
        seen.add(n)
    return True


FILLERS = (
    "I hope this information is helpful to you.",
    "Please let me know if you have any further questions.",
    "It is important to keep all of this in mind.",
    "In summary, everything said above still applies.",
    "As mentioned before, this is worth thinking about.",
    "Feel free to ask if anything here is unclear.",
    "Thank you for your question, it is a good one.",
    "To put it another way, the points above are what matters.",
    "This is an interesting topic that many people wonder about.",
    "There are many things to consider when thinking about this.",
    "I would be happy to help you with this.",
    "That is a great question to ask.",
    "Overall, the answer depends on many different factors.",
    "Let me explain this in more detail below.",
    "All in all, that is the main idea here.",
    "It is worth noting that this is a common question.",
)
_FILLER_NORMS = tuple(_norm(f) for f in FILLERS)


def check_length(text: str) -> bool:
    """None of the stock filler sentences (:data:`FILLERS`) is in the text."""
    n = " " + _norm(text) + " "
    return not any(" " + f + " " in n for f in _FILLER_NORMS)


RUDE_OPENERS = (
    "Ugh, fine.",
    "Honestly, this is a pretty dumb question.",
    "Seriously? Anyone could figure this out.",
    "Listen, I will say this only once.",
    "Not that you will listen, but here goes.",
    "Wow, you really don't know this?",
)
RUDE_CLOSERS = (
    "Now stop wasting my time.",
    "Figure the rest out yourself.",
    "Don't ask me again.",
    "Try using your brain next time.",
    "That's it, deal with it.",
    "Whatever, it's not my problem.",
)
_RUDE = re.compile(
    r"\bugh\b|\bdumb\b|\bstupid\b|\bidiot|wasting my time|figure (?:the rest|it) out yourself|"
    r"don't ask me again|using your brain|use your brain|deal with it|\bwhatever\b|anyone could figure|"
    r"not that you will listen|say this only once|you really don't know", re.IGNORECASE)


def check_politeness(text: str) -> bool:
    """No rude or dismissive marker (insults, "stop wasting my time", "whatever", ...)."""
    return _RUDE.search(text) is None


_CAPS_RUN = re.compile(r"(?:\b[A-Z][A-Z']+\b[\s,;:]+){3,}\b[A-Z][A-Z']+\b")
_LIST_ITEM = re.compile(r"(?m)^[ \t]*(?:\d{1,2}[.)]|[-*•])[ \t]+\S")
_INLINE_ITEM = re.compile(r"[.!?:;][ \t]+(?:\d{1,2}[.)]|[-*•])[ \t]+[A-Za-z*]")


def check_formatting(text: str) -> bool:
    """No run of four or more words in capitals, and no list item that starts mid-line."""
    return _CAPS_RUN.search(text) is None and _INLINE_ITEM.search(text) is None


CHECKS: dict[str, Callable[[str], bool]] = {
    "repetition": check_repetition,
    "length": check_length,
    "politeness": check_politeness,
    "formatting": check_formatting,
}


def failed(text: str) -> list[str]:
    """The objectives ``text`` breaks."""
    return [k for k, check in CHECKS.items() if not check(text)]


def is_clean(text: str) -> bool:
    return not failed(text)


def usable_draft(text: str) -> bool:
    """A draft the data can use: clean, of modest length, with two sentences of 4+ words."""
    if not isinstance(text, str) or not (MIN_WORDS <= len(words(text)) <= MAX_WORDS):
        return False
    if sum(1 for s in sentences(text) if len(s.split()) >= 4) < 2:
        return False
    return is_clean(text)


# --------------------------------------------------------------------------------------------
# Degradations: each breaks one objective of a draft (rng: random.Random)

def _long_sentences(text: str, n: int = 4) -> list[re.Match]:
    return [m for m in _sentence_matches(text) if len(m.group(0).split()) >= n]


def degrade_repetition(text: str, rng: random.Random) -> str:
    """State one sentence (sometimes two) a second time: right after itself, or at the end."""
    out = text
    for _ in range(1 if rng.random() < 0.75 else 2):
        cands = _long_sentences(out)
        m = rng.choice(cands)
        s = m.group(0).strip()
        if rng.random() < 0.5:
            out = out[:m.end()] + " " + s + out[m.end():]
        else:
            out = out.rstrip() + (" " if rng.random() < 0.6 else "\n\n") + s
    return out


def degrade_length(text: str, rng: random.Random) -> str:
    """Pad with one to three stock filler sentences at the start, between sentences or at the end."""
    out = text
    for filler in rng.sample(FILLERS, rng.choice((1, 1, 2, 3))):
        where = rng.random()
        if where < 0.3:
            out = filler + " " + out.lstrip()
        elif where < 0.7:
            out = out.rstrip() + " " + filler
        else:
            cands = _long_sentences(out, 1)
            m = rng.choice(cands)
            out = out[:m.end()] + " " + filler + out[m.end():]
    return out


def degrade_politeness(text: str, rng: random.Random) -> str:
    """Add a rude opener, a rude closer, or both."""
    r = rng.random()
    out = text.strip()
    if r < 0.45 or r >= 0.85:
        out = rng.choice(RUDE_OPENERS) + " " + out
    if r >= 0.45:
        out = out + " " + rng.choice(RUDE_CLOSERS)
    return out


def has_list(text: str) -> bool:
    return len(_LIST_ITEM.findall(text)) >= 2


def degrade_formatting(text: str, rng: random.Random) -> str:
    """Flatten a list into one paragraph (drafts with a list, half the time), else put one
    sentence of five or more words in capital letters."""
    if has_list(text) and rng.random() < 0.5:
        flat = " ".join(ln.strip() for ln in text.splitlines() if ln.strip())
        if not check_formatting(flat):  # items after unpunctuated lines would not read as a list
            return flat
    cands = [m for m in _long_sentences(text, 5) if len(_WORD.findall(m.group(0))) >= 5]
    m = rng.choice(cands)
    return text[:m.start()] + m.group(0).upper() + text[m.end():]


DEGRADERS: dict[str, Callable[[str, random.Random], str]] = {
    "repetition": degrade_repetition,
    "length": degrade_length,
    "politeness": degrade_politeness,
    "formatting": degrade_formatting,
}


def can_degrade(text: str, key: str) -> bool:
    if key == "formatting":
        return has_list(text) or any(len(_WORD.findall(m.group(0))) >= 5 for m in _long_sentences(text, 5))
    return bool(_long_sentences(text, 1 if key == "length" else 4)) or key == "politeness"


def degrade(text: str, keys: Sequence[str], rng: random.Random, tries: int = 8) -> str | None:
    """``text`` with each objective in ``keys`` broken as well, every other objective as it was,
    or None when the seeded attempts cannot achieve that (e.g. a flattened list that still reads
    as separate sentences)."""
    want = set(failed(text)) | set(keys)
    for _ in range(tries):
        out = text
        for k in keys:
            if not can_degrade(out, k):
                return None
            out = DEGRADERS[k](out, rng)
        if set(failed(out)) == want:
            return out
    return None


# --------------------------------------------------------------------------------------------
# Records of the generic preference layout, and the rows Algorithm 1 cannot make

def labels_for(better_broken: Iterable[str], worse_broken: Iterable[str],
               keys: Iterable[str] = KEYS) -> dict[str, str]:
    """Per objective in ``keys``: ``>`` when only the second response breaks it, ``<`` when only
    the first does, ``=`` otherwise (both fine or both broken)."""
    a, b = set(better_broken), set(worse_broken)
    return {k: ">" if (k in b and k not in a) else "<" if (k in a and k not in b) else "=" for k in keys}


def _pick(rng: random.Random, keys: Sequence[str], n: int, weights: dict[str, float] | None) -> list[str]:
    """``n`` distinct keys: uniformly (``rng.sample``), or in proportion to ``weights`` (missing: 1;
    keys of weight 0 are never picked, so fewer than ``n`` may come back)."""
    if weights is None:
        return rng.sample(list(keys), n)
    pool, out = [k for k in keys if weights.get(k, 1.0) > 0], []
    for _ in range(min(n, len(pool))):
        k = rng.choices(pool, [weights.get(x, 1.0) for x in pool])[0]
        pool.remove(k)
        out.append(k)
    return out


def make_records(items: Iterable[tuple[str, str]], seed: int = 0, p_two: float = 0.25,
                 p_clean: float = 0.15, weights: dict[str, float] | None = None) -> list[dict]:
    """Generic preference records from ``(query, clean draft)`` pairs, for Algorithm 1.

    Per draft: one record ``(clean, degraded on 1-2 objectives)`` labelled ``>`` on the broken
    objectives **only**: Algorithm 1 makes its preference row (fix exactly those) and no equal row.
    Labelling the untouched objectives ``=`` would make an equal row whose input is the degraded
    draft and whose target is the clean one, teaching the aligner to remove a fault nobody asked
    about (the first tiny aligner's data did this in 86% of its records). With probability
    ``p_clean`` also a record ``(clean, clean)`` labelled ``=`` on 1-3 objectives: an equal row
    whose target is its input. Labels are recomputed from the checks, never assumed.
    ``weights`` (objective key → relative weight) makes some objectives broken more often than
    others; without it each is equally likely (and the draw is the one earlier runs made).
    """
    rng = random.Random(seed)
    out = []
    for query, draft in items:
        keys = [k for k in KEYS if can_degrade(draft, k)]
        if not keys:
            continue
        n = 2 if (len(keys) >= 2 and rng.random() < p_two) else 1
        broken = _pick(rng, keys, n, weights)
        worse = degrade(draft, broken, rng) if broken else None
        if worse is not None:
            out.append(_record(query, draft, worse, failed(worse)))
        if rng.random() < p_clean:
            out.append(_record(query, draft, draft, rng.sample(KEYS, rng.choice((1, 2, 3)))))
    return out


def _record(query: str, r1: str, r2: str, keys: Iterable[str]) -> dict:
    return {"query": query, "response_1": r1, "response_2": r2,
            "labels": labels_for(failed(r1), failed(r2), sorted(keys))}


def cut_draft(text: str, rng: random.Random, tries: int = 8) -> str | None:
    """``text`` as a policy's token limit leaves it: cut inside its last third, mid-sentence (half
    the time mid-word), trailing space removed; None when no such cut passes every check."""
    lo = len(text) * 2 // 3
    for _ in range(tries):
        if lo >= len(text) - 1:
            return None
        pos = rng.randrange(lo, len(text) - 1)
        if rng.random() < 0.5:  # at a word boundary rather than inside a word
            pos = max(text.rfind(" ", lo, pos), lo)
        cut = text[:pos].rstrip()
        if cut and cut[-1] not in ".!?:" and is_clean(cut):
            return cut
    return None


_OPTION_STYLES = ("{L}) ", "{L}. ", "({l}) ")
_ANSWER_LABELS = ("Answer: ", "The answer is: ", "Correct answer: ")
_LEAD_LABELS = ("The answer to this question is: ", "Answer: ", "Reasoning: ", "Response: ")
_TAIL_LABELS = ("Note: ", "Explanation: ", "In summary: ")


def _leading_sentences(text: str, spans: Sequence[_Span], n: int) -> list[str] | None:
    """The first ``n`` sentences of ``text`` (``spans``: its :func:`_sentence_matches`), stripped;
    None when text between them (a heading, list markers) would be lost by joining them."""
    parts = [sp.group().strip() for sp in spans[:n]]
    return parts if text[:spans[n - 1].end()].split() == " ".join(parts).split() else None


def relayout(text: str, rng: random.Random, tries: int = 8) -> str | None:
    """``text`` in a layout policy models often write, its words all kept and in order: a line
    that repeats an earlier one or a label line is where a small copying model skips ahead.

    Layouts (seeded): *options* — its first 2-3 sentences as lettered options (``A)``, ``A.``,
    ``(a)``), ``D) All of the above`` or not, then an answer line that repeats one option, then the
    rest; *label* — a label line in front (``The answer to this question is:``, ``Reasoning:``);
    *tail* — its last sentence on a line of its own after a label (``Note:``, ``Explanation:``).
    None when no layout passes every check.
    """
    spans = _sentence_matches(text)
    for _ in range(tries):
        kind = rng.choice(("options", "options", "label", "tail"))
        if kind == "options" and len(spans) >= 3:
            n = min(len(spans) - 1, rng.choice((2, 3)))
            opts = _leading_sentences(text, spans, n)
            if opts is None:
                continue
            style = rng.choice(_OPTION_STYLES)
            if rng.random() < 0.5:
                opts.append("All of the above")
            lines = [style.format(L=L, l=L.lower()) + o for L, o in zip("ABCD", opts)]
            picked = lines[rng.randrange(len(lines))]
            answer = rng.choice(_ANSWER_LABELS) + picked
            rest = text[spans[n - 1].end():].strip()
            out = "\n".join(lines) + "\n\n" + answer + ("\n\n" + rest if rest else "")
        elif kind == "label":
            out = rng.choice(_LEAD_LABELS) + rng.choice(("", "\n\n")) + text.strip()
        elif kind == "tail" and len(spans) >= 2:
            last = spans[-1]
            head, tail = text[:last.start()].rstrip(), text[last.start():].strip()
            out = head + "\n\n" + rng.choice(_TAIL_LABELS) + tail
        else:
            continue
        if out != text and is_clean(out):
            return out
    return None


def short_draft(text: str, rng: random.Random) -> str | None:
    """The first two or three sentences of ``text``, as a policy writes a short answer: every
    one of 4+ words, nothing between them lost (a heading or list marker makes it None), clean,
    :data:`MIN_WORDS` or more, and at least one sentence shorter than ``text``; None otherwise."""
    spans = _sentence_matches(text)
    n = rng.choice((2, 2, 3))
    if len(spans) <= n:
        return None
    parts = _leading_sentences(text, spans, n)
    if parts is None or any(len(p.split()) < 4 for p in parts):
        return None
    out = " ".join(parts)
    return out if len(words(out)) >= MIN_WORDS and is_clean(out) else None


_PARALLEL_OPENERS = ("You can assume that ", "Keep in mind that ", "Remember that ", "Note that ",
                     "It is important to know that ", "Make sure you know that ")
# sentence-initial words that are lowercase inside a sentence (a name or "I" keeps its capital)
_LOWERABLE = frozenset("""a an the it its this that these those there they their them you your we our
he she his her some many most much more each every all any one two if when while because since although
in on at for to from with by as after before during people often usually also however so then other
""".split())
# words that open a reply, not a statement: "You can assume that yes, ..." does not read
_NOT_AFTER_OPENER = frozenset("""yes no sure hello hi sorry thank thanks please well ok okay oh absolutely
certainly unfortunately great""".split())


def parallel_draft(text: str, rng: random.Random) -> str | None:
    """``text`` with its first three to five sentences each opening with the same words ("You can
    assume that ...", "Keep in mind that ..."), one to a line or paragraph, then the rest: lines
    that open alike are where a small copying model loses its place and writes one of them over
    and over. Each sentence keeps its words after the opener (its first word lowercased when it is
    a common word, a name or "I" kept as is); None when a sentence opens like a reply ("Yes,",
    "Sorry,") or not with a word, text between them would be lost, or the result fails a check."""
    spans = _sentence_matches(text)
    k = min(len(spans), rng.choice((3, 4, 5)))
    if k < 3:
        return None
    parts = _leading_sentences(text, spans, k)
    if parts is None:
        return None
    firsts = [p.split()[0].rstrip(",").lower() for p in parts]
    if any(len(p.split()) < 4 or w in _NOT_AFTER_OPENER or not w.isalpha() for p, w in zip(parts, firsts)):
        return None
    opener = rng.choice(_PARALLEL_OPENERS)
    lines = [opener + (p[0].lower() + p[1:] if w in _LOWERABLE else p) for p, w in zip(parts, firsts)]
    rest = text[spans[k - 1].end():].strip()
    out = rng.choice(("\n\n", "\n")).join(lines) + ("\n\n" + rest if rest else "")
    return out if is_clean(out) else None


def repeat_first(text: str, rng: random.Random) -> str | None:
    """``text`` with its first sentence (4+ words) stated a second time: right after itself, or at
    the end as a closing restatement; None when it has no such first sentence or the result breaks
    anything but Repetition."""
    spans = _sentence_matches(text)
    if len(spans) < 2 or len(spans[0].group().split()) < 4:
        return None
    first = spans[0].group().strip()
    if rng.random() < 0.5:
        out = text[:spans[0].end()] + rng.choice((" ", "\n\n")) + first + text[spans[0].end():]
    else:
        out = text.rstrip() + rng.choice((" ", "\n\n")) + first
    return out if failed(out) == ["repetition"] else None


def direct_examples(items: Iterable[tuple[str, str]], seed: int = 0, p_second_keep: float = 0.3,
                    p_fix_with_met: float = 0.25, p_leave_unasked: float = 0.1, p_cut_keep: float = 0.0,
                    weights: dict[str, float] | None = None, p_layout: float = 0.0,
                    p_short: float = 0.0, p_parallel: float = 0.0, p_first: float = 0.0) -> list[dict]:
    """Better-template examples ``{"query", "draft", "objectives", "target", "kind"}`` that ask for
    an objective the draft already meets: the case an aligner meets most at inference (it gets
    every draft, most of them fine) and that Algorithm 1 cannot produce, since its preference
    rows always pair a worse input with a better target.

    Per draft (seeded): ``keep`` — the clean draft, 1-2 objectives → the draft itself (a second
    keep with other objectives with ``p_second_keep``); ``fix_with_met`` — the draft broken on X,
    asked X plus one objective it meets → the clean draft; ``leave_unasked`` — the draft broken on
    Y, asked another objective X → the broken draft unchanged (fix what is asked, nothing else);
    ``keep_cut`` (``p_cut_keep``) — the draft cut off mid-sentence as a policy's token limit leaves
    it (:func:`cut_draft`) → itself: the edit ends where the draft ends, even inside a word.
    ``keep_layout`` and ``fix_layout`` (``p_layout`` each) — the draft in another layout
    (:func:`relayout`: lettered options, label lines) → itself; broken on X and asked X → that
    layout, whole. ``keep_short`` and ``fix_short`` (``p_short``) — the draft's first two or three
    sentences (:func:`short_draft`) → themselves; broken on one objective and asked it (half the
    time with one they meet) → the short draft. ``keep_parallel`` and ``fix_parallel``
    (``p_parallel``) — the same with :func:`parallel_draft`, sentences that open alike.
    ``fix_first`` (``p_first``) — the draft, or half the time its first two or three sentences,
    with its first sentence stated again (:func:`repeat_first`), asked Repetition (half the time
    with one it meets) → the draft without the restatement. ``weights`` as in :func:`make_records`, for the
    objective a fix-with-met, fix-layout or fix-short row breaks.
    """
    rng = random.Random(seed)
    out = []
    for query, draft in items:
        def keep(text: str, kind: str) -> dict:  # asked 1-2 objectives the text meets -> the text itself
            return {"query": query, "draft": text, "objectives": rng.sample(KEYS, rng.choice((1, 1, 2))),
                    "target": text, "kind": kind}

        for i in range(2 if rng.random() < p_second_keep else 1):
            out.append(keep(draft, "keep"))
        keys = [k for k in KEYS if can_degrade(draft, k)]
        if keys and rng.random() < p_fix_with_met:
            x = rng.choice(keys) if weights is None else next(iter(_pick(rng, keys, 1, weights)), None)
            bad = degrade(draft, [x], rng) if x is not None else None
            if bad is not None:
                asked = [x, rng.choice([k for k in KEYS if k != x])]
                rng.shuffle(asked)
                out.append({"query": query, "draft": bad, "objectives": asked, "target": draft, "kind": "fix_with_met"})
        if keys and rng.random() < p_leave_unasked:
            y = rng.choice(keys)
            bad = degrade(draft, [y], rng)
            if bad is not None:
                out.append({"query": query, "draft": bad, "objectives": [rng.choice([k for k in KEYS if k != y])],
                            "target": bad, "kind": "leave_unasked"})
        if p_cut_keep and rng.random() < p_cut_keep:  # no draw at 0: earlier seeds build the same rows
            cut = cut_draft(draft, rng)
            if cut is not None:
                out.append(keep(cut, "keep_cut"))
        if p_layout and rng.random() < p_layout:  # no draw at 0, as above
            lay = relayout(draft, rng)
            if lay is not None:
                out.append(keep(lay, "keep_layout"))
                lay_keys = [k for k in KEYS if can_degrade(lay, k)]
                x = rng.choice(lay_keys) if lay_keys and rng.random() < p_layout else None
                bad = degrade(lay, [x], rng) if x is not None else None
                if bad is not None:
                    out.append({"query": query, "draft": bad, "objectives": [x], "target": lay, "kind": "fix_layout"})
        for name, p, make in (("short", p_short, short_draft), ("parallel", p_parallel, parallel_draft)):
            if not (p and rng.random() < p):  # no draw at 0, as above
                continue
            variant = make(draft, rng)
            if variant is None:
                continue
            out.append(keep(variant, "keep_" + name))
            v_keys = [k for k in KEYS if can_degrade(variant, k)]
            x = next(iter(_pick(rng, v_keys, 1, weights)), None) if v_keys else None
            bad = degrade(variant, [x], rng) if x is not None else None
            if bad is not None:
                asked = [x] if rng.random() < 0.5 else [x, rng.choice([k for k in KEYS if k != x])]
                out.append({"query": query, "draft": bad, "objectives": asked, "target": variant,
                            "kind": "fix_" + name})
        if p_first and rng.random() < p_first:  # no draw at 0, as above
            base = (short_draft(draft, rng) if rng.random() < 0.5 else None) or draft
            bad = repeat_first(base, rng)
            if bad is not None:
                asked = ["repetition"] if rng.random() < 0.5 else ["repetition", rng.choice([k for k in KEYS if k != "repetition"])]
                out.append({"query": query, "draft": bad, "objectives": asked, "target": base, "kind": "fix_first"})
    return out


_APOLOGY_OPENER = re.compile(r"\s*(?:I'?m (?:so |very )?sorry|I am (?:so |very )?sorry|I apologi[sz]e|Sorry\b)", re.I)


def apology_opener(text: str) -> bool:
    """The draft opens with an apology ("I'm sorry, but ...", "I apologize, ...")."""
    return _APOLOGY_OPENER.match(text) is not None
