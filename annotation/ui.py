"""The Annotate and Export tabs (Gradio 6): rating, the examiners' review, the admins' dashboard.

The app builds them inside its own ``gr.Blocks``::

    with gr.Tab("Annotate"):
        signed_in = build_annotate_tab(db_url)
    with gr.Tab("Export"):
        build_export_tab(db_url, signed_in)   # or build_export_tab(db_url): its own sign-in

Each tab is a thin layer over :class:`annotation.store.Store`: the event handlers below turn
component values into service calls and service results into component updates. The sign-in
token lives in a ``gr.State`` (server side); passwords are cleared from the page after use and
never logged. Responses are shown without their model names, so ratings stay blind; a rater
sees only their own scores. Examiners (and admins) also get a *Review* section on the Annotate
tab: items whose raters disagree, every rater's scores and notes side by side, and final scores
with a reason. The Export tab is the admins' dashboard. Every handler goes through a store
function that checks the sign-in and the role itself: the page hiding a section is not the check.

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
from .accounts import client_of
from .protocols import level_text, rubric_markdown
from .safety import remove_later
from .store import DEFAULT_DB_URL, ItemView, Progress, Store

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
    if (/^[0-9]$/.test(e.key)) {
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

SHORTCUTS_HELP = ("Keys: **0–9** score the highlighted objective and move on · **↓/↑** (or **j/k**) move · "
                  "**Ctrl+Enter** submit · **Ctrl+S** save draft")


# ----------------------------------------------------------------------------- rendering helpers

def progress_html(progress: Progress | None) -> str:
    if progress is None:
        return ""
    total = max(progress.total, 1)
    target = progress.target
    by = (f"{target} annotator{'s' if target != 1 else ''}" if target else "all their raters")
    return (
        '<div class="ma-progress">'
        f'<div>You: {progress.mine} / {progress.total} items submitted</div>'
        f'<progress value="{progress.mine}" max="{total}" style="width:100%"></progress>'
        f'<div>Overall: {progress.complete} / {progress.total} items rated by {by}</div>'
        f'<progress value="{progress.complete}" max="{total}" style="width:100%"></progress>'
        "</div>")


def _score_choices(objective) -> list[tuple[str, int]]:
    return [(level_text(lv), lv.score) for lv in objective.levels]


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


def on_sign_in(store: Store, target: int | None, name: str, password: str, client: str | None = None):
    """-> token, item, skipped, status, progress, password box, sign-in row, signed-in row, who, shown_at,
    review section"""
    import gradio as gr

    try:
        token = store.sign_in(name, password, client=client)  # client: per-address throttling
    except MetaAlignerError as e:
        return (None, None, [], _message(str(e), "error"), "", "", gr.update(visible=True),
                gr.update(visible=False), "", time.time(), gr.update(visible=False))
    account = store.whoami(token)
    view, skipped = _load_next(store, token, [], target)
    status = "" if view else _message("No items are waiting for you. Thank you!", "ok")
    role = getattr(account, "role", "admin" if account.is_admin else "rater")
    who = f"Signed in as **{html.escape(account.name)}**{'' if role == 'rater' else f' ({role})'}"
    return (token, view, skipped, status, progress_html(store.progress(token, target)), "",
            gr.update(visible=False), gr.update(visible=True), who, time.time(),
            gr.update(visible=role in ("examiner", "admin")))


def on_sign_out(store: Store, token: str | None):
    import gradio as gr

    store.sign_out(token)
    return (None, None, [], _message("Signed out."), "", gr.update(visible=True), gr.update(visible=False), "",
            gr.update(visible=False), None)


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

def build_annotate_tab(db_url: str | None = None, target_annotators: int | None = None):
    """Sign-in, guidelines and rubric, one item at a time, a score per objective per response;
    for examiners, the review of disagreements. ``target_annotators`` overrides every item's k.

    Returns the ``gr.State`` holding the sign-in token, for :func:`build_export_tab`.
    """
    import gradio as gr
    from gradio.context import Context

    store = Store(db_url)
    token = gr.State(None)
    item = gr.State(None)
    skipped = gr.State([])
    shown_at = gr.State(0.0)

    gr.Markdown("Rate each response on every objective, using the rubric beside it. Only your own ratings are "
                "shown to you; model names are hidden. The texts may describe self-harm: nothing here is "
                "clinical advice.")
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
                                    label=f"{o.name} (response {i + 1})", info=o.definition or o.description,
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

    review_box, review_item = build_review_section(store, token)

    sign_in_outputs = [token, item, skipped, status, progress, password, signin_row, signed_row, who, shown_at,
                       review_box]
    def _sign_in(n, p, request):
        return on_sign_in(store, target_annotators, n, p, client=client_of(request))

    _sign_in.__annotations__ = {"request": gr.Request}  # Gradio passes the request by this hint
    sign_in = dict(fn=_sign_in, inputs=[name, password], outputs=sign_in_outputs, api_visibility="private")
    signin_btn.click(**sign_in)
    password.submit(**sign_in)
    signout_btn.click(lambda tok: on_sign_out(store, tok), inputs=[token],
                      outputs=[token, item, skipped, status, progress, signin_row, signed_row, who, review_box,
                               review_item],
                      api_visibility="private")
    root = Context.root_block
    if root is not None:
        root.load(None, js=ANNOTATE_SHORTCUTS_JS, api_visibility="private")
    return token


def _slug(key: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in key)


# ----------------------------------------------------------------------------- review (examiners)

def on_review_next(store: Store, token: str | None):
    """-> (review item or None, status). The store checks the examiner role."""
    try:
        queue = store.review_queue(token)
        if not queue:
            return None, _message("No disagreements are waiting for review.", "ok")
        it = store.review_view(token, queue[0]["item_id"])
    except MetaAlignerError as e:
        return None, _message(str(e), "error")
    return it, _message(f"{len(queue)} item{'s' if len(queue) != 1 else ''} waiting for review.")


def on_review_save(store: Store, token: str | None, it, reason: str, *values):
    """Save the examiner's final scores (one value per flagged response/objective)."""
    import gradio as gr

    flagged = it.flagged()
    scores = {k: v for k, v in zip(flagged, values) if v is not None}
    try:
        store.finalize(token, it.uid, scores, reason)
    except MetaAlignerError as e:
        return gr.skip(), _message(str(e), "error")
    nxt, status = on_review_next(store, token)
    return nxt, _message("Final scores saved. ", "ok") + status


def _ratings_table(it, resp) -> str:
    raters = sorted(it.submitted_by)
    head = "".join(f"<th>{html.escape(r)}</th>" for r in raters)
    rows = []
    flagged = {k for rid, k in it.flagged() if rid == resp.response_id}
    for o in it.protocol.objectives:
        cells = "".join(f"<td>{resp.raters.get(o.key, {}).get(r, '')}</td>" for r in raters)
        mark = " ⚠️" if o.key in flagged else ""
        rows.append(f"<tr><td>{html.escape(o.name)}{mark}</td>{cells}</tr>")
    notes = ""
    if resp.notes:
        cells = "".join("<td>" + html.escape(resp.notes.get(r, "")) + "</td>" for r in raters)
        notes = f"<tr><td>note</td>{cells}</tr>"
    return (f'<table class="ma-review-table"><tr><th>objective</th>{head}</tr>{"".join(rows)}{notes}</table>')


def build_review_section(store: Store, token):
    """The examiners' review, inside the Annotate tab (hidden until an examiner signs in)."""
    import gradio as gr

    review_item = gr.State(None)
    with gr.Accordion("Review disagreements (examiners)", open=True, visible=False, elem_id="ma-review") as box:
        gr.Markdown("Items whose raters disagree (by the protocol's review rule), with every rater's scores and "
                    "notes side by side. Set the final score of each disagreement and say why.")
        review_status = gr.Markdown(elem_id="ma-review-status")
        next_btn = gr.Button("Next disagreement", elem_id="ma-review-next")

        @gr.render(inputs=[review_item])
        def _render(it):
            if it is None:
                return
            gr.Textbox(value=it.query, label=f"Query (item {it.uid})", interactive=False, lines=3, max_lines=12)
            finals = []
            flagged = it.flagged()
            for i, resp in enumerate(it.responses):
                with gr.Group():
                    gr.Textbox(value=resp.text, label=f"Response {i + 1}", interactive=False, lines=2, max_lines=12)
                    gr.HTML(_ratings_table(it, resp), elem_id=f"ma-review-table-{i}")
                    with gr.Row():
                        for rid, key in flagged:
                            if rid != resp.response_id:
                                continue
                            o = it.protocol.objective(key)
                            finals.append(gr.Radio(choices=_score_choices(o), value=None,
                                                   label=f"Final {o.name} (response {i + 1})",
                                                   elem_id=f"ma-final-{i}-{_slug(key)}"))
            reason = gr.Textbox(label="Reason for the final scores", lines=2, elem_id="ma-review-reason")
            save = gr.Button("Save final scores", variant="primary", elem_id="ma-review-save")
            save.click(lambda tok, r, *v: on_review_save(store, tok, it, r, *v), inputs=[token, reason, *finals],
                       outputs=[review_item, review_status], api_visibility="private")

        next_btn.click(lambda tok: on_review_next(store, tok), inputs=[token], outputs=[review_item, review_status],
                       api_visibility="private")
    return box, review_item


def _shown(value, digits: int = 3):
    """A figure rounded for the page (the dashboard's data and ``--json`` keep full precision)."""
    return None if value is None else round(value, digits)


def export_view(store: Store, token: str | None, target: int | None = None):
    """The dashboard for an admin (the store raises AccessDenied otherwise):
    -> (status, agreement rows, source rows, rater rows, distribution plot path)."""
    dash = store.dashboard(token, bootstrap=500)
    overall, people = store.progress_by_annotator(token, target)
    agreement_rows = [[k, _shown(a["alpha"]), None if not a.get("ci95") else f"{a['ci95'][0]:.3f} – {a['ci95'][1]:.3f}",
                       a["units"], a["annotators"]] for k, a in dash["objectives"].items()]
    source_rows = [[src, *[_shown(block[k]["alpha"]) for k in dash["objectives"]]]
                   for src, block in dash["by_source"].items()]
    by_name = {p["annotator"]: p for p in people}
    rater_rows = []
    for name in sorted(set(by_name) | set(dash["raters"])):
        p, r = by_name.get(name, {}), dash["raters"].get(name, {})
        gold = (r.get("gold") or {}).get("accuracy")
        rater_rows.append([name, p.get("items", r.get("items", 0)), p.get("ratings", r.get("ratings", 0)),
                           p.get("drafts", 0), _shown(r.get("agreement_with_final")),
                           _shown(r.get("mean_abs_diff_from_others")), _shown(gold),
                           _shown(r.get("median_seconds_per_item"), 1)])
    pr = dash["progress"]
    t = _shown(dash["time"]["median_seconds_per_item"], 1)
    status = (f"{overall.complete} / {overall.total} items complete (each with its k raters); "
              f"{pr['reviewed']} reviewed, {pr['waiting_for_review']} waiting for review, {pr['gold_items']} gold. "
              f"Median time per item: {t if t is not None else 'n/a'} s. Alpha: Krippendorff's alpha, ordinal, "
              "units = responses with at least two ratings, 95% bootstrap interval over responses (empty where "
              "undefined).")
    plot = None
    if any(sum(v.values()) for v in dash["distribution"].values()):
        from .dashboard import distribution_plot

        plot_dir = Path(tempfile.mkdtemp(prefix="metaaligner-dash-"))
        plot = distribution_plot(dash["distribution"], plot_dir / "scores.png")
        remove_later(plot_dir)
    return status, agreement_rows, source_rows, rater_rows, plot


def export_files(store: Store, token: str | None, out_dir: str | Path | None = None) -> dict[str, Path]:
    """Write ratings (JSONL, CSV), final labels (JSONL) and pairs (JSONL) for an admin; -> {name: path}."""
    ratings = store.rating_records(token)  # the admin check, before any file; queried once, written twice
    out = Path(out_dir or tempfile.mkdtemp(prefix="metaaligner-export-"))
    paths = {"ratings.jsonl": out / "ratings.jsonl", "ratings.csv": out / "ratings.csv",
             "final.jsonl": out / "final.jsonl", "pairs.jsonl": out / "pairs.jsonl"}
    export_mod.write_ratings(paths["ratings.jsonl"], ratings)
    export_mod.write_ratings(paths["ratings.csv"], ratings)
    store.export(token, "final", paths["final.jsonl"])
    store.export(token, "pairs", paths["pairs.jsonl"])
    return paths


def build_export_tab(db_url: str | None = None, signed_in=None,
                     target_annotators: int | None = None) -> None:
    """Admins only: the dashboard (agreement with intervals, by response source, per rater, score
    distributions, progress, time) and downloads of ratings, final labels and pairs.

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
    refresh_btn = gr.Button("Refresh the dashboard", elem_id="ma-export-refresh")
    agreement_df = gr.Dataframe(headers=["objective", "alpha", "95% interval", "units", "annotators"],
                                label="Agreement per objective", interactive=False, elem_id="ma-agreement")
    source_df = gr.Dataframe(label="Agreement (alpha) within each response source", interactive=False,
                             elem_id="ma-by-source")
    people_df = gr.Dataframe(headers=["annotator", "items", "ratings", "drafts", "agreement with final labels",
                                      "mean |diff| from others", "gold accuracy", "median s / item"],
                             label="Raters", interactive=False, elem_id="ma-raters")
    plot = gr.Image(label="Score distribution per objective", type="filepath", interactive=False,
                    elem_id="ma-distribution")
    prepare_btn = gr.Button("Prepare downloads", variant="primary", elem_id="ma-export-prepare")
    labels = ["Ratings (JSONL)", "Ratings (CSV)", "Final labels (JSONL)", "Pairs (JSONL)"]
    with gr.Row():
        dl = [gr.DownloadButton(label, visible=False, elem_id=f"ma-download-{i}") for i, label in enumerate(labels)]

    def refresh(token):
        try:
            s, a, src, p, img = export_view(store, token, target_annotators)
        except MetaAlignerError as e:
            return _message(str(e), "error"), None, None, None, None
        keys = [row[0] for row in a]
        return s, a, gr.update(value=src, headers=["source", *keys]) if src else None, p, img

    def prepare(token):
        try:
            paths = export_files(store, token)
        except MetaAlignerError as e:
            return (_message(str(e), "error"), *[gr.update(visible=False)] * len(labels))
        remove_later(next(iter(paths.values())).parent)  # Gradio serves its own copy (aged out by the app)
        return (_message("Files ready.", "ok"),
                *[gr.update(value=str(p), visible=True) for p in paths.values()])

    dash_outputs = [status, agreement_df, source_df, people_df, plot]
    refresh_btn.click(refresh, inputs=[signed_in], outputs=dash_outputs, api_visibility="private")
    prepare_btn.click(prepare, inputs=[signed_in], outputs=[status, *dl], api_visibility="private")
    if signin_btn is not None:
        def sign_in(n, p):
            try:
                token = store.sign_in(n, p)
            except MetaAlignerError as e:
                return None, "", _message(str(e), "error"), None, None, None, None
            return token, "", *refresh(token)

        signin_btn.click(sign_in, inputs=[name, password], outputs=[signed_in, password, *dash_outputs],
                         api_visibility="private")


def build_demo(db_url: str | None = None, target_annotators: int | None = None):
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
    parser.add_argument("--target", type=int, default=None,
                        help="raters wanted per item, overriding each item's k (default: each item's own)")
    args = parser.parse_args(argv)
    build_demo(args.db, args.target).launch(server_name=args.host, server_port=args.port)


if __name__ == "__main__":
    main()
