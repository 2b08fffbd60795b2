"""The MetaAligner web app (``python app.py`` starts it; ``metaaligner serve`` mounts it at ``/ui``).

- :mod:`webapp.config` — the command line, :class:`~webapp.config.AppConfig` and the model allow-list;
- :mod:`webapp.align_tab` — the page (:func:`~webapp.align_tab.build_demo`) and its Align tab;
- :mod:`webapp.annotation_tabs` — the Annotate and Export tabs (:mod:`annotation.ui`) with one sign-in;
- :mod:`webapp.accounts_tab` — first-run set-up and account management;
- :mod:`webapp.security` — the checks every event handler runs, without Gradio;
- :mod:`webapp.service` — what the events do, on :mod:`metaaligner_core.pipeline`;
- :mod:`webapp.launch` — serving, the private upload folder, first-run token, :func:`~webapp.launch.main`.

Importing any of them is cheap: Gradio and the models load when the page is built or used.
"""
