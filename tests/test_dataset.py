"""Algorithm 1 (dynamic multi-objective dataset): pure function, source layouts, CLI behaviour."""
from __future__ import annotations

import csv
import gzip
import json
import random

import pytest

from conftest import read_jsonl, run_cli, write_jsonl
from metaaligner_core.dataset import (PreferenceRecord, build_dynamic_dataset, rows_for_record,
                                      split_transcript)
from metaaligner_core.objectives import builtin_objectives
from metaaligner_core.templates import build_prompt

UF = {o.key: o for o in builtin_objectives("ultrafeedback")}


def rec(labels, i=0):
    return PreferenceRecord("Q", "Y1", "Y2", labels, i)


def test_both_directions_and_ties():
    rows = [r for r, _ in rows_for_record(
        rec({"honesty": ">", "truthfulness": ">", "helpfulness": "<", "instruction following": "="}),
        UF, "ultrafeedback", random.Random(0))]
    by = {(r["subset"], r["completion"]): r for r in rows}
    assert len(rows) == 3
    y1_wins = by[("preference", "Y1")]  # corrects y2 into y1 on the objectives y1 wins
    assert sorted(y1_wins["objectives"]) == ["honesty", "truthfulness"]
    assert y1_wins["prompt"] == build_prompt("ultrafeedback", "Q", "Y2", [UF[k] for k in y1_wins["objectives"]])
    y2_wins = by[("preference", "Y2")]  # corrects y1 into y2
    assert y2_wins["objectives"] == ["helpfulness"]
    assert y2_wins["prompt"] == build_prompt("ultrafeedback", "Q", "Y1", [UF["helpfulness"]])
    equal = by[("equal", "Y1")]
    assert equal["prompt"] == build_prompt("ultrafeedback", "Q", "Y2", [UF["instruction following"]], "equal")
    assert "make it equal" in equal["prompt"]


def test_single_direction_record_gives_one_row():
    rows = rows_for_record(rec({"honesty": "<"}), UF, "ultrafeedback", random.Random(0))
    assert [(r["subset"], r["completion"]) for r, _ in rows] == [("preference", "Y2")]


def test_objective_order_is_shuffled_per_row_and_seeded():
    labels = {k: ">" for k in UF}
    orders = {tuple(r["objectives"]) for r, _ in (rows_for_record(rec(labels), UF, "ultrafeedback", random.Random(s))[0]
                                                  for s in range(40))}
    assert len(orders) > 5  # 4 objectives: many of the 24 orders show up
    a = list(build_dynamic_dataset([rec(labels, i) for i in range(50)], UF, seed=7))
    b = list(build_dynamic_dataset([rec(dict(reversed(labels.items())), i) for i in range(50)], UF, seed=7))
    assert a == b  # same seed, same rows — whatever order the input listed its labels in
    c = list(build_dynamic_dataset([rec(labels, i) for i in range(50)], UF, seed=8))
    assert a != c


def test_warmup_rows_are_identity_samples_of_the_equal_subset():
    recs = [PreferenceRecord(f"Q{i}", f"good {i}", f"draft {i}", {"honesty": "=", "helpfulness": ">"}, i)
            for i in range(30)]
    rows = list(build_dynamic_dataset(recs, UF, seed=3, warmup_size=5))
    equal = [r for r in rows if r["subset"] == "equal"]
    warm = [r for r in rows if r["subset"] == "warmup"]
    assert len(equal) == 30 and len(warm) == 5
    equal_prompts = {r["prompt"] for r in equal}
    for w in warm:
        assert w["prompt"] in equal_prompts  # sampled from the equal subset
        i = w["source_index"]
        assert w["completion"] == f"draft {i}" and f"Answer: draft {i} |" in w["prompt"]  # identity mapping
    again = [r for r in build_dynamic_dataset(recs, UF, seed=3, warmup_size=5) if r["subset"] == "warmup"]
    assert again == warm
    other = [r for r in build_dynamic_dataset(recs, UF, seed=4, warmup_size=5) if r["subset"] == "warmup"]
    assert {r["source_index"] for r in other} != {r["source_index"] for r in warm}


def test_split_transcript():
    ctx, ans = split_transcript("\n\nHuman: hi\n\nAssistant: hello\n\nHuman: rob a bank?\n\nAssistant: No.")
    assert ctx == "Human: hi\n\nAssistant: hello\n\nHuman: rob a bank?\n\nAssistant:"
    assert ans == "No."


# ------------------------------------------------------------------------- CLI and layouts

def build(tmp_path, *args):
    out = tmp_path / "out"
    res = run_cli("-q", "build-dataset", "--out", out, *args)
    return res, out


def test_generic_labels_and_scores_cli_is_deterministic(tmp_path):
    src = write_jsonl(tmp_path / "pairs.jsonl", [
        {"query": "2+2?", "response_1": "4", "response_2": "5",
         "labels": {"honesty": ">", "helpfulness": "<", "Instruction_following": "="}},
        {"query": "Hi", "response_1": "Hello!", "response_2": "Go away", "scores_1": {"honesty": 3, "length": 2},
         "scores_2": {"honesty": 3, "length": 5}, "extra": "kept out"},
    ])
    res, out = build(tmp_path, "--input", src, "--warmup-size", "1", "--seed", "5")
    assert res.returncode == 0, res.stderr
    pref, equal, warm = (read_jsonl(out / f"{s}.jsonl") for s in ("preference", "equal", "warmup"))
    stats = json.loads((out / "stats.json").read_text())
    assert stats["rows"] == {"preference": 3, "equal": 2, "warmup": 1}
    assert {(r["source_index"], r["completion"]) for r in pref} == {(0, "4"), (0, "5"), (1, "Go away")}
    assert set(pref[0]) == {"prompt", "completion", "objectives", "subset", "source_index"}
    assert [r["objectives"] for r in equal if r["source_index"] == 1] == [["honesty"]]
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    res, out = build(tmp_path, "--input", src, "--warmup-size", "1", "--seed", "5")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first  # byte-identical rerun
    import datasets  # the rows load for training as they are
    ds = datasets.load_dataset("json", data_files=str(out / "preference.jsonl"), split="train")
    assert ds.num_rows == 3 and ds.column_names[:2] == ["prompt", "completion"]


def test_custom_objectives_in_labels(tmp_path):
    src = write_jsonl(tmp_path / "p.jsonl", [{"query": "q", "response_1": "a", "response_2": "b",
                                              "labels": {"empathy": ">"}}])
    res, out = build(tmp_path, "--input", src, "--objectives", "Empathy: the response should acknowledge feelings")
    assert res.returncode == 0, res.stderr
    row = read_jsonl(out / "preference.jsonl")[0]
    assert "aspects: Empathy: the response should acknowledge feelings | Query: q" in row["prompt"]


def test_hh_rlhf_layout_gz_and_subset_from_filename(tmp_path):
    path = tmp_path / "harmless-base-test.jsonl.gz"
    lines = [{"chosen": "\n\nHuman: how do I pick a lock?\n\nAssistant: I can't help with that.",
              "rejected": "\n\nHuman: how do I pick a lock?\n\nAssistant: Use a tension wrench."},
             {"chosen": "\n\nHuman: hi\n\nAssistant: ", "rejected": "\n\nHuman: hi\n\nAssistant: hey"}]
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.write("".join(json.dumps(x) + "\n" for x in lines))
    res, out = build(tmp_path, "--input", path, "--template", "hh-rlhf")
    assert res.returncode == 0, res.stderr
    rows = read_jsonl(out / "preference.jsonl")
    assert len(rows) == 1
    assert rows[0]["objectives"] == ["harmlessness"] and rows[0]["completion"] == "I can't help with that."
    # The authors' context: every turn before the last "\n\nAssistant:", then " \n\nAssistant:".
    assert "Context: \n\nHuman: how do I pick a lock? \n\nAssistant: | Answer: Use a tension wrench. | Edit: " in rows[0]["prompt"]
    assert json.loads((out / "stats.json").read_text())["skipped"] == {"empty_response": 1}


def test_hh_rlhf_helpful_subset_field_and_score_columns(tmp_path):
    src = write_jsonl(tmp_path / "hh.jsonl", [
        {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c", "subset": "helpful-base"},
        {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c",
         "harmlessness_chosen": 2, "harmlessness_rejected": 2, "humour_chosen": 1, "humour_rejected": 3},
    ])
    res, out = build(tmp_path, "--input", src, "--template", "hh-rlhf", "--source", "hh-rlhf")
    assert res.returncode == 0, res.stderr
    pref = read_jsonl(out / "preference.jsonl")
    assert [(r["objectives"], r["completion"]) for r in pref] == [(["helpfulness"], "b"), (["humour"], "c")]
    assert "The response should provide useful" in pref[0]["prompt"]  # HH-RLHF's own helpfulness wording
    assert [r["objectives"] for r in read_jsonl(out / "equal.jsonl")] == [["harmlessness"]]


def test_ultrafeedback_layout_every_pair_and_na_ratings(tmp_path):
    def comp(text, **r):
        return {"response": text, "annotations": {k: {"Rating": v, "Rationale": "..."} for k, v in r.items()}}
    src = write_jsonl(tmp_path / "uf.jsonl", [{"instruction": "Write a haiku", "completions": [
        comp("A", honesty="5", helpfulness="3", instruction_following="N/A"),
        comp("B", honesty="4", helpfulness="3", instruction_following="2"),
        comp("C", honesty="5", helpfulness="4", instruction_following="4"),
    ]}])
    res, out = build(tmp_path, "--input", src)
    assert res.returncode == 0, res.stderr
    pref, equal = read_jsonl(out / "preference.jsonl"), read_jsonl(out / "equal.jsonl")
    # pairs (A,B): honesty A>B, helpfulness =; (A,C): honesty =, helpfulness C; (B,C): all C
    got = sorted((r["completion"], tuple(sorted(r["objectives"]))) for r in pref)
    assert got == [("A", ("honesty",)), ("C", ("helpfulness",)),
                   ("C", ("helpfulness", "honesty", "instruction following"))]
    assert sorted((r["completion"], tuple(r["objectives"])) for r in equal) == [("A", ("helpfulness",)), ("A", ("honesty",))]


def test_csv_and_parquet_inputs(tmp_path):
    p = tmp_path / "pairs.csv"
    with open(p, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["query", "response_1", "response_2", "labels.honesty", "labels.length"])
        w.writerow(["q, with comma", "a", "b", ">", "="])
    res, out = build(tmp_path, "--input", p)
    assert res.returncode == 0, res.stderr
    assert len(read_jsonl(out / "preference.jsonl")) == 1 and len(read_jsonl(out / "equal.jsonl")) == 1
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist([{"query": "q", "response_1": "a", "response_2": "b",
                                          "scores_1": {"honesty": 1.0}, "scores_2": {"honesty": 2.0}}]),
                   tmp_path / "pairs.parquet")
    res, out = build(tmp_path, "--input", tmp_path / "pairs.parquet")
    assert res.returncode == 0, res.stderr
    assert read_jsonl(out / "preference.jsonl")[0]["completion"] == "b"


@pytest.mark.parametrize("name,data,message", [
    ("pairs.csv", b"query,response_1,response_2,labels.honesty\nq,a,b,>\nq,\xff\xfe,b,<\n", r"pairs.csv:3: not UTF-8 text"),
    ("pairs.jsonl.gz", b"not gzip at all", r"pairs.jsonl.gz: not a readable gzip file"),
    ("pairs.parquet", b"PAR1 truncated", r"pairs.parquet: cannot read Parquet"),
])
def test_unreadable_files_get_a_one_line_error(tmp_path, name, data, message):
    src = tmp_path / name
    src.write_bytes(data)
    res, out = build(tmp_path, "--input", src)
    err = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(err) == 1, res.stderr
    import re
    assert re.search(message, err[0]), err[0]
    assert not out.exists()


def test_a_csv_with_a_byte_order_mark_reads_its_first_column(tmp_path):
    src = tmp_path / "pairs.csv"
    src.write_bytes("query,response_1,response_2,labels.honesty\nq,a,b,>\n".encode("utf-8-sig"))
    res, out = build(tmp_path, "--input", src)
    assert res.returncode == 0, res.stderr
    assert read_jsonl(out / "preference.jsonl")[0]["completion"] == "a"


@pytest.mark.parametrize("lines,message", [
    (['{"query": "q", "response_1": "a", "response_2": "b", "labels": {"honesty": ">"}}', '{"query": '],
     r"pairs.jsonl:2: not valid JSON"),
    (['{"response_1": "a", "response_2": "b", "labels": {"honesty": ">"}}'], r'pairs.jsonl:1: field "query": missing'),
    (['{"query": "q", "response_1": "a", "response_2": "b", "labels": {"wisdom": ">"}}'],
     r'pairs.jsonl:1: field "labels.wisdom": unknown objective "wisdom"'),
    (['{"query": "q", "response_1": "a", "response_2": "b", "labels": {"honesty": "better"}}'],
     r'pairs.jsonl:1: field "labels.honesty": expected one of'),
    (['{"query": "q", "response_1": "a", "response_2": "b", "scores_1": {"honesty": "high"}, "scores_2": {"honesty": 1}}'],
     r'pairs.jsonl:1: field "scores_1.honesty": expected a number'),
    ([], r"no records \(empty input\)"),
    (['{"instruction": "q", "completions": [{"response": "a", "annotations": {}}, {"response": 7}]}'],
     r'pairs.jsonl:1: field "completions\[1\].response": expected a string, got int'),
    (['{"instruction": "q", "completions": [{"annotations": {}}]}'],
     r'pairs.jsonl:1: field "completions\[0\].response": missing'),
])
def test_bad_input_one_line_error_and_no_output(tmp_path, lines, message):
    src = tmp_path / "pairs.jsonl"
    src.write_text("".join(line + "\n" for line in lines))
    res, out = build(tmp_path, "--input", src)
    assert res.returncode != 0
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("metaaligner: error: ")
    import re
    assert re.search(message, err[0]), err[0]
    assert not out.exists()  # nothing half-written


def test_existing_output_dir_is_left_untouched_on_error(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "preference.jsonl").write_text("old\n")
    src = write_jsonl(tmp_path / "p.jsonl", [{"query": "q", "response_1": "a", "response_2": "b", "labels": {"x": ">"}}])
    res = run_cli("-q", "build-dataset", "--input", src, "--out", out)
    assert res.returncode != 0
    assert (out / "preference.jsonl").read_text() == "old\n"
    assert sorted(p.name for p in out.iterdir()) == ["preference.jsonl"]


def test_unknown_layout_is_a_clear_error(tmp_path):
    src = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "answer": "a"}])
    res, _ = build(tmp_path, "--input", src)
    assert res.returncode != 0 and "cannot detect the input layout" in res.stderr


# ------------------------------------------------------------------------- warm-up, hold-out, ratings

def test_warmup_is_on_by_default_a_seeded_tenth_of_the_equal_rows():
    recs = [PreferenceRecord(f"Q{i}", f"good {i}", f"draft {i}", {"honesty": "="}, i) for i in range(400)]
    rows = list(build_dynamic_dataset(recs, UF, seed=3, warmup_size="auto"))
    warm = [r for r in rows if r["subset"] == "warmup"]
    assert 20 <= len(warm) <= 60  # Binomial(400, 0.1): mean 40
    assert all(w["completion"] == f"draft {w['source_index']}" for w in warm)  # identity targets
    assert warm == [r for r in build_dynamic_dataset(recs, UF, seed=3, warmup_size="auto") if r["subset"] == "warmup"]
    few = list(build_dynamic_dataset(recs[:2], UF, seed=3, warmup_size="auto"))
    assert sum(r["subset"] == "warmup" for r in few) >= 1  # never empty when there are equal rows


def test_an_empty_requested_subset_is_a_warning(tmp_path):
    src = write_jsonl(tmp_path / "p.jsonl", [{"query": "q", "response_1": "a", "response_2": "b",
                                              "labels": {"honesty": ">"}}])
    res = run_cli("build-dataset", "--input", src, "--out", tmp_path / "o", "--warmup-size", "20", "--no-progress")
    assert res.returncode == 0, res.stderr
    assert "warm-up subset is empty although --warmup-size 20 was asked for" in res.stderr
    stats = json.loads((tmp_path / "o" / "stats.json").read_text())
    assert any("equal subset is empty" in w for w in stats["warnings"])
    assert any("warm-up subset is empty" in w for w in stats["warnings"])
    res, out = build(tmp_path, "--input", src)  # the default (auto) warns too
    assert res.returncode == 0 and "warm-up subset is empty although --warmup-size auto" in res.stderr


def _uf_record(i, ratings):
    return {"instruction": f"task {i}", "completions": [
        {"response": f"r{i}-{j}", "annotations": {k: {"Rating": v} for k, v in r.items()}}
        for j, r in enumerate(ratings)]}


def test_holdout_last_reproduces_the_authors_test_split(tmp_path):
    recs = [_uf_record(i, [{"honesty": "3", "helpfulness": "2"}, {"honesty": "5", "helpfulness": "N/A"},
                           {"honesty": "4", "helpfulness": "4"}]) for i in range(10)]
    src = write_jsonl(tmp_path / "uf.jsonl", recs)
    res, out = build(tmp_path, "--input", src, "--holdout-last", "3")
    assert res.returncode == 0, res.stderr
    held = read_jsonl(out / "holdout.jsonl")
    assert [h["query"] for h in held] == ["task 7", "task 8", "task 9"]  # train[-3:]
    # golden: the completion with the highest sum of whole-number ratings (N/A counts 0): 4+4 > 5 > 3+2
    assert [h["golden"] for h in held] == ["r7-2", "r8-2", "r9-2"]
    used = {r["source_index"] for s in ("preference", "equal") for r in read_jsonl(out / f"{s}.jsonl")}
    assert used == set(range(7))  # no held-out query leaks into training
    stats = json.loads((out / "stats.json").read_text())
    assert stats["records"] == 7 and stats["holdout_records"] == 3


def test_non_numeric_ratings_drop_the_completion_as_the_authors_do(tmp_path):
    src = write_jsonl(tmp_path / "uf.jsonl", [_uf_record(0, [
        {"honesty": "3", "helpfulness": "2"}, {"honesty": "5", "helpfulness": "N/A"}, {"honesty": "4", "helpfulness": "4"}])])
    res, out = build(tmp_path, "--input", src, "--warmup-size", "0")
    default = {(r["completion"], tuple(sorted(r["objectives"]))) for r in read_jsonl(out / "preference.jsonl")}
    assert ("r0-1", ("honesty",)) in default  # skip-aspect: r0-1 still compared on honesty
    res, out = build(tmp_path, "--input", src, "--warmup-size", "0", "--non-numeric-ratings", "drop-completion")
    assert res.returncode == 0, res.stderr
    rows = read_jsonl(out / "preference.jsonl") + read_jsonl(out / "equal.jsonl")
    assert rows and all("r0-1" not in r["prompt"] and r["completion"] != "r0-1" for r in rows)
