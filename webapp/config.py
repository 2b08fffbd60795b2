"""The web app's settings: :class:`AppConfig` (one instance's flags), the ``python app.py``
command line (:func:`parse_args`), the model allow-list visitors get (:func:`allow_list`) and the
align service built from them (:func:`make_service`)."""
import argparse
import logging
import os
from dataclasses import dataclass, field

from annotation import DEFAULT_DB_URL as DEFAULT_DB
from metaaligner_core.errors import MetaAlignerError
from webapp import security as sec

log = logging.getLogger("metaaligner.app")


@dataclass
class AppConfig:
    """Settings of one app instance (the command-line flags).

    policy / aligner: MODEL strings used at start-up and by the ``align`` API.
    template: aligner prompt template, ``auto`` picks it from the aligner's name.
    db_url: SQLAlchemy URL of the annotation store.
    host / port / share / auth: where and how Gradio serves.
    forwarded_allow_ips: proxies whose X-Forwarded-For is trusted as the client's address
        (comma list of addresses or networks); empty: none, the TCP peer's address counts
        (per-address sign-in throttling must not be fooled by a forged header).
    max_new_tokens: default generation length (UI slider start and API setting).
    concurrency: Align runs (and ``align`` API calls) that may run at once. A local model's runs
        share one decoding batch (its step scheduler), so several cost little more than one.
    max_models: loaded models kept per kind before the least recently used is dropped.
    preload: load the start-up models in the background right after launch.
    threads: CPU threads per generation (torch.set_num_threads); None keeps torch's default.
        On a CPU shared with other busy processes, 1 is often several times faster.
    allow_models: further MODEL strings visitors may pick (besides policy, aligner and default).
    allow_any_model: accept any MODEL string a visitor types (still never sends an API key to an
        OpenAI-compatible endpoint the operator did not configure).
    limits: input caps, queue size and upload limit (:class:`webapp.security.Limits`).
    train_bases: MODEL strings the Train tab may start a job from (default: ``default``, the embedded model).
    runs_dir: where the Train tab's jobs write (one directory per job).
    train_threads: CPU threads a training job may use (default: half the cores).
    """

    policy: str = "default"
    aligner: str = "default"
    template: str = "auto"
    db_url: str = DEFAULT_DB
    host: str = "127.0.0.1"
    port: int = 7860
    share: bool = False
    auth: tuple[str, str] | None = None
    forwarded_allow_ips: str = ""
    max_new_tokens: int = 256
    concurrency: int = 4
    max_models: int = 2
    preload: bool = True
    threads: int | None = None
    allow_models: list[str] = field(default_factory=list)
    allow_any_model: bool = False
    limits: sec.Limits = sec.LIMITS
    train_bases: list[str] = field(default_factory=lambda: ["default"])
    runs_dir: str = "data/runs"
    train_threads: int | None = None


def parse_args(argv: list[str] | None = None) -> AppConfig:
    from metaaligner_core.templates import TEMPLATE_NAMES

    p = argparse.ArgumentParser(prog="python app.py", description="MetaAligner web app (Gradio).")
    p.add_argument("--policy", default="default", help="policy MODEL: default, a directory, a hub id, "
                   "openai:NAME, anthropic:NAME or openai-compatible:NAME@URL (default: %(default)s)")
    p.add_argument("--aligner", default="default", help="aligner MODEL: default, a directory (e.g. a `train` "
                   "output), a hub id or openai-compatible:NAME@URL (default: %(default)s)")
    p.add_argument("--template", default="auto", choices=["auto", *TEMPLATE_NAMES],
                   help="aligner prompt template; auto picks it from the aligner's name (default: %(default)s)")
    p.add_argument("--db", dest="db_url", default=DEFAULT_DB, metavar="URL",
                   help="annotation database, any SQLAlchemy URL (default: %(default)s)")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on; 0.0.0.0 for all (default: %(default)s)")
    p.add_argument("--port", type=int, default=7860, help="port (default: %(default)s)")
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    p.add_argument("--auth", metavar="USER:PASS", help="require this login for the whole app (visible in `ps`: "
                   f"prefer --auth-file or ${sec.AUTH_ENV})")
    p.add_argument("--auth-file", metavar="FILE", help="read USER:PASS for the whole app from the first line of FILE")
    p.add_argument("--forwarded-allow-ips", metavar="ADDRS", default="",
                   help="comma list of reverse-proxy addresses (or networks) whose X-Forwarded-For is trusted as "
                        "the client's address; default: none, the connecting peer's address counts")
    p.add_argument("--allow-models", metavar="MODEL,...", action="append", default=[],
                   help="further MODEL strings visitors may pick (comma-separated, repeatable); besides "
                        "--policy, --aligner and default, nothing else is accepted")
    p.add_argument("--allow-any-model", action="store_true",
                   help="accept any MODEL string visitors type (API keys still go only to configured endpoints)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="default generation length (default: %(default)s)")
    p.add_argument("--concurrency", type=int, default=4,
                   help="generations running at once, sharing each model's decoding batch (default: %(default)s)")
    p.add_argument("--max-models", type=int, default=2, help="loaded models kept per kind (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads per generation (default: torch's choice); 1 helps on a busy shared CPU")
    p.add_argument("--no-preload", dest="preload", action="store_false",
                   help="load models on first use instead of right after start")
    p.add_argument("--train-base", metavar="MODEL,...", action="append", default=[],
                   help="base models the Train tab may train from (comma-separated, repeatable; default: default)")
    p.add_argument("--runs-dir", default="data/runs", metavar="DIR",
                   help="where the Train tab's jobs write (default: %(default)s)")
    p.add_argument("--train-threads", type=int, default=None, metavar="N",
                   help="CPU threads a training job may use (default: half the cores)")
    a = p.parse_args(argv)
    try:
        auth = sec.read_auth(a.auth, a.auth_file)
    except MetaAlignerError as e:
        p.error(str(e))
    if a.auth is not None and not a.auth_file and not os.environ.get(sec.AUTH_ENV):
        log.warning("--auth USER:PASS is visible to every local user in the process list; "
                    "use --auth-file FILE or $%s instead", sec.AUTH_ENV)
    allow = [m.strip() for item in a.allow_models for m in item.split(",") if m.strip()]
    from metaaligner_core.serve import forwarded_allow_ips

    try:
        forwarded = ",".join(forwarded_allow_ips(a.forwarded_allow_ips))
    except MetaAlignerError as e:
        p.error(str(e))
    if a.concurrency < 1 or a.max_models < 1 or a.max_new_tokens < 1 or any(
            n is not None and n < 1 for n in (a.threads, a.train_threads)):
        p.error("--concurrency, --max-models, --max-new-tokens, --threads and --train-threads must be >= 1")
    bases = [m.strip() for item in a.train_base for m in item.split(",") if m.strip()] or ["default"]
    return AppConfig(policy=a.policy, aligner=a.aligner, template=a.template, db_url=a.db_url, host=a.host,
                     port=a.port, share=a.share, auth=auth, forwarded_allow_ips=forwarded,
                     max_new_tokens=a.max_new_tokens,
                     concurrency=a.concurrency, max_models=a.max_models, preload=a.preload, threads=a.threads,
                     allow_models=allow, allow_any_model=a.allow_any_model, train_bases=bases,
                     runs_dir=a.runs_dir, train_threads=a.train_threads)


def allow_list(config: AppConfig) -> sec.ModelAllowList:
    """The MODEL strings visitors may use: the configured ones and ``default``, unless opted out."""
    return sec.ModelAllowList(policies=[config.policy, "default", *config.allow_models],
                              aligners=[config.aligner, "default", *config.allow_models],
                              allow_any=config.allow_any_model)


def make_service(config: AppConfig):
    from webapp.service import AlignService, GenerationSettings, ModelRegistry

    allow = allow_list(config)

    def check(kind: str, name: str) -> None:
        # The registry asks before it loads or first uses any name: a second line of defence
        # behind the handlers' own checks, covering every path to a model (API, preload).
        allow.check(kind, name, config.limits)

    registry = ModelRegistry(max_models=config.max_models, threads=config.threads, check=check)
    registry.allow_list = allow
    return AlignService(registry, policy=config.policy,
                        aligner=config.aligner, template=config.template,
                        settings=GenerationSettings(max_new_tokens=config.max_new_tokens),
                        concurrency=config.concurrency, db_url=config.db_url)

