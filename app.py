"""MetaAligner in the browser: ``python app.py`` (tabs Align, Annotate, Export, Accounts; API endpoint ``align``).

A short launcher of the web app, which lives in :mod:`webapp` (installed with the package):

- :mod:`webapp.config` — the flags below (:class:`~webapp.config.AppConfig`) and the model allow-list;
- :mod:`webapp.align_tab` — the page and its Align tab (:func:`~webapp.align_tab.build_demo`);
- :mod:`webapp.annotation_tabs`, :mod:`webapp.accounts_tab` — the Annotate, Export and Accounts tabs;
- :mod:`webapp.security` — the checks every event handler runs (see docs/security.md);
- :mod:`webapp.service` — what the events do, on :mod:`metaaligner_core.pipeline`;
- :mod:`webapp.launch` — serving, first-run set-up and :func:`~webapp.launch.main`.

    python app.py [--policy MODEL] [--aligner MODEL] [--template NAME] [--db URL]
                  [--allow-models MODEL,...] [--allow-any-model]
                  [--host 127.0.0.1] [--port 7860] [--share] [--auth-file FILE]

Nothing heavy happens at import: ``demo`` (the Gradio convention, e.g. for ``gradio app.py``) is
built on first access, and models load in a background thread once the server is up.
"""
import sys

from webapp.launch import main

__all__ = ["main"]


def __getattr__(name: str):
    # ``demo`` on first access (PEP 562): importing this module stays cheap, and tools that
    # expect a module-level ``demo`` (gradio app.py, Spaces) still find one.
    if name == "demo":
        from webapp.align_tab import build_demo
        from webapp.config import AppConfig

        globals()["demo"] = build_demo(AppConfig())
        return globals()["demo"]
    raise AttributeError(name)


if __name__ == "__main__":
    sys.exit(main())
