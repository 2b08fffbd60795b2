"""The Train tab (admins): train an aligner on the study's final labels, then a blind A/B study of it.

The same two steps as ``metaaligner annotate train`` and ``annotate ab``, run as one background
job per server by :class:`webapp.train_jobs.TrainJobs`: choose the study (protocol), a base model
the operator configured and a few options; see the pairs and Algorithm 1's row counts before
starting; follow the progress bar, the loss plot and the log (the job lives on the server, so a
reload finds it again after signing in); cancel; when it is done, let visitors pick the new
aligner in the Align tab, and start the blind A/B study with one click.

Every handler checks the admin's sign-in itself (each one is a public HTTP endpoint).
"""
from __future__ import annotations

import html

from metaaligner_core.errors import MetaAlignerError

from .train_jobs import TrainJobs


def _progress_html(state: dict) -> str:
    if state.get("status") in (None, "none"):
        return "<p id='ma-train-progress-text'>No job yet.</p>"
    pct = round(100 * float(state.get("progress", 0.0)))
    text = html.escape(f"{state['kind']} job {state['status']} — {state.get('stage', '')} ({pct}%)")
    return (f"<progress id='ma-train-progress' max='100' value='{pct}' style='width:100%'></progress>"
            f"<p id='ma-train-progress-text'>{text}</p>")


def _preview_md(p: dict) -> str:
    rows = p["rows"]
    lines = [f"**{p['pairs']} preference pairs** with final labels to train on "
             f"({p['held_out']} items held out for the A/B study); protocol version {p['protocol_version']}.",
             f"Algorithm 1 rows: **{rows['preference']} preference**, **{rows['equal']} equal**, "
             f"**{rows['warmup']} warm-up**.",
             f"Items: {p['items']} ({p['ready']} with final labels, {p['short_of_raters']} short of their raters, "
             f"{p['waiting_for_review']} waiting for review)."]
    if p.get("refusal"):
        lines.append(f"⚠️ {p['refusal']}")
    return "\n\n".join(lines)


def build_train_tab(jobs: TrainJobs, signed_in, allow=None, aligner_picker=None, picker_choices=None):
    """The tab's components and events. ``signed_in``: the shared sign-in state; ``allow``: the
    app's model allow-list (an admin's "offer" adds to it); ``aligner_picker`` /
    ``picker_choices()``: the Align tab's dropdown and its current choices, refreshed on offer."""
    import gradio as gr
    import pandas as pd

    from .security import ModelAllowList, model_label

    public = ModelAllowList.public  # credentials in a configured MODEL string stay on the server

    gr.Markdown("Admins: train an aligner on this study's final labels (the examiner's score where an item "
                "was reviewed) — pairs → Algorithm 1 → warm-up, equal and preference stages — then let the "
                "same raters judge it blind against a baseline. Sign in with an admin account on the Annotate tab.")
    msg = gr.Markdown(elem_id="ma-train-message")
    with gr.Row():
        # choices arrive after an admin signs in; the handlers check every value themselves
        protocol = gr.Dropdown([], label="Study (protocol)", allow_custom_value=True, elem_id="ma-train-protocol")
        base = gr.Dropdown([(model_label(b), public(b)) for b in jobs.bases],
                           value=public(jobs.bases[0]) if jobs.bases else None,
                           label="Base model (configured by the operator)", elem_id="ma-train-base")
    with gr.Row():
        max_steps = gr.Number(0, precision=0, minimum=0, label="Max steps per stage (0: no cap)",
                              elem_id="ma-train-max-steps")
        epochs = gr.Number(1, label="Epochs per stage", elem_id="ma-train-epochs")
        lr = gr.Number(1e-4, label="Learning rate", elem_id="ma-train-lr")
        lora = gr.Checkbox(True, label="LoRA (merged after each stage)", elem_id="ma-train-lora")
        holdout = gr.Number(4, precision=0, minimum=0, label="Items held out (A/B queries)", elem_id="ma-train-holdout")
        min_pairs = gr.Number(32, precision=0, minimum=1, label="Minimum pairs", elem_id="ma-train-min-pairs")
    preview_md = gr.Markdown(elem_id="ma-train-preview")
    with gr.Row():
        refresh_btn = gr.Button("Refresh", elem_id="ma-train-refresh")
        start_btn = gr.Button("Start training", variant="primary", elem_id="ma-train-start")
        cancel_btn = gr.Button("Cancel the job", variant="stop", elem_id="ma-train-cancel")
    progress = gr.HTML(_progress_html({}), elem_id="ma-train-progress-box")
    plot = gr.LinePlot(pd.DataFrame({"point": [], "loss": [], "stage": []}), x="point", y="loss",
                       tooltip=["stage", "loss"], label="Training loss (logged steps, all stages)",
                       elem_id="ma-train-loss")
    log_box = gr.Textbox(label="Log", lines=10, max_lines=10, interactive=False, elem_id="ma-train-log")
    gr.Markdown("### The new aligner")
    with gr.Row():
        finished = gr.Dropdown([], label="Aligners trained here", allow_custom_value=True,
                               elem_id="ma-train-finished")
        offer_btn = gr.Button("Let visitors pick it in the Align tab", elem_id="ma-train-offer")
    with gr.Row():
        baseline = gr.Dropdown([(model_label(b), public(b)) for b in jobs.baselines],
                               value=public(jobs.baselines[0]) if jobs.baselines else None, label="Baseline aligner",
                               elem_id="ma-train-baseline")
        queries = gr.Number(4, precision=0, minimum=1, label="A/B queries (held-out items)",
                            elem_id="ma-train-ab-queries")
        ab_btn = gr.Button("Start the blind A/B study", variant="primary", elem_id="ma-train-ab")
    timer = gr.Timer(2.0, active=False)

    def view(token):
        """Progress, plot, log, finished aligners, timer: what polling refreshes."""
        state = jobs.state(token)
        losses = pd.DataFrame(state.get("losses") or [], columns=["point", "loss", "stage"])
        done = jobs.finished_aligners()
        return (_progress_html(state), losses, state.get("log", ""),
                gr.update(choices=done, value=done[-1] if done else None),
                gr.Timer(active=state.get("status") == "running"))

    polled = [progress, plot, log_box, finished, timer]

    def refresh(token, proto, hold, least):
        if token is None:
            return ("", gr.update(), "", *[gr.update()] * 4, gr.Timer(active=False))
        try:
            names = jobs.protocols(token)
            proto = proto if proto in names else (names[0] if names else None)
            pv = _preview_md(jobs.preview(token, proto, hold or 0, least)) if proto else "No study in the database yet."
            return ("", gr.update(choices=names, value=proto), pv, *view(token))
        except MetaAlignerError as e:
            return (f"⚠️ {e}", gr.update(), "", *[gr.update()] * 4, gr.Timer(active=False))

    def start(token, proto, base_model, steps, ep, rate, use_lora, hold, least):
        try:
            jobs.start_train(token, proto, base_model, max_steps=int(steps or 0), epochs=ep, lr=rate,
                             lora=bool(use_lora), holdout=hold, min_pairs=least)
        except MetaAlignerError as e:
            raise gr.Error(str(e), print_exception=False) from None
        return ("Training started.", *view(token))

    def cancel(token):
        try:
            text = jobs.cancel(token)
        except MetaAlignerError as e:
            raise gr.Error(str(e), print_exception=False) from None
        return (text, *view(token))

    def poll(token):
        try:
            return view(token)
        except MetaAlignerError:
            return (*[gr.update()] * 4, gr.Timer(active=False))

    def offer(token, aligner):
        try:
            jobs.offer(token, aligner, allow)
        except MetaAlignerError as e:
            raise gr.Error(str(e), print_exception=False) from None
        update = gr.update(choices=picker_choices()) if picker_choices else gr.update()
        return f"Visitors may now pick `{model_label(aligner)}` in the Align tab.", update

    def start_ab(token, candidate, base_aligner, n):
        try:
            job = jobs.start_ab(token, candidate, base_aligner, n)
        except MetaAlignerError as e:
            raise gr.Error(str(e), print_exception=False) from None
        return (f"A/B study `{job.result}` is being prepared: both aligners correct {int(n)} held-out drafts, then "
                "the items join the raters' queues (sources hidden). The Export tab's dashboard and "
                "`metaaligner annotate agreement` report the result.", *view(token))

    private = dict(api_visibility="private")
    refresh_inputs = [signed_in, protocol, holdout, min_pairs]
    refresh_outputs = [msg, protocol, preview_md, *polled]
    refresh_btn.click(refresh, refresh_inputs, refresh_outputs, **private)
    signed_in.change(refresh, refresh_inputs, refresh_outputs, **private)
    gr.on([protocol.input, holdout.input, min_pairs.input], refresh, refresh_inputs, refresh_outputs, **private)
    start_btn.click(start, [signed_in, protocol, base, max_steps, epochs, lr, lora, holdout, min_pairs],
                    [msg, *polled], concurrency_id="train-jobs", **private)
    cancel_btn.click(cancel, [signed_in], [msg, *polled], concurrency_id="train-jobs", **private)
    timer.tick(poll, [signed_in], polled, queue=False, **private)
    offer_outputs = [msg, aligner_picker if aligner_picker is not None else gr.State(None)]
    offer_btn.click(offer, [signed_in, finished], offer_outputs, **private)
    ab_btn.click(start_ab, [signed_in, finished, baseline, queries], [msg, *polled], concurrency_id="train-jobs",
                 **private)
