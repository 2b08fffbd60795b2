"""The app's Accounts tab: first-run set-up of the first admin, and account management for admins.

First run: while the annotation database has no admin, the launcher prints a one-time set-up token
in the server log (only the operator sees it) and this tab offers a form to create the first
admin with it. Afterwards admins add accounts (rater, examiner or admin), disable and re-enable
them, change roles and reset passwords here. Every handler checks, on the server, that the
session's sign-in (the token state of the Annotate tab) belongs to an admin before it reads or
changes anything: the page hiding a form protects nothing.
"""
# No `from __future__ import annotations`: Gradio reads the handlers' gr.Request hints at runtime.
import html

from metaaligner_core.errors import MetaAlignerError


def _msg(text: str, ok: bool = False) -> str:
    return ("✅ " if ok else "⚠️ ") + html.escape(str(text))


def build_accounts_tab(db_url: str | None, signed_in, first_run=None) -> None:
    """The tab's components and events, inside the caller's ``gr.Tab``."""
    import gradio as gr
    from gradio.context import Context

    from annotation import accounts
    from annotation.store import Store

    store = Store(db_url)

    with gr.Group(visible=False, elem_id="ma-first-run") as first_box:
        gr.Markdown("### First run: create the first admin\nThis database has no admin account yet. The server "
                    "log shows a one-time **set-up token** (a line starting `No admin account yet`). Enter it "
                    "with the admin's name and password (at least 8 characters).")
        with gr.Row():
            setup_token = gr.Textbox(label="Set-up token", type="password", elem_id="ma-setup-token")
            setup_name = gr.Textbox(label="Admin name", elem_id="ma-setup-name")
            setup_password = gr.Textbox(label="Password", type="password", elem_id="ma-setup-password")
        setup_btn = gr.Button("Create admin", variant="primary", elem_id="ma-setup-btn")
    setup_status = gr.Markdown(elem_id="ma-setup-status")

    gr.Markdown("Admins manage accounts here (sign in with an admin account on the Annotate tab first). "
                "Roles: **rater** rates items and sends items to the queue; **examiner** also reviews "
                "disagreements; **admin** also exports and manages accounts.")
    status = gr.Markdown(elem_id="ma-accounts-status")
    refresh_btn = gr.Button("Show accounts", elem_id="ma-accounts-refresh")
    table = gr.Dataframe(headers=["name", "role", "disabled", "can sign in"], interactive=False,
                         elem_id="ma-accounts")
    with gr.Row():
        name = gr.Textbox(label="Account name", elem_id="ma-acct-name")
        password = gr.Textbox(label="Password (new accounts and resets)", type="password", elem_id="ma-acct-password")
        role = gr.Dropdown(list(accounts.ROLES), value="rater", label="Role", elem_id="ma-acct-role")
    with gr.Row():
        add_btn = gr.Button("Add account", variant="primary", elem_id="ma-acct-add")
        reset_btn = gr.Button("Reset password", elem_id="ma-acct-reset")
        role_btn = gr.Button("Set role", elem_id="ma-acct-role-btn")
        disable_btn = gr.Button("Disable", variant="stop", elem_id="ma-acct-disable")
        enable_btn = gr.Button("Enable", elem_id="ma-acct-enable")

    def rows(token):
        return [[a["name"], a["role"], "yes" if a["disabled"] else "", "yes" if a["has_password"] and not a["disabled"]
                 else ""] for a in accounts.list_accounts(store, token)]

    def show(token):
        try:
            return "", rows(token)
        except MetaAlignerError as e:
            return _msg(e), None

    def act(action, done):
        def handler(token, n, p, r):
            try:
                action(token, n, p, r)
                return _msg(done.format(name=(n or "").strip()), ok=True), rows(token), ""
            except MetaAlignerError as e:
                return _msg(e), gr.skip(), ""
        return handler

    io = dict(inputs=[signed_in, name, password, role], outputs=[status, table, password], api_visibility="private")
    add_btn.click(act(lambda t, n, p, r: accounts.add_account(store, t, n, p, r), "Account {name} added."), **io)
    reset_btn.click(act(lambda t, n, p, r: accounts.reset_password(store, t, n, p),
                        "Password of {name} reset; their open sign-ins ended."), **io)
    role_btn.click(act(lambda t, n, p, r: accounts.set_role(store, t, n, r), "Role of {name} changed."), **io)
    disable_btn.click(act(lambda t, n, p, r: accounts.set_disabled(store, t, n, True),
                          "Account {name} disabled; its open sign-ins ended."), **io)
    enable_btn.click(act(lambda t, n, p, r: accounts.set_disabled(store, t, n, False), "Account {name} enabled."), **io)
    refresh_btn.click(show, inputs=[signed_in], outputs=[status, table], api_visibility="private")

    def first_run_open() -> bool:
        try:
            return first_run is not None and not first_run.used and accounts.needs_first_admin(store)
        except MetaAlignerError:
            return False

    def create_admin(setup, n, p, request: gr.Request):
        if first_run is None:
            return _msg("first-run set-up is not available: an admin exists (or the app was started without it)"), \
                gr.skip(), ""
        try:
            accounts.create_first_admin(store, first_run, setup, n, p, client=accounts.client_of(request))
        except MetaAlignerError as e:
            return _msg(e), gr.skip(), ""
        return (_msg(f"Admin {(n or '').strip()} created. Sign in on the Annotate tab.", ok=True),
                gr.update(visible=False), "")

    setup_btn.click(create_admin, inputs=[setup_token, setup_name, setup_password],
                    outputs=[setup_status, first_box, setup_password], api_visibility="private")
    root = Context.root_block
    if root is not None:
        root.load(lambda: gr.update(visible=first_run_open()), None, first_box, api_visibility="private", queue=False)
