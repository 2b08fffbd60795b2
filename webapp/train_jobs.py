"""Background jobs of the Train tab: ``annotate train`` and ``annotate ab`` run for an admin.

One job at a time per server (:class:`TrainJobs` holds it, so a browser refresh finds it again).
A job is the same ``metaaligner annotate ...`` command the CLI runs, started as a child process:

* its CPU threads are bounded (``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS``, default half the
  cores) and its priority lowered, so the app's own generations stay responsive;
* it can be cancelled (the process group gets SIGTERM, then SIGKILL); ``annotate train`` is
  resumable, so nothing is lost but the steps since the last checkpoint;
* the database URL goes in the environment (``$METAALIGNER_DB``), never on the command line;
* only operator-configured base models (``bases``) and baseline aligners may be named.

Every method that starts, stops or shows a job takes the caller's sign-in token and checks that
it is an admin's, whatever the page showed.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

from metaaligner_core.errors import MetaAlignerError

log = logging.getLogger("metaaligner.app.train")

JOB_FILE = "job.json"
OFFERED_FILE = "offered.json"  # aligners visitors may pick
LOG_FILE = "job.log"
ROOT = Path(__file__).resolve().parents[1]
STAGES = ("warmup", "equal", "preference")
# Bounds of what the tab lets an admin ask for (a raw request can send anything).
MAX_STEPS = 100_000
MAX_QUERIES = 1000


@dataclass
class Job:
    kind: str  # train | ab
    out: Path
    argv: list[str]
    started_by: str
    protocol: str
    base: str = ""
    stages: tuple[str, ...] = STAGES
    started: float = field(default_factory=time.time)
    status: str = "running"  # running | done | failed | cancelled
    returncode: int | None = None
    finished: float | None = None
    result: str | None = None  # train: the aligner directory; ab: the A/B study's name
    proc: subprocess.Popen | None = None
    cancel_requested: bool = False
    watcher: threading.Thread | None = None

    def record(self) -> dict:
        return {"kind": self.kind, "status": self.status, "argv": self.argv, "started_by": self.started_by,
                "protocol": self.protocol, "base": self.base, "stages": list(self.stages),
                "started": _iso(self.started), "finished": _iso(self.finished) if self.finished else None,
                "returncode": self.returncode, "result": self.result}


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")


def _lower_priority() -> None:  # runs in the child before exec
    try:
        os.nice(10)
    except OSError:
        pass


def default_threads() -> int:
    return max(1, (os.cpu_count() or 2) // 2)


class TrainJobs:
    """The server's one background job, its history under ``runs_dir``, and the admin checks.

    ``bases``: MODEL strings a job may start from; ``baselines``: aligners an A/B study may
    compare against (the operator's configured ones); ``threads``: CPU threads a job may use;
    ``max_new_tokens``: the A/B corrections' length (the app's generation length).
    """

    def __init__(self, db_url: str, runs_dir: str | os.PathLike, bases: Sequence[str],
                 baselines: Sequence[str] = ("default",), threads: int | None = None,
                 max_new_tokens: int = 256, python: str = sys.executable):
        from annotation.store import Store

        self.db_url = db_url
        self.store = Store(db_url)
        self.runs_dir = Path(runs_dir)
        self.bases = list(dict.fromkeys(b for b in bases if b))
        self.baselines = list(dict.fromkeys(b for b in baselines if b))
        self.threads = threads or default_threads()
        self.max_new_tokens = max_new_tokens
        self.python = python
        self.job: Job | None = None
        self._lock = threading.Lock()
        self.offered: list[str] = []  # aligners an admin let visitors pick (see offer())

    # ------------------------------------------------------------------ checks
    def admin(self, token) -> str:
        """The admin's name; AccessDenied for anyone else (an unsigned or a rater's session)."""
        from annotation import accounts, workflow

        with self.store._session() as s:
            return workflow.actor_name(accounts.require_role(s, token, "admin"))

    @staticmethod
    def _configured(value, configured: Sequence[str]) -> str | None:
        """The configured MODEL string ``value`` names (as is, or as the page shows it)."""
        from .security import ModelAllowList

        for spec in configured:
            if isinstance(value, str) and value in (spec, ModelAllowList.public(spec)):
                return spec
        return None

    def _check_base(self, base) -> str:
        found = self._configured(base, self.bases)
        if found is None:
            raise MetaAlignerError("base model: not one the operator configured for training")
        return found

    @staticmethod
    def _int(label: str, value, lo: int, hi: int) -> int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise MetaAlignerError(f"{label}: expected a whole number from {lo} to {hi}")
        return value

    @staticmethod
    def _float(label: str, value, lo: float, hi: float) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
            raise MetaAlignerError(f"{label}: expected a number from {lo:g} to {hi:g}")
        return float(value)

    def _protocol(self, protocol) -> str:
        from annotation.training_run import stored_protocol_names

        if not isinstance(protocol, str) or protocol not in stored_protocol_names(self.store):
            raise MetaAlignerError("protocol: not a study in this database")
        return protocol

    def protocols(self, token) -> list[str]:
        from annotation.training_run import stored_protocol_names

        self.admin(token)
        return stored_protocol_names(self.store)

    # ------------------------------------------------------------------ before starting
    def preview(self, token, protocol, holdout=0, min_pairs=None) -> dict:
        """Pairs and Algorithm 1's row counts the job would train on, and the refusal if any."""
        from annotation import training_run

        self.admin(token)
        protocol = self._protocol(protocol)
        holdout = self._int("held-out items", holdout, 0, 10_000)
        min_pairs = self._int("minimum pairs", min_pairs or training_run.DEFAULT_MIN_PAIRS, 1, 1_000_000)
        study = training_run.load_study(self.store, token, protocol)
        out = training_run.preview(study, holdout=holdout)
        out["refusal"] = training_run.refusal(study, min_pairs, holdout)
        out["protocol_version"] = study.version
        return out

    # ------------------------------------------------------------------ jobs
    def start_train(self, token, protocol, base, *, max_steps=None, epochs=1, lr=1e-4, lora=True, holdout=0,
                    min_pairs=None) -> Job:
        from annotation import training_run

        who = self.admin(token)
        protocol = self._protocol(protocol)
        base = self._check_base(base)
        epochs = self._float("epochs", epochs, 0.01, 100)
        lr = self._float("learning rate", lr, 1e-7, 1e-2)
        holdout = self._int("held-out items", holdout, 0, 10_000)
        min_pairs = self._int("minimum pairs", min_pairs or training_run.DEFAULT_MIN_PAIRS, 1, 1_000_000)
        steps = None if max_steps in (None, 0, "") else self._int("max steps per stage", max_steps, 1, MAX_STEPS)
        why = training_run.refusal(training_run.load_study(self.store, token, protocol), min_pairs, holdout)
        if why:
            raise MetaAlignerError(why)
        out = self.runs_dir / f"{protocol}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
        argv = ["annotate", "train", "--protocol", protocol, "--base", base, "--out", str(out),
                "--holdout", str(holdout), "--min-pairs", str(min_pairs), "--epochs", f"{epochs:g}",
                "--lr", f"{lr:g}", "--lora" if lora else "--no-lora", "--logging-steps", "1", "--no-progress"]
        if steps:
            argv += ["--max-steps", str(steps)]
        return self._spawn(Job("train", out, argv, who, protocol, base), str(out / "final"))

    def start_ab(self, token, candidate, baseline, queries) -> Job:
        """A blind A/B study of a finished run's aligner against a configured baseline."""
        who = self.admin(token)
        if not isinstance(candidate, str) or candidate not in self.finished_aligners():
            raise MetaAlignerError("candidate: not an aligner a finished training job wrote")
        baseline = self._configured(baseline, self.baselines)
        if baseline is None:
            raise MetaAlignerError("baseline: not an aligner the operator configured")
        queries = self._int("queries", queries, 1, MAX_QUERIES)
        run = Path(candidate).parent
        record = json.loads((run / "study.json").read_text(encoding="utf-8"))
        name = f"ab-{run.name}-{datetime.now(timezone.utc):%H%M%S}"
        argv = ["annotate", "ab", "--baseline", baseline, "--candidate", candidate, "--queries", str(queries),
                "--protocol", record["protocol"], "--name", name, "--max-new-tokens", str(self.max_new_tokens)]
        out = run / "ab" / name
        return self._spawn(Job("ab", out, argv, who, record["protocol"], baseline), name)

    def _spawn(self, job: Job, result: str) -> Job:
        with self._lock:
            if self.job is not None and self.job.status == "running":
                raise MetaAlignerError(f"a {self.job.kind} job started by {self.job.started_by} is running; "
                                       "wait for it or cancel it")
            job.out.mkdir(parents=True, exist_ok=True)
            env = {**os.environ, "METAALIGNER_DB": self.db_url, "OMP_NUM_THREADS": str(self.threads),
                   "MKL_NUM_THREADS": str(self.threads), "TOKENIZERS_PARALLELISM": "false",
                   "TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # a readable log
                   "PYTHONUNBUFFERED": "1",
                   "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
            logf = open(job.out / LOG_FILE, "ab")
            try:
                job.proc = subprocess.Popen([self.python, "-m", "metaaligner_core", *job.argv], cwd=ROOT, env=env,
                                            stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                            start_new_session=True, preexec_fn=_lower_priority)
            finally:
                logf.close()
            job.result = result
            self.job = job
            self._write(job)
            log.info("%s job started by %s in %s", job.kind, job.started_by, job.out)
            job.watcher = threading.Thread(target=self._watch, args=(job,), daemon=True, name=f"{job.kind}-job")
            job.watcher.start()
            return job

    def _watch(self, job: Job) -> None:
        rc = job.proc.wait()
        with self._lock:
            job.returncode, job.finished = rc, time.time()
            job.status = "cancelled" if job.cancel_requested else "done" if rc == 0 else "failed"
            self._write(job)
        log.info("%s job in %s: %s (exit %s)", job.kind, job.out, job.status, rc)

    def _write(self, job: Job) -> None:
        from metaaligner_core.io import atomic_write

        with atomic_write(job.out / JOB_FILE) as fh:
            json.dump(job.record(), fh, indent=2)

    def cancel(self, token) -> str:
        self.admin(token)
        with self._lock:
            job = self.job
            if job is None or job.status != "running":
                return "no job is running"
            job.cancel_requested = True
            proc = job.proc
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)
        job.watcher.join(timeout=15)  # its status and job.json are written
        return f"the {job.kind} job was cancelled"

    def shutdown(self) -> None:
        """Stop a running job (the server is going down)."""
        job = self.job
        if job is not None and job.status == "running" and job.proc is not None:
            job.cancel_requested = True
            try:
                os.killpg(job.proc.pid, signal.SIGTERM)
                job.proc.wait(timeout=15)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass

    # ------------------------------------------------------------------ what the tab shows
    def state(self, token) -> dict:
        """The current (or last) job: status, progress 0..1, stage line, losses, log tail."""
        self.admin(token)
        with self._lock:  # a status read here is already in job.json (``_watch`` writes under the lock)
            job = self.job
            status = job.status if job is not None else "none"
        if job is None:
            return {"status": "none"}
        out = {"kind": job.kind, "status": status, "started_by": job.started_by, "started": _iso(job.started),
               "out": str(job.out), "result": job.result, "protocol": job.protocol, "base": job.base}
        out.update(self._progress(job))
        out["log"] = _tail(job.out / LOG_FILE)
        return out

    def _progress(self, job: Job) -> dict:
        if job.kind != "train":
            return {"progress": 1.0 if job.status == "done" else 0.0, "stage": job.status, "losses": []}
        done = [s for s in job.stages if (job.out / s / "stage.json").is_file()]
        frac, stage = len(done) / len(job.stages), "preparing the dataset"
        try:
            p = json.loads((job.out / "progress.json").read_text(encoding="utf-8"))
            if p.get("stage") not in done and p.get("max_steps"):
                frac += min(1.0, p["step"] / p["max_steps"]) / len(job.stages)
                stage = f"{p['stage']}: step {p['step']} of {p['max_steps']}"
        except (OSError, ValueError, KeyError, TypeError):
            pass
        if job.status == "done":
            frac, stage = 1.0, "done"
        losses = []
        try:
            for i, line in enumerate((job.out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()):
                rec = json.loads(line)
                losses.append({"point": i + 1, "loss": float(rec["loss"]), "stage": rec["stage"]})
        except (OSError, ValueError, KeyError):
            pass
        return {"progress": round(frac, 4), "stage": stage, "losses": losses}

    def finished_aligners(self) -> list[str]:
        """``DIR/final`` of every training job under ``runs_dir`` that finished."""
        out = []
        for f in sorted(self.runs_dir.glob(f"*/{JOB_FILE}")):
            try:
                rec = json.loads(f.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if rec.get("kind") == "train" and rec.get("status") == "done" and (f.parent / "final").is_dir():
                out.append(str(f.parent / "final"))
        return out

    def offer(self, token, aligner, allow_list) -> str:
        """Let visitors pick a finished job's aligner in the Align tab (an admin's decision)."""
        self.admin(token)
        if not isinstance(aligner, str) or aligner not in self.finished_aligners():
            raise MetaAlignerError("aligner: not one a finished training job wrote")
        allow_list.add("aligner", aligner)
        if aligner not in self.offered:
            self.offered.append(aligner)
            from metaaligner_core.io import atomic_write

            with atomic_write(self.runs_dir / OFFERED_FILE) as fh:
                json.dump(self.offered, fh)
        return aligner

    def restore_offers(self, allow_list) -> None:
        """Aligners admins offered before a restart stay offered (while their run is still there)."""
        try:
            saved = json.loads((self.runs_dir / OFFERED_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return
        done = set(self.finished_aligners())
        for aligner in saved if isinstance(saved, list) else []:
            if aligner in done:
                allow_list.add("aligner", aligner)
                self.offered.append(aligner)


def _tail(path: Path, lines: int = 40, limit: int = 6000) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 64_000))
            text = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    text = "\n".join(text.splitlines()[-lines:])
    from .security import strip_credentials

    return strip_credentials(text)[-limit:]
