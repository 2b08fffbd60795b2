"""The annotation side of the page: the Annotate and Export tabs of :mod:`annotation.ui` and the
Accounts tab of :mod:`webapp.accounts_tab`, sharing one sign-in, and the protocols the Align tab
offers for "Send to annotation"."""
import importlib


def annotation_protocols() -> list[str]:
    try:
        from annotation.protocols import builtin_protocols
    except ModuleNotFoundError:
        return ["imhi"]
    return builtin_protocols()


def build_annotation_tabs(db_url: str, first_run=None):
    """The Annotate, Export and Accounts tabs, or placeholders while :mod:`annotation.ui` is
    absent. Returns the ``gr.State`` holding the sign-in token (None without the annotation tools)."""
    import gradio as gr

    try:
        annotation_ui = importlib.import_module("annotation.ui")
    except ModuleNotFoundError as e:
        if e.name not in ("annotation.ui", "annotation"):
            raise
        annotation_ui = None
    signed_in = None
    with gr.Tab("Annotate", id="annotate"):
        if annotation_ui is None:
            gr.Markdown("The annotation tools are not part of this build (module `annotation.ui` is missing).")
        else:
            signed_in = annotation_ui.build_annotate_tab(db_url)
    with gr.Tab("Export", id="export"):
        if annotation_ui is None:
            gr.Markdown("The export tools are not part of this build (module `annotation.ui` is missing).")
        else:  # one sign-in for both tabs
            annotation_ui.build_export_tab(db_url, signed_in)
    if signed_in is not None:
        from webapp.accounts_tab import build_accounts_tab

        with gr.Tab("Accounts", id="accounts"):
            build_accounts_tab(db_url, signed_in, first_run)
    return signed_in

