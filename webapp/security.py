"""The app's safety rules, without Gradio: which models a visitor may pick, input limits, one
generation per session, what the model status may show, and launch-time checks.

Every Gradio event handler is a public HTTP endpoint (``/gradio_api/queue/join`` accepts any
``fn_index`` and any ``session_hash``), whatever the page shows or hides. So the web app calls these
checks inside each handler, on the server, for every request. See docs/security.md.
"""
from __future__ import annotations

import ipaddress
import logging
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from metaaligner_core.errors import MetaAlignerError

log = logging.getLogger("metaaligner.app.security")

AUTH_ENV = "METAALIGNER_APP_AUTH"  # USER:PASS for the whole app, instead of --auth on the command line


# --------------------------------------------------------------------------- input limits

@dataclass(frozen=True)
class Limits:
    """Caps on what one request may send (characters), checked before any model work.

    The defaults hold a long question, a long answer and a dozen objectives; a larger draft would
    also outgrow the aligner's context window.
    """

    query: int = 4000
    draft: int = 8000
    objectives: int = 2000  # the "new objectives" box
    objective_lines: int = 20
    model: int = 300  # a MODEL string
    short: int = 100  # template / protocol names
    max_new_tokens: int = 1024
    queue: int = 32  # requests waiting in Gradio's queue, all events together
    upload: str = "1mb"  # gradio max_file_size; the app takes no uploads, so anything bigger is refused


LIMITS = Limits()


def check_text(label: str, value, limit: int, *, required: bool = False) -> str:
    """``value`` as text within ``limit`` characters; a one-line error otherwise."""
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise MetaAlignerError(f"{label}: expected text")
    if len(value) > limit:
        raise MetaAlignerError(f"{label}: {len(value):,} characters, more than the {limit:,} this app accepts; "
                               "shorten it")
    if required and not value.strip():
        raise MetaAlignerError(f"{label}: empty")
    return value


def check_objective_lines(text, limits: Limits = LIMITS) -> str:
    text = check_text("new objectives", text, limits.objectives)
    if len([ln for ln in text.splitlines() if ln.strip()]) > limits.objective_lines:
        raise MetaAlignerError(f"new objectives: more than {limits.objective_lines} lines; keep the most important ones")
    return text


def check_choices(label: str, values, allowed: set[str]) -> list[str]:
    """Ticked checkbox values must be among the offered ones (a raw request can send anything)."""
    if values is None:
        return []
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise MetaAlignerError(f"{label}: expected a list of choices")
    bad = [v for v in values if v not in allowed]
    if bad:
        raise MetaAlignerError(f"{label}: unknown choice {plain(bad[0], 60)!r}")
    return values


def check_number(label: str, value, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise MetaAlignerError(f"{label}: expected a number from {lo:g} to {hi:g}")
    return value


# --------------------------------------------------------------------------- model strings

_URL = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<userinfo>[^/@\s]*@)?")
_SECRET_PARAM = re.compile(r"(?i)([?&;](?:api[_-]?key|key|token|access[_-]?token|secret|password|pass|sig|signature)=)"
                           r"[^&#\s]*")
_KEY_LIKE = re.compile(r"\b(sk-[A-Za-z0-9_-]{8,}|sk-ant-[A-Za-z0-9_-]{8,}|hf_[A-Za-z0-9]{8,})")


def strip_credentials(text: str) -> str:
    """``text`` with user:password in URLs, secret query parameters and key-shaped tokens removed."""
    text = _URL.sub(lambda m: m.group("scheme") + ("***@" if m.group("userinfo") else ""), str(text))
    text = _SECRET_PARAM.sub(lambda m: m.group(1) + "***", text)
    return _KEY_LIKE.sub("***", text)


def plain(text, limit: int = 200) -> str:
    """One line of plain text (no newlines, no control characters), at most ``limit`` characters."""
    text = "".join(c if c.isprintable() else " " for c in str(text)).strip()
    return text if len(text) <= limit else text[: limit - 1] + "…"


def model_label(spec: str) -> str:
    """How a MODEL string may be shown: credentials stripped, plain, short."""
    return plain(strip_credentials(spec), 120)


def endpoint_of(spec: str) -> str | None:
    """``scheme://host:port`` of an ``openai-compatible:NAME@URL`` spec (None for other specs)."""
    if not spec.startswith("openai-compatible:") or "@" not in spec:
        return None
    url = spec.split("@", 1)[1]
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return f"{parts.scheme}://{(parts.hostname or '').lower()}:{port}"
    except ValueError:
        return "invalid"


class ModelAllowList:
    """Which MODEL strings visitors may use, per kind (``policy`` / ``aligner``).

    Only what the operator configured: ``--policy``, ``--aligner`` and ``--allow-models``. With
    ``allow_any`` (``--allow-any-model``) other strings are accepted too, except an
    ``openai-compatible:`` endpoint whose scheme, host and port the operator did not configure
    (the backend would send it an API key), and user:password in any URL.
    """

    def __init__(self, policies, aligners, allow_any: bool = False):
        self._allowed = {"policy": list(dict.fromkeys(p.strip() for p in policies if p and p.strip())),
                         "aligner": list(dict.fromkeys(a.strip() for a in aligners if a and a.strip()))}
        self.allow_any = allow_any
        self._endpoints = {e for specs in self._allowed.values() for s in specs if (e := endpoint_of(s))}

    def add(self, kind: str, spec: str) -> None:
        """Offer one more MODEL string (what ``--allow-models`` does at start-up)."""
        spec = spec.strip()
        if spec not in self._allowed[kind]:
            self._allowed[kind].append(spec)
        if (e := endpoint_of(spec)):
            self._endpoints.add(e)

    def configured(self, kind: str) -> list[str]:
        return list(self._allowed[kind])

    @staticmethod
    def public(spec: str) -> str:
        """The value the page gets for a configured MODEL string: credentials in it stay on the
        server (``check`` maps the public value back)."""
        return strip_credentials(spec)

    def check(self, kind: str, spec, limits: Limits = LIMITS) -> str:
        """The MODEL string to use, or a one-line refusal (never echoing credentials)."""
        spec = check_text(kind, spec, limits.model).strip() or "default"
        if spec in self._allowed[kind]:
            return spec
        for configured in self._allowed[kind]:
            if spec == self.public(configured):
                return configured
        shown = model_label(spec)
        if not self.allow_any:
            raise MetaAlignerError(f'{kind} "{shown}": not offered by this server (choose one from the list; '
                                   "the operator adds models with --allow-models)")
        if "://" in spec and re.search(r"://[^/@\s]*@", spec):
            raise MetaAlignerError(f'{kind} "{shown}": URLs with user:password are refused')
        endpoint = endpoint_of(spec)
        if endpoint is not None and endpoint not in self._endpoints:
            raise MetaAlignerError(f'{kind} "{shown}": this server sends requests only to the OpenAI-compatible '
                                   "endpoints its operator configured")
        return spec


# --------------------------------------------------------------------------- sessions

class SessionSlots:
    """At most one generation per browser session at a time (other sessions are not affected)."""

    def __init__(self):
        self._busy: set[str] = set()
        self._lock = threading.Lock()

    def acquire(self, session: str) -> None:
        with self._lock:
            if session in self._busy:
                raise MetaAlignerError("a generation is already running in this session; wait for it or press Stop")
            self._busy.add(session)

    def release(self, session: str) -> None:
        with self._lock:
            self._busy.discard(session)

    def busy(self, session: str) -> bool:
        with self._lock:
            return session in self._busy


def client_address(request) -> str | None:
    """The client's address as the server saw it: the TCP peer's, or X-Forwarded-For's when the
    peer is a proxy the operator listed with ``--forwarded-allow-ips`` (default: none)."""
    client = getattr(request, "client", None)
    return getattr(client, "host", None) or None


# --------------------------------------------------------------------------- launch

def read_auth(value: str | None, auth_file: str | None, env=os.environ) -> tuple[str, str] | None:
    """USER:PASS from ``--auth-file FILE`` (first line), ``$METAALIGNER_APP_AUTH`` or ``--auth``."""
    source, text = None, None
    if auth_file:
        try:
            text = Path(auth_file).read_text(encoding="utf-8").splitlines()[0].strip()
        except (OSError, IndexError, UnicodeDecodeError) as e:
            raise MetaAlignerError(f"--auth-file {auth_file}: cannot read a USER:PASS line ({type(e).__name__})") from None
        source = f"--auth-file {auth_file}"
    elif env.get(AUTH_ENV):
        text, source = env[AUTH_ENV].strip(), f"${AUTH_ENV}"
    elif value is not None:
        text, source = value, "--auth"
    if text is None:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise MetaAlignerError(f'{source}: expected "USER:PASS"')
    return user, password


def is_loopback(host: str) -> bool:
    if host in ("localhost", "") or host.startswith("127."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def launch_warnings(host: str, share: bool, auth) -> list[str]:
    """Warnings for a server reachable beyond this machine without a login."""
    out = []
    if auth is None and share:
        out.append("--share opens a public gradio.live link and no --auth is set: anyone with the link can use "
                   "this app and its API keys' quota. Set --auth-file or $" + AUTH_ENV + " (see docs/security.md).")
    elif auth is None and not is_loopback(host):
        out.append(f"listening on {host} without --auth: anyone who reaches this port can use the app and its API "
                   f"keys' quota. Put it behind a TLS reverse proxy with a login, or set --auth-file or "
                   f"${AUTH_ENV} (see docs/security.md).")
    if auth is not None and share is False and not is_loopback(host):
        out.append(f"listening on {host}: the --auth password travels in clear text unless a TLS reverse proxy "
                   "is in front (see docs/security.md).")
    return out
