"""``order: disagreement``: the items whose submitted scores disagree most are served next; the
dashboard's alpha per batch. On SQLite and PostgreSQL."""
from __future__ import annotations

import json

import krippendorff
import numpy as np
import pytest
import sqlalchemy as sa

from annotation.protocols import load_protocol
from annotation.store import OPERATOR, Store
from conftest import write_jsonl

LEVELS = [{"score": s, "description": f"level {s}"} for s in range(4)]


def protocol_file(tmp_path, order: str | None, name: str):
    spec = {"name": name, "version": "1", "raters": 3, "guidelines": "rate",
            "objectives": [{"key": "clarity", "name": "Clarity", "description": "the answer is clear",
                            "levels": LEVELS}]}
    if order:
        spec["order"] = order
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(spec))
    return path


# item -> submitted scores of raters r1, r2 (None: not rated by that rater)
STUDY = {"agree": (1, 1), "wide": (0, 3), "narrow": (1, 2), "one": (2, None), "none": (None, None)}


def make_study(tmp_path, db, order):
    proto = protocol_file(tmp_path, order, f"p-{order or 'default'}")
    write_jsonl(tmp_path / "items.jsonl", [{"item_id": f"{order}-{k}", "query": f"q {k}",
                                            "responses": [{"text": f"answer {k}"}]} for k in STUDY])
    rows = [{"item_id": f"{order}-{k}", "query": f"q {k}", "response": f"answer {k}", "annotator": who,
             "objective": "clarity", "score": sc}
            for k, scores in STUDY.items() for who, sc in zip(("r1", "r2"), scores) if sc is not None]
    write_jsonl(tmp_path / "ratings.jsonl", rows)
    store = Store(db)
    store.import_items(tmp_path / "items.jsonl", str(proto))
    store.import_ratings(tmp_path / "ratings.jsonl", str(proto))
    return store


def served_order(store, name: str) -> list[str]:
    store.add_annotator(name, f"{name}-password-123")
    token = store.sign_in(name, f"{name}-password-123")
    order = []
    while (view := store.next_item(token)) is not None:
        order.append(view.uid.split("-", 1)[1])
        store.save(token, view.uid, {(view.responses[0].id, "clarity"): 1}, submit=True)
    return order


def test_disagreement_first_then_least_rated(tmp_path, db_url):
    assert load_protocol(protocol_file(tmp_path, "disagreement", "x")).order == "disagreement"
    store = make_study(tmp_path, db_url, "disagreement")
    assert served_order(store, "zed") == ["wide", "narrow", "none", "one", "agree"]


def test_default_order_is_least_rated_first(tmp_path, db_url):
    store = make_study(tmp_path, db_url, None)
    assert served_order(store, "zed") == ["none", "one", "agree", "wide", "narrow"]


def test_bad_order_is_named(tmp_path):
    from metaaligner_core.errors import MetaAlignerError

    path = protocol_file(tmp_path, "loudest", "bad")
    with pytest.raises(MetaAlignerError, match='order.*"disagreement"|order.*disagreement'):
        load_protocol(path)


def test_alpha_per_batch_in_order_of_completion(tmp_path, db_url):
    store = make_study(tmp_path, db_url, "disagreement")
    served_order(store, "zed")
    served_order(store, "yan")  # completes "one"
    served_order(store, "xi")  # completes "none"
    dash = store.dashboard(OPERATOR, bootstrap=0, batch_size=2)
    # the expectation from the tables: items complete (3 raters), by their last submission
    eng = sa.create_engine(db_url)
    with eng.connect() as c:
        done = c.execute(sa.text(
            "SELECT i.id, MAX(a.submitted_at) FROM assignments a JOIN items i ON i.id = a.item_id "
            "WHERE a.status = 'submitted' GROUP BY i.id HAVING COUNT(*) >= 3 ORDER BY MAX(a.submitted_at), i.id")).all()
        ratings = c.execute(sa.text(
            "SELECT r2.item_id, n.name, r.score FROM ratings r JOIN responses r2 ON r2.id = r.response_id "
            "JOIN annotators n ON n.id = r.annotator_id WHERE r.status = 'submitted'")).all()
    eng.dispose()
    order = [iid for iid, _ in done]
    assert len(order) == 5
    raters = sorted({who for _, who, _ in ratings})
    batches = dash["alpha_by_batch"]["batches"]
    assert [b["items"] for b in batches] == [2, 2, 1]
    for b, start in zip(batches, range(0, 5, 2)):
        chunk = order[start:start + 2]
        matrix = np.full((len(raters), len(chunk)), np.nan)
        for iid, who, score in ratings:
            if iid in chunk:
                matrix[raters.index(who), chunk.index(iid)] = score
        values = matrix[~np.isnan(matrix)]
        if len(set(values.tolist())) < 2:
            assert b["alpha"]["clarity"] is None
        else:
            expected = krippendorff.alpha(reliability_data=matrix, level_of_measurement="ordinal",
                                          value_domain=[0, 1, 2, 3])
            assert b["alpha"]["clarity"] == pytest.approx(expected, abs=1e-4)
