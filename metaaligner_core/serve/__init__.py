"""``metaaligner serve``: an OpenAI-compatible server whose answers are corrected by the aligner.

Any OpenAI client sends a chat completion; the configured upstream policy writes the draft, the
aligner corrects it for the request's objectives, and the correction comes back as the answer
(with the draft and what was done in a ``metaaligner`` object). Concurrent requests are
decoded together.

- :mod:`.protocol`: the request and response shapes (OpenAI's, plus ``metaaligner``);
- :mod:`.service`: draft → correction with the loaded models;
- :mod:`.batcher`: requests from all clients through the engine in one batch;
- :mod:`.api`: the FastAPI routes; :class:`ServerThread` runs one in-process (tests, benchmarks).
"""
from __future__ import annotations

import ipaddress
import socket
import threading
import time

LOOPBACK_NAMES = ("localhost",)


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def forwarded_allow_ips(spec: str | None, flag: str = "--forwarded-allow-ips") -> list[str]:
    """The proxies (addresses or CIDR networks) whose ``X-Forwarded-For`` is trusted, from a
    comma list; empty: none (the TCP peer's address counts). One clear error for a bad item."""
    from ..errors import MetaAlignerError

    out = []
    for item in (spec or "").split(","):
        item = item.strip()
        if not item:
            continue
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise MetaAlignerError(f'{flag}: "{item}" is not an IP address or network (e.g. 10.0.0.5,10.1.0.0/16)') \
                from None
        out.append(item)
    return out


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServerThread:
    """A uvicorn server for ``app`` in a background thread; ``with`` starts it and stops it."""

    def __init__(self, app, host: str = "127.0.0.1", port: int | None = None, log_level: str = "warning"):
        import uvicorn

        self.host, self.port = host, port or free_port(host)
        self.server = uvicorn.Server(uvicorn.Config(app, host=self.host, port=self.port, log_level=log_level,
                                                    access_log=False))
        self.server.install_signal_handlers = lambda: None  # not the main thread
        self.thread = threading.Thread(target=self.server.run, name="metaaligner-serve", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start on {self.url}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
