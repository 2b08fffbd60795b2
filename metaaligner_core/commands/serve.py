"""``metaaligner serve``: an OpenAI-compatible chat-completions server that answers with corrections."""
from __future__ import annotations

from pathlib import Path

from ..errors import MetaAlignerError


def register(sub) -> None:
    p = sub.add_parser(
        "serve", help="OpenAI-compatible server: drafts from an upstream policy, corrected by the aligner",
        description="Serve POST /v1/chat/completions (plain and streamed), GET /v1/models and GET /healthz. "
                    "The request's `model` names one of the --policy models; it writes the draft, the aligner "
                    "corrects it and the correction is the answer. Per request, "
                    'extra_body={"metaaligner": {"objectives": [...] or "SPEC"}} picks the objectives. '
                    "The web app is mounted at /ui. Concurrent requests are decoded in one batch.")
    p.add_argument("--policy", action="extend", nargs="+", metavar="MODEL",
                   help="upstream policy MODEL (repeat or list several; NAME=MODEL sets the id clients send as "
                        "`model`): default, a directory, a hub id, openai:NAME, anthropic:NAME or "
                        "openai-compatible:NAME@URL (default: default)")
    p.add_argument("--aligner", default="default", help="aligner MODEL: default, a directory or a hub id "
                   "(default: %(default)s)")
    p.add_argument("--template", default="auto", help="aligner prompt template: auto (from the aligner's name), "
                   "ultrafeedback, hh-rlhf or imhi (default: %(default)s)")
    p.add_argument("--objectives", metavar="SPEC", help="default objectives of requests that name none "
                   "(keys, \"Name: description\" items or @file; default: the template family's built-ins)")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    p.add_argument("--api-keys", metavar="FILE", help="bearer keys accepted, one per line; without it the server "
                   "only listens on loopback")
    p.add_argument("--forwarded-allow-ips", metavar="ADDRS", default="",
                   help="comma list of proxy addresses (or CIDR networks) whose X-Forwarded-For / X-Forwarded-Proto "
                        "headers are trusted for the client's address; default: none, the peer's own address counts")
    p.add_argument("--max-new-tokens", type=int, default=1024,
                   help="draft and correction length when a request gives no max_tokens (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=16, help="rows decoded at once per model (default: %(default)s)")
    p.add_argument("--max-request-bytes", type=int, default=1_000_000,
                   help="largest request body accepted; larger ones get HTTP 413 (default: %(default)s)")
    p.add_argument("--upstream-retries", type=int, default=2,
                   help="retries (with back-off) of a failed call to an API policy (default: %(default)s)")
    p.add_argument("--upstream-timeout", type=float, default=120.0,
                   help="seconds per call to an API policy (default: %(default)s)")
    p.add_argument("--device", help="cpu, cuda, mps (default: automatic)")
    p.add_argument("--dtype", default="auto",
                   help="weights of the local models: auto (bf16 on CUDA, else fp32), fp32, bf16 (on a CPU only where "
                        "it has avx512_bf16 or AMX: about 1.6x faster there, text not always fp32's), fp16 (GPU only)")
    p.add_argument("--threads", type=int, metavar="N", help="CPU threads for generation (default: torch's choice)")
    p.add_argument("--no-ui", dest="ui", action="store_false", help="do not mount the web app at /ui")
    p.add_argument("--db", dest="db_url", metavar="URL",
                   help="the web app's annotation database, any SQLAlchemy URL (default: the app's)")
    p.set_defaults(func=run)


def read_api_keys(path: str) -> list[str]:
    """Keys from a file, one per line (blank lines and ``#`` comments skipped)."""
    f = Path(path)
    if not f.is_file():
        raise MetaAlignerError(f"{f}: API keys file not found")
    keys = []
    for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if any(c.isspace() for c in line):
            raise MetaAlignerError(f"{f}:{n}: a key may not contain spaces (one key per line)")
        keys.append(line)
    if not keys:
        raise MetaAlignerError(f"{f}: no API keys in the file (one key per line)")
    return keys


def check_args(args) -> list[str] | None:
    """Flag checks that need no model; returns the API keys (None when no file is given)."""
    from ..serve import forwarded_allow_ips, is_loopback
    from ..templates import TEMPLATE_NAMES

    if not 0 < args.port < 65536:
        raise MetaAlignerError(f"--port: expected 1..65535, got {args.port}")
    for flag in ("max_new_tokens", "batch_size", "max_request_bytes"):
        if getattr(args, flag) < 1:
            raise MetaAlignerError(f"--{flag.replace('_', '-')}: expected a positive number, got {getattr(args, flag)}")
    if args.upstream_retries < 0 or args.upstream_timeout <= 0:
        raise MetaAlignerError("--upstream-retries must be >= 0 and --upstream-timeout > 0")
    if args.threads is not None and args.threads < 1:
        raise MetaAlignerError(f"--threads: expected a positive number, got {args.threads}")
    if args.template not in ("auto", *TEMPLATE_NAMES):
        raise MetaAlignerError(f'--template "{args.template}": expected auto, {", ".join(TEMPLATE_NAMES)}')
    check_dtype(args.dtype, args.device)
    forwarded_allow_ips(args.forwarded_allow_ips)
    keys = read_api_keys(args.api_keys) if args.api_keys else None
    if keys is None and not is_loopback(args.host):
        raise MetaAlignerError(f"--host {args.host}: without --api-keys the server only listens on loopback "
                               "(127.0.0.1, ::1, localhost); give --api-keys FILE to listen on other interfaces")
    return keys


def check_dtype(dtype: str, device: str | None, cpuinfo: str | None = None) -> None:
    """Refuse a ``--dtype`` this device would compute slowly or not at all: bf16 on a CPU without
    native bf16 (avx512_bf16 or AMX), fp16 on a CPU."""
    if dtype not in ("auto", "fp32", "bf16", "fp16"):
        raise MetaAlignerError(f'--dtype "{dtype}": expected auto, fp32, bf16 or fp16')
    if dtype in ("auto", "fp32"):
        return
    from ..hardware import cpu_has_fast_bf16
    from ..models import auto_device

    if auto_device(device) != "cpu":
        return
    if dtype == "fp16":
        raise MetaAlignerError("--dtype fp16: not on a CPU (it has no fp16 matrix products); use fp32, or bf16 on a "
                               "CPU with avx512_bf16 or AMX")
    if not cpu_has_fast_bf16(cpuinfo):
        raise MetaAlignerError("--dtype bf16: this CPU has neither avx512_bf16 nor AMX, so bf16 would be emulated "
                               "and slower than fp32; use fp32")


def forwarded_settings(allow: str) -> dict:
    """uvicorn's proxy settings for ``--forwarded-allow-ips``: forwarded headers are applied only
    from the listed peers; with none listed they are ignored (uvicorn's own default trusts
    127.0.0.1, so that any local process could claim any address)."""
    from ..serve import forwarded_allow_ips

    ips = forwarded_allow_ips(allow)
    return {"proxy_headers": bool(ips), "forwarded_allow_ips": ",".join(ips) if ips else None}


def launch_warnings(host: str, keys) -> list[str]:
    """What the operator should know before the server listens (printed as warnings)."""
    if is_loopback_host(host):
        return []
    if not keys:  # check_args refuses this; kept so that no caller can listen openly in silence
        return [f"listening on {host} without --api-keys: anyone who reaches this port can use the server, its "
                "web app and the upstream API keys' quota"]
    return [f"listening on {host}: the bearer keys and the /ui sign-in travel in clear text unless a TLS reverse "
            "proxy fronts this server (see docs/security.md)"]


def is_loopback_host(host: str) -> bool:
    from ..serve import is_loopback

    return is_loopback(host)


def run(args) -> int:
    import logging

    log = logging.getLogger("metaaligner_core.serve")
    keys = check_args(args)
    for warning in launch_warnings(args.host, keys):
        log.warning("warning: %s", warning)
    import uvicorn

    from ..serve.api import create_app, mount_ui
    from ..serve.service import CorrectionService

    if args.ui:  # the web app's registry adds the status line its page shows; the models are the same
        from webapp.service import ModelRegistry
    else:
        from ..pipeline import ModelRegistry
    service = CorrectionService(policies=args.policy or ["default"], aligner=args.aligner,
                                template=None if args.template == "auto" else args.template,
                                objectives=args.objectives, max_new_tokens=args.max_new_tokens,
                                batch_size=args.batch_size, device=args.device, dtype=args.dtype,
                                upstream_retries=args.upstream_retries, upstream_timeout=args.upstream_timeout,
                                registry_class=ModelRegistry)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    log.info("loading the aligner and the local policies…")
    service.load()
    app = create_app(service, api_keys=keys, max_request_bytes=args.max_request_bytes)
    if args.ui:
        mount_ui(app, service, db_url=args.db_url, api_keys=keys)
    log.info("serving %s on http://%s:%d/v1 (policies: %s; keys: %s)", service.describe()["aligner"], args.host,
             args.port, ", ".join(service.policies), f"{len(keys)} from {args.api_keys}" if keys else "none, loopback only")

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None):
            # SIGTERM/SIGINT: requests in flight get a 503 error within one decoding step, so the
            # connections close and the process exits in seconds, however busy the models are.
            service.shutdown(wait=False)
            await super().shutdown(sockets)

    try:
        # uvicorn's own access log would write query strings (?api_key=...): RequestGuard logs instead.
        Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="info", access_log=False,
                              timeout_graceful_shutdown=10, **forwarded_settings(args.forwarded_allow_ips))).run()
    finally:
        service.close()
    return 0
