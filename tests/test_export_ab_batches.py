"""The Export tab shows the blind A/B study's results and alpha per batch (issue 24).

The study is built here: regular items and a blind A/B batch (``annotation.ab.enqueue`` with
corrections the test writes, so the test knows which text is the candidate's), rated by two
raters with scores the test draws and records. Expected figures come from those records only:
the candidate's mean score minus the baseline's per objective and the per-item wins, ties and
losses, and Krippendorff's alpha per batch from the ``krippendorff`` package. The browser reads
the tables of ``python -m annotation.ui`` in headless Chromium; a rater calling the dashboard's
handlers through the raw API is refused.
"""
from __future__ import annotations

import json
import random
import uuid

import pytest

from annotation.dashboard import DEFAULT_BATCH
from annotation.store import OPERATOR, Store
from test_annotation_polling import PASSWORD, _items, _sign_in, _status_has, browser, fast_passwords, server  # noqa: F401

KEYS = ("correctness", "informative", "professional")
N_REGULAR = 22  # with the A/B items: two batches of DEFAULT_BATCH (20) and the rest
N_AB = 4
BASELINE, CANDIDATE = "base_model-v1", "/runs/cand_1/final"


def _rate_all(store: Store, name: str, score_of, done_order: list[str] | None = None) -> int:
    token = store.sign_in(name, PASSWORD)
    n = 0
    while (view := store.next_item(token)) is not None:
        store.save(token, view.uid, {(r.id, k): score_of(name, r.text, k) for r in view.responses for k in KEYS},
                   submit=True)
        if done_order is not None:
            done_order.append(view.uid)
        n += 1
    return n


def _build(url: str, tmp_path):
    """Regular items, rated by bob then carol. -> (store, scores {(text, key, rater): score}, the
    scoring rule, item uids in the order carol completed them)."""
    rng = random.Random(7)
    scores: dict[tuple[str, str, str], int] = {}

    def score_of(rater, text, key):
        if (text, key, rater) not in scores:
            other = scores.get((text, key, "carol" if rater == "bob" else "bob"))
            # raters agree more often than not, so alpha is defined and not trivial
            scores[(text, key, rater)] = (other if other is not None and rng.random() < 0.6
                                         else rng.randint(0, 3))
        return scores[(text, key, rater)]

    store = Store(url)
    store.import_items(_items(tmp_path, "regular", [f"post number {i}" for i in range(N_REGULAR)]))
    order: list[str] = []
    _rate_all(store, "bob", score_of)
    _rate_all(store, "carol", score_of, order)  # carol is each item's second rater: she completes it
    return store, scores, score_of, order


def _ab(store: Store, tmp_path, score_of, order: list[str]):
    from annotation import ab

    texts = [(f"baseline correction {i}: rest and routine", f"candidate correction {i}: sleep hygiene and help")
             for i in range(N_AB)]
    queries = [ab.Query(f"q-src-{i}", f"post number {i}", f"answer to post number {i}") for i in range(N_AB)]
    ab.enqueue(store, OPERATOR, protocol="imhi", baseline=BASELINE, candidate=CANDIDATE, template="ultrafeedback",
               rows=[(q, b, c) for q, (b, c) in zip(queries, texts)], seed=11, name="abtest")
    _rate_all(store, "bob", score_of)
    assert _rate_all(store, "carol", score_of, order) == N_AB
    return texts


def _expected_ab(scores, texts):
    out = {}
    for k in KEYS:
        diffs = []
        for b, c in texts:
            mean = lambda t: (scores[(t, k, "bob")] + scores[(t, k, "carol")]) / 2  # noqa: E731
            diffs.append(mean(c) - mean(b))
        out[k] = (sum(diffs) / len(diffs), sum(d > 0 for d in diffs), sum(d == 0 for d in diffs),
                  sum(d < 0 for d in diffs))
    return out


def _expected_batches(scores, order, texts_of):
    import krippendorff
    import numpy as np

    out = []
    for start in range(0, len(order), DEFAULT_BATCH):
        chunk = order[start:start + DEFAULT_BATCH]
        units = [t for uid in chunk for t in texts_of[uid]]
        alphas = {}
        for k in KEYS:
            matrix = np.array([[scores[(t, k, r)] for t in units] for r in ("bob", "carol")], dtype=float)
            alphas[k] = krippendorff.alpha(reliability_data=matrix, level_of_measurement="ordinal",
                                           value_domain=[0, 1, 2, 3])
        out.append((len(chunk), alphas))
    return out


def _texts_of(url) -> dict[str, list[str]]:
    import sqlalchemy as sa

    eng = sa.create_engine(url)
    try:
        with eng.connect() as c:
            rows = c.execute(sa.text("SELECT i.uid, r.text FROM responses r JOIN items i ON i.id = r.item_id")).all()
    finally:
        eng.dispose()
    out: dict[str, list[str]] = {}
    for uid, text in rows:
        out.setdefault(uid, []).append(text)
    return out


def _table(page, elem_id) -> list[list[str]]:
    """The rows Gradio 6's Dataframe shows (its grid of ``role=gridcell`` cells)."""
    return page.eval_on_selector_all(
        f"#{elem_id} [role=row]:has([role=gridcell])",
        "rows => rows.map(r => [...r.querySelectorAll('[role=gridcell]')].map(c => c.innerText.trim()))")


def _headers(page, elem_id) -> list[str]:
    return page.eval_on_selector_all(f"#{elem_id} thead th", "ths => ths.map(th => th.innerText.trim())")


@pytest.mark.browser
def test_export_tab_shows_the_ab_difference_and_alpha_per_batch(server, browser):
    from playwright.sync_api import expect

    expect.set_options(timeout=60_000)
    base, url, tmp_path = server
    store, scores, score_of, order = _build(url, tmp_path)

    page = browser.new_page()
    page.goto(base)
    _sign_in(page, "alice")
    _status_has(page, "No items are waiting")
    page.get_by_role("tab", name="Export").click()  # ratings, no A/B study yet: one line, no table
    expect(page.locator("#ma-ab-note")).to_contain_text("No blind A/B study yet")
    expect(page.locator("#ma-ab")).to_be_hidden()
    expect(page.locator("#ma-batches")).to_contain_text("20")

    texts = _ab(store, tmp_path, score_of, order)
    page.get_by_role("tab", name="Annotate").click()
    page.get_by_role("tab", name="Export").click()  # opened again: computed again
    expect(page.locator("#ma-ab")).to_contain_text("abtest")
    note = page.locator("#ma-ab-note").inner_text()
    assert BASELINE in note and CANDIDATE in note and f"{N_AB} items" in note

    headers = _headers(page, "ma-ab")
    assert headers[:2] == ["study", "objective"] and "candidate − baseline" in headers
    rows = {r[1]: dict(zip(headers, r)) for r in _table(page, "ma-ab")}
    assert set(rows) == set(KEYS)
    for k, (diff, wins, ties, losses) in _expected_ab(scores, texts).items():
        row = rows[k]
        assert row["candidate − baseline"] == f"{diff:+.3f}", (k, row, diff)
        assert (int(row["wins"]), int(row["ties"]), int(row["losses"])) == (wins, ties, losses), (k, row)
        assert int(row["items rated"]) == N_AB
        lo, hi = (float(x) for x in row["95% interval (paired bootstrap)"].split(" – "))
        assert lo - 5e-4 <= diff <= hi + 5e-4

    expected = _expected_batches(scores, order, _texts_of(url))
    assert [n for n, _ in expected] == [DEFAULT_BATCH, N_REGULAR + N_AB - DEFAULT_BATCH]
    headers = _headers(page, "ma-batches")
    assert headers[:2] == ["batch", "items"] and all(k in headers for k in KEYS)
    got = [dict(zip(headers, r)) for r in _table(page, "ma-batches")]
    assert len(got) == len(expected)
    for i, (row, (n, alphas)) in enumerate(zip(got, expected)):
        assert int(row["batch"]) == i + 1 and int(row["items"]) == n
        for k in KEYS:
            assert abs(float(row[k]) - alphas[k]) <= 5e-4 + 1e-9, (i, k, row[k], alphas[k])
    assert "order: disagreement" in page.locator("#ma-batches-note").inner_text()
    for table in ("#ma-ab", "#ma-batches"):  # real headers, never Gradio's placeholders
        assert "1\t2\t3" not in page.locator(f"{table} thead").inner_text()


def test_a_rater_calling_the_dashboard_handlers_over_the_raw_api_is_refused(server):
    """The Export tab's handlers (opening the tab, Refresh) are public endpoints: a rater's own
    session, or a session holding no sign-in whatever it sends, gets a refusal, no figures."""
    from test_security_app import RawGradio, backend_fns, components, fn_by_inputs

    base, url, tmp_path = server
    store, scores, score_of, order = _build(url, tmp_path)
    _ab(store, tmp_path, score_of, order)
    alice_token = store.sign_in("alice", PASSWORD)  # a real admin token, as a thief might hold
    raw = RawGradio(base)
    try:
        cfg = raw.config()
        comps = components(cfg)
        ab_df = next(i for i, c in comps.items() if c.get("props", {}).get("elem_id") == "ma-ab")
        dash_fns = [fn for fn, dep in backend_fns(cfg) if ab_df in dep["outputs"] and len(dep["inputs"]) == 1]
        triggers = {comps[t[0]]["type"] + "." + t[1] for fn, dep in backend_fns(cfg) if fn in dash_fns
                    for t in dep["targets"]}
        assert {"button.click", "tabitem.select"} <= triggers, triggers
        sign_in = fn_by_inputs(cfg, "ma-name", "ma-password")
        bob = uuid.uuid4().hex[:11]
        assert raw.call(sign_in, ["bob", PASSWORD], session_hash=bob)["ok"]
        for fn in dash_fns:
            for session, data in ((bob, [alice_token]), (bob, [None]), (uuid.uuid4().hex[:11], [alice_token])):
                res = raw.call(fn, data, session_hash=session)
                reply = json.dumps(res)
                assert res["ok"], res
                assert "abtest" not in reply and BASELINE not in reply and CANDIDATE not in reply, reply
                assert "Computed at" not in reply and "carol" not in reply, reply
                status, *rest = res["data"]
                refusals = ("admins only", "not signed in", "Sign in with an admin account")
                assert any(w in status for w in refusals), status
                for update in rest:  # every table empty and hidden, every line blank
                    value = update.get("value")
                    assert value in (None, "") or value.get("data") == [], update
                    assert "value" not in update or value == "" or update.get("visible") == "hidden", update
        # the admin's own session gets the figures over the same endpoint
        alice = uuid.uuid4().hex[:11]
        assert raw.call(sign_in, ["alice", PASSWORD], session_hash=alice)["ok"]
        res = raw.call(dash_fns[0], [None], session_hash=alice)
        assert res["ok"] and "abtest" in json.dumps(res) and BASELINE in json.dumps(res), res
    finally:
        raw.close()


def test_export_view_tables_on_sqlite_and_postgresql(db_url, tmp_path):
    """The same two tables from the dashboard handler's data, on both databases (no browser)."""
    from annotation.ui import export_view
    from test_annotation_polling import _accounts

    _accounts(db_url)
    store, scores, score_of, order = _build(db_url, tmp_path)
    alice = store.sign_in("alice", PASSWORD)
    view = export_view(store, alice)
    assert view.ab == [] and view.ab_note.startswith("No blind A/B study yet")
    texts = _ab(store, tmp_path, score_of, order)
    view = export_view(store, alice)
    rows = {r[1]: r for r in view.ab}
    for k, (diff, wins, ties, losses) in _expected_ab(scores, texts).items():
        assert rows[k][0] == "abtest" and rows[k][2] == N_AB
        assert rows[k][5] == f"{diff:+.3f}" and tuple(rows[k][7:]) == (wins, ties, losses)
    expected = _expected_batches(scores, order, _texts_of(db_url))
    assert [(r[0], r[1]) for r in view.batches] == [(i + 1, n) for i, (n, _) in enumerate(expected)]
    for row, (_, alphas) in zip(view.batches, expected):
        assert row[3:] == [round(alphas[k], 3) for k in KEYS]
    bob = store.sign_in("bob", PASSWORD)
    from annotation.store import AccessDenied

    with pytest.raises(AccessDenied):
        export_view(store, bob)
