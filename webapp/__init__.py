"""The web app's side of MetaAligner: presentation strings, UI choices and the annotation hand-off.

The correction itself lives in :mod:`metaaligner_core.pipeline`; ``app.py`` builds the Gradio UI
on :class:`webapp.service.AlignService`.
"""
