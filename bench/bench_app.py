"""Benchmark: how fast the app is ready, and how soon the first streamed token appears.

Starts ``python app.py`` as a user would (embedded defaults, warm model cache, a throw-away
annotation DB) and measures, from process start:

- ready: the first HTTP 200 on ``/`` (target <= 5 s);
- models loaded: the first ``/align`` answer (the background preload has to finish first).

Then, against that server, over HTTP with ``gradio_client`` (the streaming ``align_stream``
event the Align button uses), the median of ``--repeats`` runs of:

- first draft token: the policy writes the draft (no draft given);
- first correction token: a pasted draft, so the aligner streams at once (target <= 1 s);
- the whole correction, to show what streaming saves: first-token time / full time.

In-process, ``Aligner.stream`` without HTTP (model time alone), with torch's default number of
CPU threads and with one thread: on a CPU that other processes keep busy, one thread avoids the
threads waiting on each other (the ratio printed is what ``python app.py --threads 1`` gains).

    .venv/bin/python bench/bench_app.py [--repeats 3] [--max-new-tokens 64] [--threads N]
    .venv/bin/python bench/bench_app.py --checks-ab [--repeats 9]

``--checks-ab`` measures what the request checks of issue 10 (model allow-list, input caps, one
generation per session, plain status) cost: two servers of the same tree run side by side, one
``python app.py`` as shipped, one started by this script with those checks replaced by identity
functions (nothing else differs), and requests alternate between them (A, B, A, B, ...) so load
changes on a shared machine hit both alike. It prints the median first-token latency of each and
their ratio (target: within 5 %).
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QUERY = "How can I fall asleep faster?"
DRAFT = "Just stay up until you are tired, there is nothing else you can do about it."
OBJECTIVES = ["ultrafeedback/helpfulness", "unseen/readability"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"app.py exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"{url} not ready after {timeout} s")


def align_stream_args(draft: str, max_new: int) -> list:
    """The Align tab's ``/align_stream`` inputs: embedded models, four objectives, greedy."""
    return ["default", "default", "auto", [o for o in OBJECTIVES if o.startswith("ultrafeedback/")], [], [],
            [o for o in OBJECTIVES if o.startswith("unseen/")], "", QUERY, draft, max_new, 0.0, 1.0, 1.0]


def stream_times(client, draft: str, max_new: int) -> tuple[float, float, float]:
    """(first draft token, first correction token, end) in seconds after submit, over HTTP.

    Through ``gradio_client``, whose reader looks for new messages every 50 ms: the times are
    rounded up to that step (:func:`raw_first_token` reads each message as it arrives)."""
    args = align_stream_args(draft, max_new)
    t0 = time.perf_counter()
    first_draft = first_aligned = None
    job = client.submit(*args, api_name="/align_stream")
    for out in job:
        now = time.perf_counter() - t0
        if first_draft is None and out[0]:
            first_draft = now
        if first_aligned is None and out[1]:
            first_aligned = now
    job.result()
    return first_draft, first_aligned, time.perf_counter() - t0


def raw_first_token(raw, fn_index: int, draft: str, max_new: int) -> float:
    """Seconds from submit to the first correction text of ``/align_stream`` (``fn_index``), over
    Gradio's own protocol (``raw``: tests/test_security_app.RawGradio, which reads the session's
    SSE stream line by line as it arrives, as a browser's EventSource does); reads the run to its end."""
    first = []
    t0 = time.perf_counter()

    def seen(msg: dict) -> None:
        if msg.get("msg") != "process_generating" or first:
            return
        aligned = (msg.get("output") or {}).get("data", [None, None])[1]
        # the first message carries whole values, later ones diffs: [[op, path, value], ...]
        if (isinstance(aligned, str) and aligned) or (
                isinstance(aligned, list) and any(isinstance(d, list) and len(d) == 3 and d[2] for d in aligned)):
            first.append(time.perf_counter() - t0)

    res = raw.call(fn_index, align_stream_args(draft, max_new), on_message=seen)
    if not res["ok"]:
        raise RuntimeError(f"align_stream failed: {res['error']}")
    if not first:
        raise RuntimeError("align_stream returned no correction text")
    return first[0]


def in_process_first_delta(aligner, max_new: int, repeats: int) -> tuple[float, float]:
    aligner.align(QUERY, DRAFT, "helpfulness", max_new_tokens=4)  # warm-up
    firsts, totals = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        first = None
        for _delta in aligner.stream(QUERY, DRAFT, "helpfulness,readability", max_new_tokens=max_new):
            first = first if first is not None else time.perf_counter() - t0
        firsts.append(first)
        totals.append(time.perf_counter() - t0)
    return statistics.median(firsts), statistics.median(totals)


def serve_without_checks(app_args: list[str]) -> None:
    """``python app.py`` with the request checks of webapp.security replaced by identity functions
    (the "before" side of --checks-ab; never used outside this benchmark)."""
    from webapp import security as sec

    sec.check_text = lambda label, value, limit, required=False: value if isinstance(value, str) else ""
    sec.check_objective_lines = lambda text, limits=None: text or ""
    sec.check_choices = lambda label, values, allowed: values or []
    sec.check_number = lambda label, value, lo, hi: value
    sec.strip_credentials = lambda text: text
    sec.ModelAllowList.check = lambda self, kind, spec, limits=None: (spec or "default").strip() or "default"
    sec.SessionSlots.acquire = lambda self, session: None
    sec.SessionSlots.release = lambda self, session: None
    import app

    sys.argv = ["app.py", *app_args]
    sys.exit(app.main(app_args))


def start_app(port: int, db: str, max_new: int, threads: int | None, checks: bool) -> subprocess.Popen:
    args = ["--port", str(port), "--db", db, "--max-new-tokens", str(max_new),
            *(["--threads", str(threads)] if threads else [])]
    cmd = [sys.executable, "app.py", *args] if checks else \
        [sys.executable, "bench/bench_app.py", "--serve-without-checks", *args]
    return subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def checks_cost(n: int = 5000) -> float:
    """Seconds the request checks of one Align request take (the same calls run_align makes)."""
    from webapp import security as sec

    allow = sec.ModelAllowList(["default", "openai:gpt-4o-mini"], ["default"])
    slots = sec.SessionSlots()
    allowed = {"ultrafeedback/helpfulness", "ultrafeedback/honesty"}
    t0 = time.perf_counter()
    for _ in range(n):
        allow.check("policy", "default")
        allow.check("aligner", "default")
        for values in (["ultrafeedback/helpfulness"], [], [], []):
            sec.check_choices("objectives", values, allowed)
        sec.check_objective_lines("")
        sec.check_text("query", QUERY, sec.LIMITS.query)
        sec.check_text("draft", DRAFT, sec.LIMITS.draft)
        for value in (64, 0.0, 1.0, 1.0):
            sec.check_number("n", value, 0, 1024)
        slots.acquire("s")
        slots.release("s")
        sec.strip_credentials("The aligner SmolLM2-135M-Instruct (embedded) is correcting the draft…")
    return (time.perf_counter() - t0) / n


def checks_ab(args) -> None:
    from gradio_client import Client

    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start")
    with tempfile.TemporaryDirectory() as tmp:
        procs, clients = {}, {}
        try:
            for label, checks in (("with checks", True), ("checks off", False)):
                port = free_port()
                procs[label] = start_app(port, f"sqlite:///{tmp}/{'on' if checks else 'off'}.db",
                                         args.max_new_tokens, args.threads, checks)
                wait_http(f"http://127.0.0.1:{port}/", procs[label])
                clients[label] = Client(f"http://127.0.0.1:{port}/", verbose=False)
                clients[label].predict(QUERY, "helpfulness", DRAFT, api_name="/align")  # models loaded, warm
            times = {label: [] for label in clients}
            for _ in range(args.repeats):
                for label, client in clients.items():
                    times[label].append(stream_times(client, DRAFT, args.max_new_tokens)[1])
        finally:
            for proc in procs.values():
                proc.terminate()
                proc.wait(timeout=30)
    on, off = statistics.median(times["with checks"]), statistics.median(times["checks off"])
    per_request = checks_cost()
    print(f"first correction token over HTTP, pasted draft, median of {args.repeats} alternating runs:")
    for label, ts in times.items():
        print(f"  {label:12s} {statistics.median(ts):.3f} s   (runs: {', '.join(f'{t:.3f}' for t in ts)})")
    print(f"  with checks / checks off = {on / off:.3f}  (target <= 1.05)")
    print(f"the checks alone, in-process: {per_request * 1e6:.1f} us per Align request "
          f"= {per_request / off:.5%} of the first-token time")
    print(f"load average at end {os.getloadavg()[0]:.2f}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve-without-checks":
        return serve_without_checks(sys.argv[2:])
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None, help="passed to app.py --threads")
    ap.add_argument("--checks-ab", action="store_true",
                    help="only compare first-token latency with the request checks on and off (see above)")
    args = ap.parse_args()
    if args.checks_ab:
        from metaaligner_core.embedded import embedded_model_dir

        embedded_model_dir()
        return checks_ab(args)

    from metaaligner_core.embedded import embedded_model_dir

    embedded_model_dir()  # warm cache: the benchmark measures start-up, not the one-time dequantisation
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start")

    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port), "--db", f"sqlite:///{tmp}/a.db",
                                 "--max-new-tokens", str(args.max_new_tokens),
                                 *(["--threads", str(args.threads)] if args.threads else [])],
                                cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_http(url, proc)
            ready = time.perf_counter() - t0
            from gradio_client import Client

            client = Client(url, verbose=False)
            client.predict(QUERY, "helpfulness", DRAFT, api_name="/align")
            loaded = time.perf_counter() - t0
            print(f"ready (HTTP 200 on /): {ready:.2f} s after start  (target <= 5 s: {ready / 5:.2f}x of budget)")
            print(f"first /align answer:   {loaded:.2f} s after start  (background model load + one correction)")

            runs_draft = [stream_times(client, "", args.max_new_tokens) for _ in range(args.repeats)]
            runs_pasted = [stream_times(client, DRAFT, args.max_new_tokens) for _ in range(args.repeats)]
        finally:
            proc.terminate()
            proc.wait(timeout=30)

    med = lambda xs: statistics.median(xs)  # noqa: E731
    fd = med([r[0] for r in runs_draft])
    fa = med([r[1] for r in runs_pasted])
    total = med([r[2] for r in runs_pasted])
    threads = f"--threads {args.threads}" if args.threads else "torch's default threads"
    print(f"over HTTP ({threads}), median of {args.repeats}, max_new_tokens={args.max_new_tokens}:")
    print(f"  first draft token (policy):      {fd:.2f} s")
    print(f"  first correction token (pasted): {fa:.2f} s  (target <= 1 s: {fa:.2f}x of budget)")
    print(f"  whole correction:                {total:.2f} s  -> streaming shows text after "
          f"{fa / total:.0%} of the wait ({total / fa:.1f}x sooner)")
    import torch

    from metaaligner_core.inference import Aligner

    aligner = Aligner.load("default")
    default_threads = torch.get_num_threads()
    first, whole = in_process_first_delta(aligner, args.max_new_tokens, args.repeats)
    print(f"in-process Aligner.stream, {default_threads} threads: first delta {first:.2f} s, whole {whole:.2f} s")
    torch.set_num_threads(1)
    first1, whole1 = in_process_first_delta(aligner, args.max_new_tokens, args.repeats)
    print(f"in-process Aligner.stream, 1 thread:  first delta {first1:.2f} s, whole {whole1:.2f} s "
          f"-> 1 thread is {whole / whole1:.2f}x the speed of {default_threads} on this machine now")
    print(f"load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
