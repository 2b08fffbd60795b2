"""``annotate export --format hf`` read back the way a user reads a dataset (issues 19 and 26).

A study of three items rated by two raters: ``it0`` agreed, ``it1`` and ``it2`` disagreed; an
examiner decides ``it1`` (scores that differ from the raters' means, so a mean or a missing
column would show), ``it2`` waits for review. The folder is loaded with
``datasets.load_dataset(DIR)`` (through the card's ``configs:``) and ``load_from_disk``; the
expected values come from what the test itself submitted, not from the store.
"""
from __future__ import annotations

import stat

import pytest

from annotation.store import OPERATOR, Store
from conftest import run_cli, write_jsonl

PASSWORD = "hf-export-password"
OBJ = ("correctness", "informative", "professional")
# item -> rater -> (scores of response a, scores of response b), per objective in OBJ order
PLAN = {"it0": {"r1": [(3, 3, 3), (1, 1, 1)], "r2": [(3, 3, 3), (1, 1, 1)]},
        "it1": {"r1": [(3, 2, 1), (0, 0, 0)], "r2": [(1, 2, 1), (0, 0, 2)]},
        "it2": {"r1": [(2, 2, 2), (3, 1, 0)], "r2": [(0, 2, 2), (3, 1, 0)]}}
EXAMINER = {("a1", "correctness"): 0, ("b1", "professional"): 2}  # it1's two disagreements, decided
# The schema every split must have, written out here independently of the code.
EXPECTED_TYPES = {"item_id": "string", "query": "string", "response": "string", "response_1": "string",
                  "response_2": "string", "source": "string", "annotator": "string", "objective": "string",
                  "score": "int32", "note": "string", "seconds": "float64", "ratings": "string", "notes": "string",
                  "final_score": "float64", "decided_by": "string", "reason": "string", "labels": "string",
                  "objectives": "string", "protocol": "string", "protocol_version": "string", "gold": "bool"}


@pytest.fixture(autouse=True)
def fast_passwords(monkeypatch):
    from annotation import accounts

    monkeypatch.setattr(accounts, "SCRYPT_N", 2 ** 10)


def _study(tmp_path, review: bool = True):
    store = Store(f"sqlite:///{tmp_path / 'ann.db'}")
    rows = [{"item_id": it, "query": f"post {it}", "responses": [{"text": f"a{it[-1]}", "source": "m1"},
                                                                 {"text": f"b{it[-1]}", "source": "m2"}]}
            for it in PLAN]
    store.import_items(write_jsonl(tmp_path / "items.jsonl", rows))
    tokens = {}
    for name, role in (("r1", "rater"), ("r2", "rater"), ("ex", "examiner"), ("boss", "admin")):
        store.add_annotator(name, PASSWORD, role=role)
        tokens[name] = store.sign_in(name, PASSWORD)
    for who in ("r1", "r2"):
        while (view := store.next_item(tokens[who])) is not None:
            plan = PLAN[view.uid][who]
            scores = {(r.id, o): plan[j][k] for j, r in enumerate(view.responses) for k, o in enumerate(OBJ)}
            store.save(tokens[who], view.uid, scores, submit=True, seconds=12)
    if review:
        a, b = store.review_view(tokens["ex"], "it1").responses
        store.finalize(tokens["ex"], "it1", {(a.response_id, "correctness"): EXAMINER[("a1", "correctness")],
                                             (b.response_id, "professional"): EXAMINER[("b1", "professional")]},
                       "the post is ambiguous")
    return store, tokens


def _load(out, tmp_path):
    from datasets import load_dataset

    return load_dataset(str(out), cache_dir=str(tmp_path / "hf-cache"))


def test_load_dataset_reads_every_split_with_the_explicit_schema(tmp_path):
    store, t = _study(tmp_path)
    out = tmp_path / "hf"
    store.export(t["boss"], "hf", out)
    dd = _load(out, tmp_path)
    assert set(dd) == {"ratings", "final", "pairs"}
    n_ratings = sum(len(v) * 3 for plan in PLAN.values() for v in plan.values())  # raters x responses x objectives
    assert dd["ratings"].num_rows == n_ratings and dd["final"].num_rows == len(PLAN) * 2 * 3
    assert dd["pairs"].num_rows == len(PLAN)
    for split in dd.values():
        assert {k: v.dtype for k, v in split.features.items()} == EXPECTED_TYPES
    # the ratings split holds what the raters submitted
    got = sorted((r["item_id"], r["annotator"], r["response"], r["objective"], r["score"]) for r in dd["ratings"])
    want = sorted((it, who, f"{'ab'[j]}{it[-1]}", o, plan[j][k]) for it, raters in PLAN.items()
                  for who, plan in raters.items() for j in range(2) for k, o in enumerate(OBJ))
    assert got == want
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*") if p.is_file()} == {0o600}


def test_final_split_carries_the_examiners_scores_and_null_for_pending_review(tmp_path):
    store, t = _study(tmp_path)
    out = tmp_path / "hf"
    store.export(t["boss"], "hf", out)
    final = {(r["item_id"], r["response"], r["objective"]): r for r in _load(out, tmp_path)["final"]}
    for (response, objective), score in EXAMINER.items():
        row = final[("it1", response, objective)]
        assert row["final_score"] == score and row["decided_by"] == "ex" and row["reason"] == "the post is ambiguous"
    # it1's agreed cells: the raters' shared score
    assert (final[("it1", "a1", "informative")]["final_score"], final[("it1", "a1", "informative")]["decided_by"]) \
        == (2, "agreement")
    # it2 disagrees on response a / correctness (2 vs 0) and no examiner decided: null, pending
    pending = [r for r in final.values() if r["decided_by"] == "pending review"]
    assert [(r["item_id"], r["response"], r["objective"]) for r in pending] == [("it2", "a2", "correctness")]
    assert pending[0]["final_score"] is None
    for (it, response, objective), row in final.items():  # every other cell: both raters agreed
        if row["decided_by"] == "agreement":
            j, k = "ab".index(response[0]), OBJ.index(objective)
            assert row["final_score"] == PLAN[it]["r1"][j][k] == PLAN[it]["r2"][j][k]
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "1 awaiting review" in card and "2 set by an examiner" in card
    # six responses (three items of two) per objective: fewer than 10, so no interval is offered as readable
    assert card.count("too few responses to read (6 < 10)") == len(OBJ)


def test_two_exports_concatenate_and_load_from_disk_still_works(tmp_path):
    from datasets import concatenate_datasets, load_from_disk

    store, t = _study(tmp_path, review=False)  # no review yet: every reason null, no examiner
    first = tmp_path / "hf-1"
    store.export(OPERATOR, "hf", first)
    it = store.review_view(t["ex"], "it1")
    a, b = it.responses
    store.finalize(t["ex"], "it1", {(a.response_id, "correctness"): 0, (b.response_id, "professional"): 2}, "why")
    second = tmp_path / "hf-2"
    store.export(OPERATOR, "hf", second)
    one, two = load_from_disk(str(first)), load_from_disk(str(second))
    assert one["final"].features == two["final"].features
    for split in ("ratings", "final", "pairs"):
        both = concatenate_datasets([one[split], two[split]])
        assert both.num_rows == one[split].num_rows + two[split].num_rows
    assert all(r is None for r in one["final"]["reason"]) and "why" in two["final"]["reason"]


def test_card_shows_intervals_from_ten_responses_on():
    from annotation.hf_export import _card

    def dash(units):
        return {"objectives": {"correctness": {"alpha": 0.5, "ci95": [0.25, 0.75], "units": units, "annotators": 2}}}

    assert "0.250 – 0.750" in _card([], [], [], [], dash(10))
    few = _card([], [], [], [], dash(9))
    assert "0.250" not in few and "too few responses to read (9 < 10)" in few


def test_cli_export_push_is_one_line_offline_and_the_folder_loads(tmp_path):
    store, _ = _study(tmp_path)
    db = f"sqlite:///{tmp_path / 'ann.db'}"
    res = run_cli("annotate", "export", "--db", db, "--format", "hf", "--out", tmp_path / "cli",
                  "--push-to-hub", "someone/ratings", env={"HF_HUB_OFFLINE": "1"})
    assert res.returncode == 2 and "HF_HUB_OFFLINE is set" in res.stderr
    assert set(_load(tmp_path / "cli", tmp_path)) == {"ratings", "final", "pairs"}
