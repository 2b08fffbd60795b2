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
with a reason. The Export tab is the admins' dashboard, computed when an admin opens the tab
and on each refresh. Every handler goes through a store function that checks the sign-in and the
role itself: the page hiding a section is not the check.

A rater with nothing on screen is not left waiting for a sign-in: while the Annotate tab is open
and idle, a timer checks every :data:`POLL_SECONDS` (and a **Check for new items** button checks
at once), so an item queued later (imported, sent from the Align tab, freed by a hold running
out) appears by itself, and the progress bars follow the team's work. A check is one query over
three primary keys (:meth:`annotation.store.Store.queue_version`); the next-item query runs only
when a newer item exists, or every :data:`FULL_CHECK_SECONDS`. The timer is off while an item is on screen
and off while another tab is open, and the handler refuses to replace an item on screen anyway,
since any client can call it.

``python -m annotation.ui --db sqlite:///tmp/x.db`` serves just these two tabs on 127.0.0.1.
"""
from __future__ import annotations

import argparse
import html
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

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

POLL_SECONDS = 5.0  # an idle Annotate tab checks for new items this often
FULL_CHECK_SECONDS = 60.0  # ... and runs the full next-item query at least this often (holds running out)
IDLE_MESSAGE = "No items are waiting for you. Thank you! New ones appear here by themselves."

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


def _idle_controls(signed_in: bool, view: ItemView | None) -> tuple:
    """The "Check for new items" button and the polling timer: on for a signed-in rater with
    nothing on screen, off otherwise (so the timer never replaces an item being rated)."""
    import gradio as gr

    idle = bool(signed_in) and view is None
    return gr.update(visible=idle), gr.Timer(active=idle)


def on_sign_in(store: Store, target: int | None, name: str, password: str, client: str | None = None):
    """-> token, item, skipped, status, progress, password box, sign-in row, signed-in row, who, shown_at,
    review section, check button, timer"""
    import gradio as gr

    try:
        token = store.sign_in(name, password, client=client)  # client: per-address throttling
    except MetaAlignerError as e:
        return (None, None, [], _message(str(e), "error"), "", "", gr.update(visible=True),
                gr.update(visible=False), "", time.time(), gr.update(visible=False), *_idle_controls(False, None))
    account = store.whoami(token)
    view, skipped = _load_next(store, token, [], target)
    status = "" if view else _message(IDLE_MESSAGE, "ok")
    role = getattr(account, "role", "admin" if account.is_admin else "rater")
    who = f"Signed in as **{html.escape(account.name)}**{'' if role == 'rater' else f' ({role})'}"
    return (token, view, skipped, status, progress_html(store.progress(token, target)), "",
            gr.update(visible=False), gr.update(visible=True), who, time.time(),
            gr.update(visible=role in ("examiner", "admin")), *_idle_controls(True, view))


def on_sign_out(store: Store, token: str | None):
    import gradio as gr

    store.sign_out(token)
    return (None, None, [], _message("Signed out."), "", gr.update(visible=True), gr.update(visible=False), "",
            gr.update(visible=False), None, *_idle_controls(False, None))


def on_poll(store: Store, target: int | None, token: str | None, view: ItemView | None, skipped: list[str],
            watch: dict | None, force: bool = False):
    """An idle tab's check for new items: the timer's tick (``force`` False), the "Check for new
    items" button and opening the tab (``force`` True).
    -> item, skipped, status, progress, shown_at, watch, check button, timer

    Acts only for a signed-in rater with nothing on screen; anything else gets its controls
    switched off and nothing more (an item being rated is never replaced). ``watch`` (server-side
    state) holds the study's change marker ``(newest item, assignment, audit row)`` seen last and
    when the last full check ran. A tick costs one indexed query and sends nothing back while the
    marker stands still; other raters' work (a newer assignment or audit row) only refreshes the
    progress bars, since taking or rating items never frees one for an idle rater; a newer item,
    or FULL_CHECK_SECONDS since the last full check (a hold running out, a changed k), runs the
    next-item query.
    """
    import gradio as gr

    unchanged = (gr.skip(),) * 5  # item, skipped, status, progress, shown_at
    if token is None or view is not None:
        return (*unchanged, gr.skip(), *_idle_controls(token is not None, view))
    now = time.monotonic()
    watch = watch if isinstance(watch, dict) else {}
    try:
        version = store.queue_version(token)  # also checks the sign-in
        full = (force or not watch or watch.get("version", (None,))[0] != version[0]
                or now - watch.get("at", 0.0) >= FULL_CHECK_SECONDS)
        if not full:
            if watch.get("version") == version:
                return (*unchanged, gr.skip(), gr.skip(), gr.skip())
            # others' work: the bars follow, with study-wide counts shared by every tab for an interval
            progress = progress_html(store.progress(token, target, max_age=POLL_SECONDS))
            return (*unchanged[:3], progress, gr.skip(), {**watch, "version": version}, gr.skip(), gr.skip())
        nxt, skipped = _load_next(store, token, skipped, target)
        progress = progress_html(store.progress(token, target))
    except MetaAlignerError as e:  # signed out elsewhere, sign-in expired, account disabled
        return (gr.skip(), gr.skip(), _message(str(e), "error"), gr.skip(), gr.skip(), None,
                *_idle_controls(False, None))
    watch = {"version": version, "at": now}
    if nxt is None:
        return gr.skip(), skipped, _message(IDLE_MESSAGE, "ok"), progress, gr.skip(), watch, *_idle_controls(True, None)
    return nxt, skipped, _message("A new item is here.", "ok"), progress, time.time(), watch, *_idle_controls(True, nxt)


def poll_due(store: Store, token: str | None, view: ItemView | None, watch: dict | None):
    """The timer's tick, run outside Gradio's queue (every idle tab calls it every few seconds, so it
    costs one indexed query and the least of Gradio's own work): a new value for the tab's poll
    signal, whose change runs :func:`on_poll` through the queue, when there is something to do — the
    study's change marker moved, a full check is due, the sign-in is gone, or the tab's controls
    are out of step — and nothing otherwise. It returns no study data, whoever calls it."""
    import gradio as gr

    if token is None or view is not None or not isinstance(watch, dict) or "version" not in watch:
        return time.time()  # on_poll switches the controls off or runs the first check
    try:
        version = store.queue_version(token)  # also checks the sign-in
    except MetaAlignerError:
        return time.time()  # on_poll reports it and switches the controls off
    if version == watch["version"] and time.monotonic() - watch.get("at", 0.0) < FULL_CHECK_SECONDS:
        return gr.skip()
    return time.time()


def on_save(store: Store, target: int | None, view: ItemView, submit: bool,
            token: str | None, skipped: list[str], shown_at: float, *values):
    """Save a draft or submit. -> item, skipped, status, progress, shown_at, check button, timer"""
    import gradio as gr

    keys = _rating_keys(view)
    scores = dict(zip(keys, values[:len(keys)]))
    notes = {r.id: (n or "").strip() for r, n in zip(view.responses, values[len(keys):])}
    notes = {rid: n for rid, n in notes.items() if n or rid in view.notes}
    elapsed = max(0.0, time.time() - (shown_at or time.time()))
    try:
        store.save(token, view.uid, scores, notes=notes, submit=submit, seconds=elapsed)
    except MetaAlignerError as e:
        return gr.skip(), gr.skip(), _message(str(e), "error"), gr.skip(), gr.skip(), gr.skip(), gr.skip()
    progress = progress_html(store.progress(token, target))
    if not submit:
        return (gr.skip(), gr.skip(), _message(f"Draft saved at {time.strftime('%H:%M:%S')}.", "ok"), progress,
                time.time(), gr.skip(), gr.skip())
    nxt, skipped = _load_next(store, token, skipped, target)
    status = _message("Submitted." + ("" if nxt else " " + IDLE_MESSAGE), "ok")
    return nxt, skipped, status, progress, time.time(), *_idle_controls(True, nxt)


def on_skip(store: Store, target: int | None, view: ItemView, token: str | None, skipped: list[str]):
    """-> item, skipped, status, shown_at, check button, timer"""
    import gradio as gr

    if view is None:  # nothing on screen to skip
        return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
    skipped = [*skipped, view.uid]
    try:
        store.release(token, view.uid)  # another rater may take it meanwhile
        nxt, skipped = _load_next(store, token, skipped, target)
    except MetaAlignerError as e:
        return gr.skip(), gr.skip(), _message(str(e), "error"), gr.skip(), gr.skip(), gr.skip()
    return (nxt, skipped, _message("Skipped: another rater may take it; it comes back to you when your other "
                                   "items are done."), time.time(),
            *_idle_controls(True, nxt))


# ----------------------------------------------------------------------------- tabs

def build_annotate_tab(db_url: str | None = None, target_annotators: int | None = None,
                       poll_seconds: float = POLL_SECONDS):
    """Sign-in, guidelines and rubric, one item at a time, a score per objective per response;
    for examiners, the review of disagreements. ``target_annotators`` overrides every item's k.
    Built inside a ``gr.Tab``, the tab checks for new items when it is opened, and every
    ``poll_seconds`` while it is open with nothing on screen.

    Returns the ``gr.State`` holding the sign-in token, for :func:`build_export_tab`.
    """
    import gradio as gr
    from gradio.context import Context

    store = Store(db_url)
    tab = Context.block if isinstance(Context.block, gr.Tab) else None
    token = gr.State(None)
    item = gr.State(None)
    skipped = gr.State([])
    shown_at = gr.State(0.0)
    watch = gr.State(None)  # the study's change marker at this session's last full check
    # set by the timer's unqueued tick when on_poll has work to do (a hidden component, whose change
    # the page sees: a gr.State changed by an unqueued event fires no change event)
    poll_signal = gr.Number(0.0, visible=False, elem_id="ma-poll-signal")
    poll_timer = gr.Timer(poll_seconds, active=False)

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
    check_btn = gr.Button("Check for new items", visible=False, size="sm", elem_id="ma-check")
    progress = gr.HTML(elem_id="ma-progress")
    idle_controls = [check_btn, poll_timer]

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
                      outputs=[item, skipped, status, progress, shown_at, *idle_controls], api_visibility="private")
        save_btn.click(lambda *a: on_save(store, target_annotators, view, False, *a), **common)
        submit_btn.click(lambda *a: on_save(store, target_annotators, view, True, *a), **common)
        skip_btn.click(lambda tok, sk: on_skip(store, target_annotators, view, tok, sk), inputs=[token, skipped],
                       outputs=[item, skipped, status, shown_at, *idle_controls], api_visibility="private")

    review_box, review_item = build_review_section(store, token)

    sign_in_outputs = [token, item, skipped, status, progress, password, signin_row, signed_row, who, shown_at,
                       review_box, *idle_controls]
    def _sign_in(n, p, request):
        return on_sign_in(store, target_annotators, n, p, client=client_of(request))

    _sign_in.__annotations__ = {"request": gr.Request}  # Gradio passes the request by this hint
    sign_in = dict(fn=_sign_in, inputs=[name, password], outputs=sign_in_outputs, api_visibility="private")
    signin_btn.click(**sign_in)
    password.submit(**sign_in)
    signout_btn.click(lambda tok: on_sign_out(store, tok), inputs=[token],
                      outputs=[token, item, skipped, status, progress, signin_row, signed_row, who, review_box,
                               review_item, *idle_controls],
                      api_visibility="private")

    # Checking for new items. The timer's tick runs outside the queue (half the server's work per
    # tick) and only decides whether there is anything to do (poll_due); the check itself goes
    # through the queue (a state changed outside it does not re-render the item), never waiting
    # there: no concurrency limit, so idle raters' checks hold no place a generation request needs.
    poll = dict(inputs=[token, item, skipped, watch], outputs=[item, skipped, status, progress, shown_at, watch,
                                                             *idle_controls],
                concurrency_limit=None, show_progress="hidden", api_visibility="private")
    poll_timer.tick(lambda tok, it, w: poll_due(store, tok, it, w), inputs=[token, item, watch], outputs=poll_signal,
                    queue=False, show_progress="hidden", api_visibility="private")
    poll_signal.change(lambda tok, it, sk, w: on_poll(store, target_annotators, tok, it, sk, w), **poll)
    check_btn.click(lambda tok, it, sk, w: on_poll(store, target_annotators, tok, it, sk, w, force=True), **poll)
    if tab is not None:
        tab.select(lambda tok, it, sk, w: on_poll(store, target_annotators, tok, it, sk, w, force=True), **poll)
        tabs = tab.parent if isinstance(tab.parent, gr.Tabs) else None
        if tabs is not None:  # leaving the tab stops the timer (a Timer keeps ticking on a hidden tab)
            label = tab.label

            def _left(evt):
                return gr.skip() if evt.value == label else gr.Timer(active=False)

            _left.__annotations__ = {"evt": gr.SelectData}  # Gradio passes the event data by this hint
            tabs.select(_left, None, poll_timer, queue=False, show_progress="hidden", api_visibility="private")
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


AB_HEADERS = ["study", "objective", "items rated", "baseline mean", "candidate mean", "candidate − baseline",
              "95% interval (paired bootstrap)", "wins", "ties", "losses"]


class DashboardView(NamedTuple):
    """What the Export tab shows: ``status`` (one line), table rows, the score plot's path (None
    with no ratings yet), and the blind A/B studies and alpha per batch, each a line and rows."""

    status: str
    agreement: list
    sources: list
    raters: list
    plot: str | None
    ab_note: str
    ab: list
    batch_note: str
    batches: list


def _plain(text) -> str:
    """Text shown verbatim in a Markdown component (a model path may hold ``_`` or ``*``)."""
    return "".join(f"\\{c}" if c in "\\`*_{}[]()<>#+-.!|~" else c for c in html.escape(str(text), quote=False))


def _interval(ci) -> str | None:
    return None if not ci else f"{ci[0]:+.3f} – {ci[1]:+.3f}"


def ab_rows(ab: dict) -> tuple[str, list]:
    """The blind A/B studies (``dashboard()["ab"]``): a line naming each study's aligners, and per
    study and objective the candidate's mean score minus the baseline's with its interval and
    the items won, tied and lost."""
    if not ab:
        return ("No blind A/B study yet (the Train tab starts one after a training job; or "
                "`metaaligner annotate ab`)."), []
    lines, rows = [], []
    for name, st in ab.items():
        lines.append(f"**{_plain(name)}**: baseline {_plain(st['baseline'])} against candidate "
                     f"{_plain(st['candidate'])}, {st['items']} item{'s' if st['items'] != 1 else ''} "
                     f"(protocol {_plain(st['protocol'])})")
        for key, o in st["objectives"].items():
            diff = o["difference"]
            rows.append([name, key, o["n"], _shown(o["baseline_mean"]), _shown(o["candidate_mean"]),
                         None if diff is None else f"{diff:+.3f}", _interval(o["ci95"]),
                         o["wins"], o["ties"], o["losses"]])
    note = ("Blind A/B studies (scores: the examiner's final score where reviewed, else the raters' mean; "
            "wins/ties/losses per item): " + "; ".join(lines) + ".")
    return note, rows


def batch_rows(batches: dict, keys: list[str]) -> tuple[str, list]:
    """Alpha per batch of complete items in the order they were completed
    (``dashboard()["alpha_by_batch"]``): a line, and one row per batch."""
    got = batches.get("batches") or []
    if not got:
        return "Alpha per batch: no item has all its raters yet.", []
    note = (f"Alpha per batch of {batches['batch_size']} complete items, in the order they were completed: where "
            "the protocol serves the most disagreed items first (`order: disagreement`), later batches show its "
            "effect.")
    rows = [[b["batch"], b["items"], b["completed_until"][:19].replace("T", " "),
             *[_shown(b["alpha"].get(k)) for k in keys]] for b in got]
    return note, rows


def export_view(store: Store, token: str | None, target: int | None = None) -> DashboardView:
    """The dashboard for an admin (the store raises AccessDenied otherwise).

    The status ends with the time it was computed; with no submitted rating yet it is one line
    saying so, and there is no plot, no A/B table and no batch table."""
    dash = store.dashboard(token, bootstrap=500)
    overall, people = store.progress_by_annotator(token, target)
    computed = f"Computed at {time.strftime('%H:%M:%S', time.gmtime())} UTC."
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
              f"undefined). {computed}")
    if not any(sum(v.values()) for v in dash["distribution"].values()):
        status = (f"No ratings submitted yet ({overall.total} item{'s' if overall.total != 1 else ''} waiting for "
                  f"raters). {computed}")
        return DashboardView(status, agreement_rows, source_rows, rater_rows, None, "", [], "", [])
    from .dashboard import distribution_plot

    plot_dir = Path(tempfile.mkdtemp(prefix="metaaligner-dash-"))
    plot = distribution_plot(dash["distribution"], plot_dir / "scores.png")
    remove_later(plot_dir)
    ab_note, ab = ab_rows(dash["ab"])
    batch_note, batches = batch_rows(dash["alpha_by_batch"], list(dash["objectives"]))
    return DashboardView(status, agreement_rows, source_rows, rater_rows, plot, ab_note, ab, batch_note, batches)


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
    distributions, progress, time, blind A/B studies, alpha per batch) and downloads of ratings, final labels and pairs.

    ``signed_in`` is the state returned by :func:`build_annotate_tab`; without it the tab has
    its own sign-in form. Built inside a ``gr.Tab``, the dashboard is computed when the tab is
    opened; tables stay hidden until they have rows.
    """
    import gradio as gr
    from gradio.context import Context

    store = Store(db_url)
    tab = Context.block if isinstance(Context.block, gr.Tab) else None
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
    agreement_headers = ["objective", "alpha", "95% interval", "units", "annotators"]
    people_headers = ["annotator", "items", "ratings", "drafts", "agreement with final labels",
                      "mean |diff| from others", "gold accuracy", "median s / item"]
    # Hidden until they have rows (an empty Dataframe shows placeholder headers, "1 2 3"); kept in
    # the page ("hidden", not False) so that scripts and tests find them by id.
    agreement_df = gr.Dataframe(headers=agreement_headers, label="Agreement per objective", interactive=False,
                                visible="hidden", elem_id="ma-agreement")
    source_df = gr.Dataframe(headers=["source"], label="Agreement (alpha) within each response source",
                             interactive=False, visible="hidden", elem_id="ma-by-source")
    people_df = gr.Dataframe(headers=people_headers, label="Raters", interactive=False, visible="hidden",
                             elem_id="ma-raters")
    plot = gr.Image(label="Score distribution per objective", type="filepath", interactive=False, visible="hidden",
                    elem_id="ma-distribution")
    ab_note = gr.Markdown(elem_id="ma-ab-note")
    ab_df = gr.Dataframe(headers=AB_HEADERS, label="Blind A/B studies: the candidate aligner against the baseline",
                         interactive=False, visible="hidden", elem_id="ma-ab")
    batch_note = gr.Markdown(elem_id="ma-batches-note")
    batch_df = gr.Dataframe(headers=["batch"], label="Alpha per batch of complete items", interactive=False,
                            visible="hidden", elem_id="ma-batches")
    prepare_btn = gr.Button("Prepare downloads", variant="primary", elem_id="ma-export-prepare")
    labels = ["Ratings (JSONL)", "Ratings (CSV)", "Final labels (JSONL)", "Pairs (JSONL)"]
    with gr.Row():
        dl = [gr.DownloadButton(label, visible=False, elem_id=f"ma-download-{i}") for i, label in enumerate(labels)]

    hidden = (gr.update(value=None, visible="hidden"),) * 4
    blank = (gr.update(value=""), gr.update(value=None, visible="hidden")) * 2  # the A/B and batch sections

    def table(headers, rows):
        return gr.update(value={"headers": headers, "data": rows}, visible=True) if rows else hidden[0]

    def refresh(token):
        try:
            v = export_view(store, token, target_annotators)
        except MetaAlignerError as e:
            return (_message(str(e), "error"), *hidden, *blank)
        if v.plot is None:  # no ratings yet: the status line says so, and there is nothing to tabulate
            return (v.status, *hidden, *blank)
        keys = [row[0] for row in v.agreement]
        return (v.status, table(agreement_headers, v.agreement), table(["source", *keys], v.sources),
                table(people_headers, v.raters), gr.update(value=v.plot, visible=True),
                gr.update(value=v.ab_note), table(AB_HEADERS, v.ab),
                gr.update(value=v.batch_note), table(["batch", "items", "completed until (UTC)", *keys], v.batches))

    def opened(token):
        """The tab was opened: the dashboard for an admin; a line for anyone else."""
        if token is None:
            return (_message("Sign in with an admin account to see the dashboard."), *hidden, *blank)
        return refresh(token)

    def prepare(token):
        try:
            paths = export_files(store, token)
        except MetaAlignerError as e:
            return (_message(str(e), "error"), *[gr.update(visible=False)] * len(labels))
        remove_later(next(iter(paths.values())).parent)  # Gradio serves its own copy (aged out by the app)
        return (_message("Files ready.", "ok"),
                *[gr.update(value=str(p), visible=True) for p in paths.values()])

    dash_outputs = [status, agreement_df, source_df, people_df, plot, ab_note, ab_df, batch_note, batch_df]
    refresh_btn.click(refresh, inputs=[signed_in], outputs=dash_outputs, api_visibility="private")
    if tab is not None:
        tab.select(opened, inputs=[signed_in], outputs=dash_outputs, api_visibility="private")
    prepare_btn.click(prepare, inputs=[signed_in], outputs=[status, *dl], api_visibility="private")
    if signin_btn is not None:
        def sign_in(n, p):
            try:
                token = store.sign_in(n, p)
            except MetaAlignerError as e:
                return None, "", _message(str(e), "error"), *hidden, *blank
            return token, "", *refresh(token)

        signin_btn.click(sign_in, inputs=[name, password], outputs=[signed_in, password, *dash_outputs],
                         api_visibility="private")


def build_demo(db_url: str | None = None, target_annotators: int | None = None,
               poll_seconds: float = POLL_SECONDS):
    import gradio as gr

    with gr.Blocks(title="MetaAligner annotation", analytics_enabled=False) as demo, gr.Tabs():
        with gr.Tab("Annotate", id="annotate"):
            signed_in = build_annotate_tab(db_url, target_annotators, poll_seconds)
        with gr.Tab("Export", id="export"):
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
    parser.add_argument("--poll-seconds", type=float, default=POLL_SECONDS,
                        help="how often an idle Annotate tab checks for new items (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.poll_seconds <= 0:
        parser.error("--poll-seconds must be > 0")
    build_demo(args.db, args.target, args.poll_seconds).launch(server_name=args.host, server_port=args.port)


if __name__ == "__main__":
    main()
