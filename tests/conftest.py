"""Shared test fixtures.

Tests make their own small data; nothing here reads ../shared. Tests that load the embedded
model share one cached copy (``$METAALIGNER_CACHE`` or ``~/.cache/metaaligner``).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

# Idle OpenMP threads that spin slow generation several-fold when the test's own servers and
# subprocesses share the cores; set before torch is imported (also inherited by subprocesses).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"


CHROMIUM = "/usr/bin/chromium"


def require_chromium() -> None:
    """Skip a browser test where Chromium is absent, but fail under CI, whose set-up installs it."""
    if not Path(CHROMIUM).exists():
        msg = f"{CHROMIUM} not installed (scripts/setup.sh --dev installs Debian's chromium)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def run_cli(*args, cwd=None, env=None, timeout=900, input=None) -> subprocess.CompletedProcess:
    """Run ``python -m metaaligner_core ARGS`` as a user would; returns the finished process."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "metaaligner_core", *map(str, args)], cwd=cwd or ROOT,
                          env=full_env, capture_output=True, text=True, timeout=timeout, input=input)


@contextmanager
def serve_process(cmd, *, port: int, cwd, env, log_path: Path, start_timeout: float = 600):
    """Run ``cmd`` (a ``metaaligner serve`` command line listening on ``port``) with its output in
    ``log_path``; yield its base URL once ``/healthz`` answers; stop it afterwards."""
    import httpx

    url = f"http://127.0.0.1:{port}"
    with open(log_path, "w+") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + start_timeout
            while True:
                assert proc.poll() is None, f"serve exited early:\n{Path(log_path).read_text()[-3000:]}"
                try:
                    if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, f"serve did not start in {start_timeout:.0f} s"
                time.sleep(0.5)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)


def tiny_llama_generator(max_positions: int = 256, initializer_range: float = 0.02):
    """A 2-layer random Llama with the embedded tokenizer, as a LocalGenerator (SDPA; fast)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from metaaligner_core.backends.hf import LocalGenerator
    from metaaligner_core.models import load_tokenizer

    tok = load_tokenizer("default")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         initializer_range=initializer_range)
    model = LlamaForCausalLM(config).eval()
    model.set_attn_implementation("sdpa")
    return LocalGenerator(model, tok, "tiny")


@pytest.fixture(scope="session")
def embedded_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct as a plain HF directory (dequantised once, cached)."""
    from metaaligner_core.embedded import embedded_model_dir

    return embedded_model_dir()


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


# ----------------------------------------------------------------------------- PostgreSQL
# The annotation store's tests run on SQLite and on a real PostgreSQL server (tests/pg_server.py).

def _pg_missing() -> str | None:
    from pg_server import pg_bindir

    if pg_bindir() is None:
        return "PostgreSQL not installed (scripts/setup.sh --dev installs Debian's postgresql)"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg not installed (pip install -r requirements.txt)"
    return None


@pytest.fixture(scope="session")
def pg_server():
    """One PostgreSQL server for the session: skipped where absent, but a failure under CI."""
    from pg_server import PgServer

    missing = _pg_missing()
    if missing:
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail(f"CI: {missing}")
        pytest.skip(missing)
    server = PgServer.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def pg_url(pg_server):
    """A fresh, empty database on the session's server; dropped after the test."""
    name = pg_server.create_database()
    url = pg_server.url(name)
    try:
        yield url
    finally:
        from annotation.store import dispose_engine

        dispose_engine(url)
        pg_server.drop_database(name)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    """The annotation store's URL, once per database: a SQLite file and a PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ann.db'}"
    return request.getfixturevalue("pg_url")
