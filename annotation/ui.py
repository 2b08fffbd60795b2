"""The Annotate and Export tabs (Gradio 6).

The app builds them inside its own ``gr.Blocks``::

    with gr.Tab("Annotate"):
        signed_in = build_annotate_tab(db_url)
    with gr.Tab("Export"):
        build_export_tab(db_url, signed_in)   # or build_export_tab(db_url): its own sign-in

Each tab is a thin layer over :class:`annotation.store.Store`: the event handlers below turn
component values into service calls and service results into component updates. The sign-in
token lives in a ``gr.State`` (server side); passwords are cleared from the page after use and
never logged. Responses are shown without their model names, so ratings stay blind.

``python -m annotation.ui --db sqlite:///tmp/x.db`` serves just these two tabs on 127.0.0.1.
"""
from __future__ import annotations

import argparse
import html
import tempfile
import time
from pathlib import Path

from metaaligner_core.errors import MetaAlignerError

from . import export as export_mod
from .protocols import rubric_markdown
from .store import DEFAULT_DB_URL, DEFAULT_TARGET_ANNOTATORS, ItemView, Progress, Store

# Keyboard shortcuts for the Annotate tab. The tab installs them itself (a load event on the
# enclosing Blocks); an app may also pass this to ``launch(js=...)`` — it installs only once.
ANNOTATE_SHORTCUTS_JS = r"""
() => {
  if (window.__maShortcuts) return;
  window.__maShortcuts = true;
  const style = document.createElement("style");
  style.textContent = ".ma-score.ma-active{outline:3px solid var(--color-accent,#f97316);outline-offset:2px;border-radius:6px}";
  document.head.appendChild(style);
  // Only score groups on screen: other tabs keep their own arrow keys and digits.
  const groups = () => Array.from(document.querySelectorAll(".ma-score")).filter((el) => el.offsetParent !== null);
  let active = -1;
  const mark = (i) => {
    const g = groups();
    if (!g.length) { active = -1; return; }
    active = Math.max(0, Math.min(i, g.length - 1));
    g.forEach((el, k) => el.classList.toggle("ma-active", k === active));
    g[active].scrollIntoView({block: "nearest"});
  };
  const current = () => {
    const g = groups();
    if (!g.length) return -1;
    if (active < 0 || active >= g.length || !g[active].classList.contains("ma-active")) {
      const open = g.findIndex((el) => !el.querySelector("input:checked"));
      mark(open < 0 ? 0 : open);
    }
    return active;
  };
  const click = (id) => { const b = document.querySelector("#" + id); if (b) b.click(); };
  document.addEventListener("keydown", (e) => {
    const t = e.target;
    const typing = t && (t.tagName === "TEXTAREA" || (t.tagName === "INPUT" && t.type !== "radio"));
    if ((e.ctrlKey || e.metaKey) && e.key === "Enter") { e.preventDefault(); click("ma-submit"); return; }
    if ((e.ctrlKey || e.metaKey) && (e.key === "s" || e.key === "S")) { e.preventDefault(); click("ma-save"); return; }
    if (typing || e.ctrlKey || e.metaKey || e.altKey) return;
    if (["0", "1", "2", "3"].includes(e.key)) {
      const i = current();
      if (i < 0) return;
      const input = groups()[i].querySelector(`input[type=radio][value="${e.key}"]`)
        || Array.from(groups()[i].querySelectorAll("label")).find((l) => l.textContent.trim().startsWith(e.key))?.querySelector("input");
      if (input) { input.click(); e.preventDefault(); mark(i + 1); }
    } else if ((e.key === "ArrowDown" || e.key === "j") && groups().length) {
      e.preventDefault(); mark(current() + 1);
    } else if ((e.key === "ArrowUp" || e.key === "k") && groups().length) {
      e.preventDefault(); mark(current() - 1);
    }
  });
}
"""

SHORTCUTS_HELP = ("Keys: **0–3** score the highlighted objective and move on · **↓/↑** (or **j/k**) move · "
                  "**Ctrl+Enter** submit · **Ctrl+S** save draft")


# ----------------------------------------------------------------------------- rendering helpers

def progress_html(progress: Progress | None) -> str:
    if progress is None:
        return ""
    total = max(progress.total, 1)
    target = progress.target or 1
    return (
        '<div class="ma-progress">'
        f'<div>You: {progress.mine} / {progress.total} items submitted</div>'
        f'<progress value="{progress.mine}" max="{total}" style="width:100%"></progress>'
        f'<div>Overall: {progress.complete} / {progress.total} items rated by {target} '
        f'annotator{"s" if target != 1 else ""}</div>'
        f'<progress value="{progress.complete}" max="{total}" style="width:100%"></progress>'
        "</div>")


def _score_choices(objective) -> list[tuple[str, int]]:
    return [(f"{lv.score} · {lv.label}", lv.score) for lv in objective.levels]


def _rating_keys(view: ItemView) -> list[tuple[int, str]]:
    return [(r.id, o.key) for r in view.responses for o in view.protocol.objectives]


def _message(text: str, kind: str = "info") -> str:
    icon = {"info": "", "ok": "✅ ", "error": "⚠️ "}[kind]
    return f"{icon}{html.escape(text)}"


# ----------------------------------------------------------------------------- annotate handlers

def _load_next(store: Store, token: str, skipped: list[str], target: int | None):
    view = store.next_item(token, target=target, exclude=skipped)
    if view is None and skipped:  # only skipped items left: offer them again
        skipped = []
        view = store.next_item(token, target=target)
    return view, skipped


def on_sign_in(store: Store, target: int | None, name: str, password: str):
    """-> token, item, skipped, status, progress, password box, sign-in row, signed-in row, who, shown_at"""
    import gradio as gr

    try:
        token = store.sign_in(name, password)
    except MetaAlignerError as e:
        return (None, None, [], _message(str(e), "error"), "", "", gr.update(visible=True),
                gr.update(visible=False), "", time.time())
    account = store.whoami(token)
    view, skipped = _load_next(store, token, [], target)
    status = "" if view else _message("No items are waiting for you. Thank you!", "ok")
    who = f"Signed in as **{html.escape(account.name)}**{' (admin)' if account.is_admin else ''}"
    return (token, view, skipped, status, progress_html(store.progress(token, target)), "",
            gr.update(visible=False), gr.update(visible=True), who, time.time())


def on_sign_out(store: Store, token: str | None):
    import gradio as gr

    store.sign_out(token)
    return None, None, [], _message("Signed out."), "", gr.update(visible=True), gr.update(visible=False), ""


def on_save(store: Store, target: int | None, view: ItemView, submit: bool,
            token: str | None, skipped: list[str], shown_at: float, *values):
    """Save a draft or submit. -> item, skipped, status, progress, shown_at"""
    import gradio as gr

    keys = _rating_keys(view)
    scores = dict(zip(keys, values[:len(keys)]))
    notes = {r.id: (n or "").strip() for r, n in zip(view.responses, values[len(keys):])}
    notes = {rid: n for rid, n in notes.items() if n or rid in view.notes}
    elapsed = max(0.0, time.time() - (shown_at or time.time()))
    try:
        store.save(token, view.uid, scores, notes=notes, submit=submit, seconds=elapsed)
    except MetaAlignerError as e:
        return gr.skip(), gr.skip(), _message(str(e), "error"), gr.skip(), gr.skip()
    progress = progress_html(store.progress(token, target))
    if not submit:
        return gr.skip(), gr.skip(), _message(f"Draft saved at {time.strftime('%H:%M:%S')}.", "ok"), progress, time.time()
    nxt, skipped = _load_next(store, token, skipped, target)
    status = _message("Submitted." + ("" if nxt else " No more items are waiting for you. Thank you!"), "ok")
    return nxt, skipped, status, progress, time.time()


def on_skip(store: Store, target: int | None, view: ItemView, token: str | None, skipped: list[str]):
    skipped = [*skipped, view.uid]
    try:
        nxt, skipped = _load_next(store, token, skipped, target)
    except MetaAlignerError as e:
        import gradio as gr

        return gr.skip(), gr.skip(), _message(str(e), "error"), gr.skip()
    return nxt, skipped, _message("Skipped: it comes back when the other items are done."), time.time()


# ----------------------------------------------------------------------------- tabs

def build_annotate_tab(db_url: str | None = None, target_annotators: int | None = DEFAULT_TARGET_ANNOTATORS):
    """Sign-in, guidelines and rubric, one item at a time, 0–3 per objective per response.

    Returns the ``gr.State`` holding the sign-in token, for :func:`build_export_tab`.
    """
    import gradio as gr
    from gradio.context import Context

    store = Store(db_url)
    token = gr.State(None)
    item = gr.State(None)
    skipped = gr.State([])
    shown_at = gr.State(0.0)

    gr.Markdown("Rate each response from 0 to 3 on every objective. Only your own ratings are shown to you; "
                "model names are hidden. The texts may describe self-harm: nothing here is clinical advice.")
    with gr.Row(visible=True) as signin_row:
        name = gr.Textbox(label="Name", scale=2, elem_id="ma-name")
        password = gr.Textbox(label="Password", type="password", scale=2, elem_id="ma-password")
        signin_btn = gr.Button("Sign in", variant="primary", scale=1, elem_id="ma-signin")
    with gr.Row(visible=False) as signed_row:
        who = gr.Markdown(elem_id="ma-who")
        signout_btn = gr.Button("Sign out", size="sm", scale=0)
    status = gr.Markdown(elem_id="ma-status")
    progress = gr.HTML(elem_id="ma-progress")

    @gr.render(inputs=[item])
    def _render(view: ItemView | None):
        if view is None:
            return
        with gr.Row():
            with gr.Column(scale=3):
                gr.Textbox(value=view.query, label="Query", interactive=False, lines=3, max_lines=14)
                radios, notes = [], []
                for i, resp in enumerate(view.responses):
                    with gr.Group():
                        gr.Textbox(value=resp.text, label=f"Response {i + 1}", interactive=False, lines=2,
                                   max_lines=16)
                        with gr.Row():
                            for o in view.protocol.objectives:
                                radios.append(gr.Radio(
                                    choices=_score_choices(o), value=view.mine.get((resp.id, o.key)),
                                    label=f"{o.name} (response {i + 1})", info=o.description,
                                    elem_classes=["ma-score"], elem_id=f"ma-score-{i}-{_slug(o.key)}"))
                        notes.append(gr.Textbox(value=view.notes.get(resp.id, ""), label=f"Note on response {i + 1}",
                                                placeholder="optional", lines=1, elem_id=f"ma-note-{i}"))
                with gr.Row():
                    save_btn = gr.Button("Save draft", elem_id="ma-save")
                    submit_btn = gr.Button("Submit", variant="primary", elem_id="ma-submit")
                    skip_btn = gr.Button("Skip", elem_id="ma-skip")
                gr.Markdown(SHORTCUTS_HELP)
            with gr.Column(scale=2):
                gr.Markdown(rubric_markdown(view.protocol), elem_id="ma-rubric")

        common = dict(inputs=[token, skipped, shown_at, *radios, *notes],
                      outputs=[item, skipped, status, progress, shown_at], api_visibility="private")
        save_btn.click(lambda *a: on_save(store, target_annotators, view, False, *a), **common)
        submit_btn.click(lambda *a: on_save(store, target_annotators, view, True, *a), **common)
        skip_btn.click(lambda tok, sk: on_skip(store, target_annotators, view, tok, sk), inputs=[token, skipped],
                       outputs=[item, skipped, status, shown_at], api_visibility="private")

    sign_in_outputs = [token, item, skipped, status, progress, password, signin_row, signed_row, who, shown_at]
    sign_in = dict(fn=lambda n, p: on_sign_in(store, target_annotators, n, p), inputs=[name, password],
                   outputs=sign_in_outputs, api_visibility="private")
    signin_btn.click(**sign_in)
    password.submit(**sign_in)
    signout_btn.click(lambda tok: on_sign_out(store, tok), inputs=[token],
                      outputs=[token, item, skipped, status, progress, signin_row, signed_row, who],
                      api_visibility="private")
    root = Context.root_block
    if root is not None:
        root.load(None, js=ANNOTATE_SHORTCUTS_JS, api_visibility="private")
    return token


def _slug(key: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in key)


def export_view(store: Store, token: str | None, target: int | None = DEFAULT_TARGET_ANNOTATORS):
    """-> (status, agreement rows, progress rows) for an admin; raises AccessDenied otherwise."""
    results = store.agreement(token)
    overall, people = store.progress_by_annotator(token, target)
    agreement_rows = [[k, None if a.alpha is None else round(a.alpha, 3), a.units, a.annotators]
                      for k, a in results.items()]
    people_rows = [[p["annotator"], p["items"], p["ratings"], p["drafts"], "yes" if p["admin"] else ""]
                   for p in people]
    status = (f"{overall.complete} / {overall.total} items rated by {overall.target or 1} annotators. "
              "Alpha: Krippendorff's alpha, ordinal over 0–3, units = responses with at least two ratings "
              "(empty where undefined).")
    return status, agreement_rows, people_rows


def export_files(store: Store, token: str | None, out_dir: str | Path | None = None) -> dict[str, Path]:
    """Write ratings (JSONL, CSV) and pairs (JSONL) for an admin; -> {name: path}."""
    out = Path(out_dir or tempfile.mkdtemp(prefix="metaaligner-export-"))
    paths = {"ratings.jsonl": out / "ratings.jsonl", "ratings.csv": out / "ratings.csv", "pairs.jsonl": out / "pairs.jsonl"}
    ratings = store.rating_records(token)  # queried once, written twice
    export_mod.write_ratings(paths["ratings.jsonl"], ratings)
    export_mod.write_ratings(paths["ratings.csv"], ratings)
    store.export(token, "pairs", paths["pairs.jsonl"])
    return paths


def build_export_tab(db_url: str | None = None, signed_in=None,
                     target_annotators: int | None = DEFAULT_TARGET_ANNOTATORS) -> None:
    """Admins only: agreement table, progress per annotator, downloads of ratings and pairs.

    ``signed_in`` is the state returned by :func:`build_annotate_tab`; without it the tab has
    its own sign-in form.
    """
    import gradio as gr

    store = Store(db_url)
    if signed_in is None:
        signed_in = gr.State(None)
        with gr.Row():
            name = gr.Textbox(label="Admin name", scale=2, elem_id="ma-export-name")
            password = gr.Textbox(label="Password", type="password", scale=2, elem_id="ma-export-password")
            signin_btn = gr.Button("Sign in", scale=1, elem_id="ma-export-signin")
    else:
        signin_btn = None
        gr.Markdown("Sign in with an admin account on the Annotate tab.")
    status = gr.Markdown(elem_id="ma-export-status")
    refresh_btn = gr.Button("Refresh agreement and progress", elem_id="ma-export-refresh")
    agreement_df = gr.Dataframe(headers=["objective", "alpha", "units", "annotators"], label="Agreement",
                                interactive=False, elem_id="ma-agreement")
    people_df = gr.Dataframe(headers=["annotator", "items", "ratings", "drafts", "admin"], label="Annotators",
                             interactive=False)
    prepare_btn = gr.Button("Prepare downloads", variant="primary", elem_id="ma-export-prepare")
    with gr.Row():
        dl = [gr.DownloadButton(label, visible=False, elem_id=f"ma-download-{i}")
              for i, label in enumerate(["Ratings (JSONL)", "Ratings (CSV)", "Pairs (JSONL)"])]

    def refresh(token):
        try:
            s, a, p = export_view(store, token, target_annotators)
        except MetaAlignerError as e:
            return _message(str(e), "error"), None, None
        return s, a, p

    def prepare(token):
        try:
            paths = export_files(store, token)
        except MetaAlignerError as e:
            return (_message(str(e), "error"), *[gr.update(visible=False)] * 3)
        return (_message("Files ready.", "ok"),
                *[gr.update(value=str(p), visible=True) for p in paths.values()])

    refresh_btn.click(refresh, inputs=[signed_in], outputs=[status, agreement_df, people_df], api_visibility="private")
    prepare_btn.click(prepare, inputs=[signed_in], outputs=[status, *dl], api_visibility="private")
    if signin_btn is not None:
        def sign_in(n, p):
            try:
                token = store.sign_in(n, p)
            except MetaAlignerError as e:
                return None, _message(str(e), "error"), "", None, None
            s, a, pr = refresh(token)
            return token, s, "", a, pr

        signin_btn.click(sign_in, inputs=[name, password], outputs=[signed_in, status, password, agreement_df, people_df],
                         api_visibility="private")


def build_demo(db_url: str | None = None, target_annotators: int | None = DEFAULT_TARGET_ANNOTATORS):
    import gradio as gr

    with gr.Blocks(title="MetaAligner annotation", analytics_enabled=False) as demo:
        with gr.Tab("Annotate"):
            signed_in = build_annotate_tab(db_url, target_annotators)
        with gr.Tab("Export"):
            build_export_tab(db_url, signed_in, target_annotators)
    return demo


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m annotation.ui",
                                     description="Serve the Annotate and Export tabs alone (offline).")
    parser.add_argument("--db", default=None, help=f"SQLAlchemy URL or SQLite path (default: {DEFAULT_DB_URL})")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7861)
    parser.add_argument("--target", type=int, default=DEFAULT_TARGET_ANNOTATORS, help="annotators wanted per item")
    args = parser.parse_args(argv)
    build_demo(args.db, args.target).launch(server_name=args.host, server_port=args.port)


if __name__ == "__main__":
    main()
