"""The research loop from the command line: ratings → ``annotate train`` → ``annotate ab`` → figures.

The study is built here (IMHI protocol, k = 2, some items reviewed by an examiner, some still
waiting, some short of a rater), on SQLite and on PostgreSQL; the aligner trained is a tiny
two-layer LLaMA the test makes, for a few steps. Expected counts are computed in this file from
the ratings it wrote, not by the code under test.
"""
from __future__ import annotations

import json
import random
from itertools import combinations
from pathlib import Path

import pytest

from annotation.store import OPERATOR, Store
from conftest import read_jsonl, run_cli, write_jsonl
from metaaligner_core.templates import build_prompt

KEYS = ("correctness", "informative", "professional")
RATERS = ("ann", "bob")
WORDS = ("the post shows signs of stress because the user mentions sleep work and worry "
         "no evidence of depression is given answer yes it does maybe").split()


def tiny_llama_dir(path: Path) -> Path:
    """A randomly initialised two-layer LLaMA with a word-level tokenizer over the test's words."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = sorted(set(WORDS) | set(build_prompt("ultrafeedback", "q", "a", ["correctness"]).split()))
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "<pad>", *words])}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>", model_max_length=512)
    tok.save_pretrained(path)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def sentence(rng: random.Random, n: int = 8) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def build_study(root: Path, db: str, n_items: int = 14, seed: int = 3) -> dict:
    """Items with two responses; both raters rate most items, one rater the last two; items whose
    raters disagree are reviewed by the examiner except the last such one. Returns what the test
    needs to compute the expected pairs itself."""
    rng = random.Random(seed)
    items, rows = [], []
    for i in range(n_items):
        query = f"post {i}: " + sentence(rng)
        responses = [sentence(rng), sentence(rng)]
        items.append({"item_id": f"it{i:02d}", "query": query, "responses": [{"text": t} for t in responses]})
    scores: dict[tuple[str, int, str, str], int] = {}  # (item, response index, objective, rater) -> score
    for i, it in enumerate(items):
        raters = RATERS if i < n_items - 2 else RATERS[:1]
        for ri, resp in enumerate(it["responses"]):
            for key in KEYS:
                base = rng.randint(0, 3)
                for who in raters:
                    # most ratings agree; a few differ by one (those items go to the examiner)
                    score = base if (who == "ann" or rng.random() < 0.85) else min(3, base + 1)
                    scores[(it["item_id"], ri, key, who)] = score
                    rows.append({"item_id": it["item_id"], "query": it["query"], "response": resp["text"],
                                 "annotator": who, "objective": key, "score": score})
    write_jsonl(root / "items.jsonl", items)
    write_jsonl(root / "ratings.jsonl", rows)
    store = Store(db)
    store.import_items(root / "items.jsonl", "imhi")
    store.import_ratings(root / "ratings.jsonl", "imhi")
    # the examiner reviews every disagreeing item but the last one
    disagreeing = [it["item_id"] for i, it in enumerate(items) if i < n_items - 2 and any(
        scores[(it["item_id"], ri, k, "ann")] != scores[(it["item_id"], ri, k, "bob")] for ri in (0, 1) for k in KEYS)]
    assert len(disagreeing) >= 2, "the seed must give some disagreements"
    reviews: dict[tuple[str, int, str], int] = {}
    for uid in disagreeing[:-1]:
        view = store.review_view(OPERATOR, uid)
        final = {}
        for ri, r in enumerate(view.responses):
            for k in KEYS:
                a, b = scores[(uid, ri, k, "ann")], scores[(uid, ri, k, "bob")]
                if a != b:
                    final[(r.response_id, k)] = reviews[(uid, ri, k)] = (a + b) % 4  # the examiner's own call
        store.finalize(OPERATOR, uid, final, reason="checked against the post")
    return {"items": items, "scores": scores, "reviews": reviews, "pending": disagreeing[-1:],
            "short": [it["item_id"] for it in items[n_items - 2:]]}


def expected_pairs(study: dict, held_out=()) -> list[dict]:
    """The pairs, computed here: complete, settled items; the examiner's score where reviewed."""
    out = []
    for it in study["items"]:
        uid = it["item_id"]
        if uid in study["short"] or uid in study["pending"] or uid in held_out:
            continue
        labels = {}
        for k in KEYS:
            final = []
            for ri in (0, 1):
                a, b = study["scores"][(uid, ri, k, "ann")], study["scores"][(uid, ri, k, "bob")]
                final.append(study["reviews"].get((uid, ri, k), a) if a != b else a)
            labels[k] = ">" if final[0] > final[1] else "<" if final[0] < final[1] else "="
        out.append({"item_id": uid, "labels": labels})
    return out


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    return tiny_llama_dir(tmp_path_factory.mktemp("tiny") / "base")


FAST = ("--max-steps", "2", "--batch-size", "2", "--max-length", "160", "--lr", "1e-3", "--device", "cpu",
        "--no-progress", "--logging-steps", "1")


def test_annotate_train_stats_match_the_ratings_and_the_aligner_loads(tmp_path, db_url, tiny_base):
    study = build_study(tmp_path, db_url)
    out = tmp_path / "run"
    res = run_cli("annotate", "train", "--db", db_url, "--base", tiny_base, "--out", out, "--min-pairs", "4",
                  "--holdout", "2", *FAST)
    assert res.returncode == 0, res.stderr[-3000:]
    assert Path(res.stdout.strip().splitlines()[-1]) == out / "final"

    record = json.loads((out / "study.json").read_text())
    assert record["protocol"] == "imhi" and record["protocol_version"] == "2-paper-c3"
    assert "password" not in json.dumps(record) or "***" in record["database"]
    held = record["held_out_items"]
    assert len(held) == 2
    pairs = expected_pairs(study, held_out=held)
    assert sorted(p["item_id"] for p in read_jsonl(out / "pairs.jsonl")) == sorted(p["item_id"] for p in pairs)
    got_labels = {p["item_id"]: p["labels"] for p in read_jsonl(out / "pairs.jsonl")}
    assert got_labels == {p["item_id"]: p["labels"] for p in pairs}
    assert set(held).isdisjoint(record["trained_items"])

    stats = json.loads((out / "stats.json").read_text())
    assert stats == json.loads((out / "dataset" / "stats.json").read_text())
    assert stats["comparisons"] == len(pairs)
    assert stats["rows"]["preference"] == sum(">" in p["labels"].values() for p in pairs) + \
        sum("<" in p["labels"].values() for p in pairs)
    assert stats["rows"]["equal"] == sum("=" in p["labels"].values() for p in pairs)
    assert stats["objective_counts"] == {k: len(pairs) for k in KEYS}
    assert stats["rows"]["warmup"] >= 1  # warm-up on

    commands = (out / "commands.sh").read_text().splitlines()
    assert any(c.startswith("metaaligner build-dataset --input") and "--warmup-size auto" in c for c in commands)
    train_cmd = next(c for c in commands if c.startswith("metaaligner train "))
    assert "--lora" in train_cmd.split() and "--max-steps 2" in train_cmd  # LoRA by default; options pass through
    assert json.loads((out / "final" / "config.json").read_text())["model_type"] == "llama"
    assert [json.loads(line)["stage"] for line in (out / "metrics.jsonl").read_text().splitlines()][0] == "warmup"

    # the new aligner loads in align
    write_jsonl(tmp_path / "in.jsonl", [{"query": "post: the user mentions sleep", "draft": "the post shows stress"}])
    res = run_cli("align", "--input", tmp_path / "in.jsonl", "--out", tmp_path / "aligned.jsonl",
                  "--objectives", "correctness", "--aligner", out / "final", "--max-new-tokens", "4", "--device", "cpu")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "aligned" in read_jsonl(tmp_path / "aligned.jsonl")[0]

    # a rerun resumes: every stage is already trained
    res = run_cli("annotate", "train", "--db", db_url, "--base", tiny_base, "--out", out, "--min-pairs", "4",
                  "--holdout", "2", *FAST)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stderr.count("already trained") == 3
    # ... but not with other settings
    res = run_cli("annotate", "train", "--db", db_url, "--base", tiny_base, "--out", out, "--min-pairs", "4",
                  "--holdout", "3", *FAST)
    assert res.returncode == 2 and "holdout=2, not 3" in res.stderr


def test_annotate_train_refuses_too_few_pairs_with_counts(tmp_path, db_url, tiny_base):
    study = build_study(tmp_path, db_url, n_items=6)
    n_pairs = len(expected_pairs(study))
    res = run_cli("annotate", "train", "--db", db_url, "--base", tiny_base, "--out", tmp_path / "run", *FAST)
    assert res.returncode == 2
    msg = res.stderr.strip().splitlines()[-1]
    assert f"has {n_pairs} preference pairs with final labels" in msg
    assert "2 short of their raters, 1 waiting for the examiner's review" in msg
    assert "needs at least 32" in msg
    assert not (tmp_path / "run").exists()  # nothing half-written


def _rate(store, token, answer) -> None:
    """A rater rates their next items until none are left; ``answer(view, response)`` gives the scores."""
    while (view := store.next_item(token)) is not None:
        scores = {(r.id, k): answer(view, r, k) for r in view.responses for k in KEYS}
        store.save(token, view.uid, scores, submit=True)


def test_annotate_ab_is_blind_and_the_dashboard_difference_is_the_tests(tmp_path, db_url, tiny_base):
    build_study(tmp_path, db_url)
    out = tmp_path / "run"
    res = run_cli("annotate", "train", "--db", db_url, "--base", tiny_base, "--out", out, "--min-pairs", "4",
                  "--holdout", "3", "--stages", "preference", *FAST)
    assert res.returncode == 0, res.stderr[-3000:]
    held = json.loads((out / "study.json").read_text())["held_out_items"]

    res = run_cli("annotate", "ab", "--db", db_url, "--baseline", tiny_base, "--candidate", out / "final",
                  "--queries", "3", "--name", "abtest", "--max-new-tokens", "6", "--device", "cpu")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "3 items enqueued" in res.stdout
    used = res.stdout.strip().splitlines()[-1].split(": ", 1)[1].split(", ")
    assert sorted(used) == sorted(held)  # the held-out queries, recorded

    store = Store(db_url)
    from annotation import ab

    store.add_annotator("cat", "cat-password-123", role="rater")
    store.add_annotator("dan", "dan-password-123", role="rater")
    # the raters see the A/B items among the rest; they rate by a hidden rule the test knows:
    # the response at position 0 gets 3 on correctness, else 1; the other objectives by text length
    seen_views = []

    def answer(view, r, k):
        seen_views.append(view)
        if k == "correctness":
            return 3 if r.position == 0 else 1
        return len(r.text) % 4

    for who in ("cat", "dan"):
        _rate(store, store.sign_in(who, f"{who}-password-123"), answer)
    ab_views = [v for v in seen_views if v.uid.startswith("abtest-")]
    assert len({v.uid for v in ab_views}) == 3
    for v in ab_views:  # nothing a rater sees names a model
        shown = repr(v)
        assert str(tiny_base) not in shown and str(out) not in shown and "baseline" not in shown \
            and "candidate" not in shown

    # independent expectation: which arm sits at which position, read straight from the tables
    import sqlalchemy as sa

    eng = sa.create_engine(db_url if "://" in db_url else f"sqlite:///{db_url}")
    with eng.connect() as c:
        rows = c.execute(sa.text(
            "SELECT i.uid, a.arm, r.position, r.text FROM ab_responses a JOIN responses r ON r.id = a.response_id "
            "JOIN items i ON i.id = a.item_id")).all()
    eng.dispose()
    by_item: dict[str, dict[str, tuple[int, str]]] = {}
    for uid, arm, pos, text in rows:
        by_item.setdefault(uid, {})[arm] = (pos, text)
    assert len(by_item) == 3

    def score(pos, text, k):
        return (3 if pos == 0 else 1) if k == "correctness" else len(text) % 4

    dash = store.dashboard(OPERATOR, bootstrap=200, seed=1)
    fig = dash["ab"]["abtest"]
    assert fig["baseline"] == str(tiny_base) and fig["candidate"] == str(out / "final") and fig["items"] == 3
    for k in KEYS:
        diffs = [score(*arms["candidate"], k) - score(*arms["baseline"], k) for arms in by_item.values()]
        got = fig["objectives"][k]
        assert got["n"] == 3
        assert got["difference"] == pytest.approx(sum(diffs) / 3)
        assert (got["wins"], got["ties"], got["losses"]) == (sum(d > 0 for d in diffs), sum(d == 0 for d in diffs),
                                                             sum(d < 0 for d in diffs))
        lo, hi = got["ci95"]
        assert min(diffs) - 1e-9 <= lo <= got["difference"] <= hi <= max(diffs) + 1e-9
    # A/B items stay out of the training pairs of a later run
    from annotation.training_run import load_study

    assert not any(p["item_id"].startswith("abtest-") for p in load_study(store, OPERATOR, "imhi").pairs)
    # the CLI prints the same figure
    res = run_cli("annotate", "agreement", "--db", db_url, "--bootstrap", "200", "--seed", "1")
    assert res.returncode == 0, res.stderr
    assert f"correctness: {fig['objectives']['correctness']['difference']:+.3f}" in res.stdout


def test_ab_compare_is_a_paired_bootstrap():
    from annotation.ab import compare

    pairs = [(1.0, 2.0), (2.0, 2.0), (0.0, 3.0), (3.0, 1.0)]
    got = compare({"k": pairs}, bootstrap=500, seed=0)["k"]
    assert got["difference"] == pytest.approx((1 + 0 + 3 - 2) / 4)
    assert (got["wins"], got["ties"], got["losses"]) == (2, 1, 1)
    # paired: shifting both arms by the same per-item amount changes nothing
    shifted = compare({"k": [(a + 10 * i, b + 10 * i) for i, (a, b) in enumerate(pairs)]}, bootstrap=500, seed=0)["k"]
    assert shifted["ci95"] == pytest.approx(got["ci95"])
    assert compare({"k": []})["k"]["difference"] is None


def test_ab_items_show_both_arms_in_both_positions_and_no_model_names(tmp_path, db_url):
    from annotation import ab

    build_study(tmp_path, db_url, n_items=6)
    store = Store(db_url)
    queries = [ab.Query(f"it{i:02d}", f"query {i}", "draft") for i in range(20)]
    rows = [(q, f"baseline text {i}", f"candidate text {i}") for i, q in enumerate(queries)]
    ab.enqueue(store, OPERATOR, protocol="imhi", baseline="secret-base-model", candidate="/runs/secret-candidate",
               template="ultrafeedback", rows=rows, seed=5, name="blind")
    firsts = []
    for i in range(20):
        arms = ab.arms_of(store, OPERATOR, f"blind-{i + 1:04d}")
        assert sorted(a for v in arms.values() for a in v) == ["baseline", "candidate"]
        first = min(arms, key=lambda rid: rid)
        firsts.append(arms[first][0])
    assert 3 <= firsts.count("baseline") <= 17  # random order, not one arm always first
    store.add_annotator("eve", "eve-password-123")
    token = store.sign_in("eve", "eve-password-123")
    with pytest.raises(Exception, match="admin"):
        ab.arms_of(store, token, "blind-0001")
    view = store.item_view(token, "blind-0001")
    assert "secret" not in repr(view)
    assert {r.text for r in view.responses} == {"baseline text 0", "candidate text 0"}
