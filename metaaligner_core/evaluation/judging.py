"""Asking the judge: the on-disk cache, parallel calls, reply parsing and the retry on invalid replies.

Every answered call is appended to ``judgments.jsonl`` and flushed at once, keyed by the judge's
name, the attempt number and the exact prompt: a rerun (or a run resumed after a kill) makes no
call that is already answered. A reply that does not parse is asked once more (attempt 1, its
own cache entry); if that one does not parse either, the judgment is *invalid*. A call that still
fails after the client's own retries (429/5xx/timeouts, exponential back-off) is *failed*: it is
logged in the file for the record but never cached, so the next run asks again, and no earlier
answer ever stands in for it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm

from ..backends.base import APIBackend
from ..errors import MetaAlignerError
from ..io import dumps

log = logging.getLogger(__name__)

ATTEMPTS = 2  # the first ask and one retry when the reply does not parse
DEFAULT_TEMPERATURE = 0.0
DEFAULT_MAX_TOKENS = 32


def settings_key(settings: dict | None) -> dict | None:
    """The sampling settings that enter the cache key: None for the defaults (older caches)."""
    if not settings:
        return None
    t = float(settings.get("temperature", DEFAULT_TEMPERATURE))
    m = int(settings.get("max_tokens", DEFAULT_MAX_TOKENS))
    if t == DEFAULT_TEMPERATURE and m == DEFAULT_MAX_TOKENS:
        return None
    return {"temperature": t, "max_tokens": m}


@dataclass
class Verdict:
    """What the judge said about one prompt, after the retry."""

    status: str                     # "ok" | "invalid" | "failed"
    value: int | float | None = None
    reply: str | None = None
    error: str | None = None


@dataclass
class Usage:
    calls: int = 0                  # calls made by this run
    cached: int = 0                 # answers taken from judgments.jsonl
    retries: int = 0                # second asks after a reply that did not parse
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reported: bool = False          # whether any call reported token counts

    def add(self, usage: dict | None) -> None:
        if usage:
            self.reported = True
            self.prompt_tokens += int(usage.get("prompt_tokens") or 0)
            self.completion_tokens += int(usage.get("completion_tokens") or 0)

    def as_dict(self) -> dict:
        out = {"calls": self.calls, "cached": self.cached, "retries_after_invalid": self.retries}
        if self.reported:
            out.update(prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens)
        return out


class JudgmentCache:
    """``judgments.jsonl``: one line per judge call, read back as a cache.

    A line is ``{"key", "judge", "attempt", "reply", "usage", ...context}`` for an answer, or
    the same with ``"error"`` instead of ``"reply"`` for a failed call (not reused).
    """

    def __init__(self, path: str | Path, judge: str, system: str | None = None, settings: dict | None = None):
        # the system message is part of the key (the IMHI judge has one), and so are sampling
        # settings other than the defaults (temperature 0, 32 tokens); without either the key is
        # the same as before they existed, so older caches stay valid
        self.path, self.judge, self.system = Path(path), judge, system
        self.settings = settings_key(settings)
        self._answers: dict[str, dict] = {}
        self._lock = threading.Lock()
        if self.path.exists():
            self._load()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a", encoding="utf-8")

    def _load(self) -> None:
        raw = self.path.read_bytes()
        for line in raw.decode("utf-8", errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # the last line of a run killed mid-write
            if isinstance(rec, dict) and "reply" in rec and isinstance(rec.get("key"), str):
                self._answers[rec["key"]] = rec
        if raw and not raw.endswith(b"\n"):
            with open(self.path, "ab") as fh:  # keep the next record on a line of its own
                fh.write(b"\n")

    def key(self, prompt: str, attempt: int) -> str:
        parts = [self.judge, attempt, prompt] + ([self.system] if self.system else [])
        if self.settings:
            parts.append(self.settings)
        return hashlib.sha256(json.dumps(parts, ensure_ascii=False).encode()).hexdigest()

    def get(self, prompt: str, attempt: int) -> dict | None:
        return self._answers.get(self.key(prompt, attempt))

    def put(self, prompt: str, attempt: int, record: dict) -> None:
        rec = {"key": self.key(prompt, attempt), "judge": self.judge, "attempt": attempt, **record}
        with self._lock:
            self._fh.write(dumps(rec) + "\n")
            self._fh.flush()  # a killed run keeps every answer it paid for
            if "reply" in rec:
                self._answers[rec["key"]] = rec

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> "JudgmentCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class Judge:
    """A ChatBackend used as a judge: ``temperature`` (default 0), replies of at most
    ``max_tokens`` (default 32), one parser.

    API judges are called from ``concurrency`` threads (the official clients are thread-safe and
    the work is waiting on the network); a local model gets real batches instead.
    """

    backend: object
    cache: JudgmentCache
    parse: Callable[[str], int | float | None]
    max_tokens: int = DEFAULT_MAX_TOKENS
    concurrency: int = 8
    progress: bool = False
    system: str | None = None
    max_calls: int | None = None    # stop cleanly after this many calls (None: no limit)
    temperature: float = DEFAULT_TEMPERATURE
    usage: Usage = field(default_factory=Usage)
    stopped: bool = False           # the call budget ran out before every prompt was answered

    def pending(self, prompts) -> list[str]:
        """The prompts without a cached first answer (what a run would ask first)."""
        return [p for p in prompts if self.cache.get(p, 0) is None]

    def judge_all(self, prompts: dict[str, dict]) -> dict[str, Verdict]:
        """Judge each prompt (deduplicated; the value is context recorded with the answer)."""
        verdicts: dict[str, Verdict] = {}
        todo = list(prompts)
        for attempt in range(ATTEMPTS):
            failed = self._ask(todo, attempt, prompts)
            retry = []
            for prompt in todo:
                if prompt in failed:
                    verdicts[prompt] = Verdict("failed", error=failed[prompt])
                    continue
                rec = self.cache.get(prompt, attempt)
                if rec is None:  # left unasked: the call budget ran out
                    verdicts[prompt] = Verdict("failed", error="not asked: --max-calls reached")
                    continue
                value = self.parse(rec["reply"])
                if value is not None:
                    verdicts[prompt] = Verdict("ok", value, rec["reply"])
                elif attempt + 1 < ATTEMPTS:
                    retry.append(prompt)
                else:
                    verdicts[prompt] = Verdict("invalid", reply=rec["reply"])
            todo = retry
        return verdicts

    def _ask(self, prompts: list[str], attempt: int, context: dict[str, dict]) -> dict[str, str]:
        """Make the calls not answered yet; return {prompt: error} for the ones that failed."""
        missing = [p for p in prompts if self.cache.get(p, attempt) is None]
        self.usage.cached += len(prompts) - len(missing)
        if not missing:
            return {}
        if self.max_calls is not None:
            room = max(0, self.max_calls - self.usage.calls)
            if len(missing) > room:
                self.stopped = True
                missing = missing[:room]
                if not missing:
                    return {}
        if attempt > 0:
            self.usage.retries += len(missing)
        failed: dict[str, str] = {}
        desc = "judging" if attempt == 0 else "re-asking invalid replies"
        with tqdm(total=len(missing), desc=desc, unit="call", disable=not self.progress) as bar:
            if isinstance(self.backend, APIBackend):
                self._ask_threads(missing, attempt, context, failed, bar)
            else:
                self._ask_batches(missing, attempt, context, failed, bar)
        return failed

    def _record(self, prompt, attempt, context, completion=None, error=None, seconds=0.0):
        self.usage.calls += 1
        if error is not None:
            self.cache.put(prompt, attempt, {**context[prompt], "error": error})
            return
        self.usage.add(completion.usage)
        self.cache.put(prompt, attempt, {**context[prompt], "reply": completion.text,
                                         "usage": completion.usage or {}, "seconds": round(seconds, 3)})

    def _ask_threads(self, missing, attempt, context, failed, bar) -> None:
        def call(prompt):
            start = time.perf_counter()
            completion = self.backend.complete(prompt, max_tokens=self.max_tokens, temperature=self.temperature,
                                               system=self.system)
            return completion, time.perf_counter() - start

        pool = ThreadPoolExecutor(max_workers=max(1, self.concurrency), thread_name_prefix="judge")
        try:
            futures = {pool.submit(call, p): p for p in missing}
            for fut in as_completed(futures):
                prompt = futures[fut]
                try:
                    completion, seconds = fut.result()
                except Exception as e:  # noqa: BLE001 — one failed comparison must not stop the others
                    failed[prompt] = _describe(e)
                    self._record(prompt, attempt, context, error=failed[prompt])
                else:
                    self._record(prompt, attempt, context, completion, seconds=seconds)
                bar.update(1)
        finally:
            # On Ctrl-C, drop the queued calls instead of waiting for all of them (the default).
            pool.shutdown(wait=False, cancel_futures=True)

    def _ask_batches(self, missing, attempt, context, failed, bar) -> None:
        size = max(1, self.concurrency)
        for i in range(0, len(missing), size):
            chunk = missing[i:i + size]
            start = time.perf_counter()
            try:
                completions = self.backend.complete_batch(chunk, max_tokens=self.max_tokens, temperature=self.temperature,
                                                          system=self.system, batch_size=size)
            except Exception as e:  # noqa: BLE001
                for prompt in chunk:
                    failed[prompt] = _describe(e)
                    self._record(prompt, attempt, context, error=failed[prompt])
            else:
                per_call = (time.perf_counter() - start) / len(chunk)
                for prompt, completion in zip(chunk, completions):
                    self._record(prompt, attempt, context, completion, seconds=per_call)
            bar.update(len(chunk))


def _describe(e: Exception) -> str:
    # Backend errors never carry the API key and already name the judge; keep the line short.
    text = " ".join(str(e).split())[:300]
    if isinstance(e, MetaAlignerError) and text:
        return text
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
