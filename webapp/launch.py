"""Starting the web app: a private upload folder, the first-admin set-up token, the Gradio
server with a bounded queue, model preloading, and ``python app.py``'s :func:`main`."""
import atexit
import logging
import os
import shutil
import sys
import tempfile

from metaaligner_core.errors import MetaAlignerError
from webapp import security as sec
from webapp.align_tab import build_demo
from webapp.config import AppConfig, parse_args

log = logging.getLogger("metaaligner.app")


def private_temp_dir() -> str:
    """A folder only this user can read (0700) for Gradio's uploads and served files, removed at
    exit; set as GRADIO_TEMP_DIR before the Blocks are built (Gradio reads it then)."""
    path = tempfile.mkdtemp(prefix="metaaligner-app-")
    os.environ["GRADIO_TEMP_DIR"] = path
    atexit.register(shutil.rmtree, path, True)
    return path


def first_run_setup(config: AppConfig):
    """A one-time set-up token when the annotation database has no admin yet (None otherwise);
    the token is printed to the server log only."""
    try:
        from annotation.accounts import FirstRun, needs_first_admin
        from annotation.store import Store
    except ImportError:
        return None
    if not needs_first_admin(Store(config.db_url)):
        return None
    first = FirstRun()
    log.warning("No admin account yet. Open the app's Accounts tab and create the first admin with this "
                "one-time set-up token: %s", first.token)
    return first


def launch(config: AppConfig, *, block: bool = True, quiet: bool = False):
    """Build, serve and (unless ``config.preload`` is off) start loading the models in the
    background once the server answers. Returns the running demo."""
    for warning in sec.launch_warnings(config.host, config.share, config.auth):
        log.warning("%s", warning)
        if quiet:  # the log may not be shown; the operator must still see this
            print(f"app.py: warning: {warning}", file=sys.stderr)
    if not os.environ.get("GRADIO_TEMP_DIR"):
        private_temp_dir()
    first_run = first_run_setup(config)
    demo = build_demo(config, first_run=first_run)
    demo.first_run = first_run  # the set-up token's holder (None when an admin exists)
    # A bounded queue: requests beyond it are refused at once instead of piling up in memory.
    # Generation has its own limit (concurrency_id "generation"); other events are quick.
    demo.queue(max_size=config.limits.queue)
    # Gradio's uvicorn reads the trusted proxies from the environment (its default trusts
    # 127.0.0.1, so any local process could claim any address): none unless the operator lists them.
    os.environ["FORWARDED_ALLOW_IPS"] = config.forwarded_allow_ips
    demo.launch(server_name=config.host, server_port=config.port, share=config.share, auth=config.auth,
                prevent_thread_lock=True, quiet=quiet, show_error=False, max_file_size=config.limits.upload)
    if config.preload:
        demo.service.registry.preload(policy=config.policy, aligner=config.aligner)
    if demo.train_jobs is not None:  # a training job does not outlive the server
        atexit.register(demo.train_jobs.shutdown)
    if block:
        demo.block_thread()
    return demo



def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    config = parse_args(argv)
    try:
        launch(config)
    except MetaAlignerError as e:
        print(f"app.py: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0

