"""The tiny MetaAligner: its program checks, the data builder's labels and rows, and the shipped adapter.

Everything but the last test runs in milliseconds on texts written here; the slow test merges the
shipped adapter (``training/tiny/adapter``) into the embedded model and corrects a draft.
"""
from __future__ import annotations

import csv
import json
import random
import re
import sys
from collections import Counter
from pathlib import Path

import pytest

from conftest import ROOT, read_jsonl, write_jsonl

sys.path.insert(0, str(ROOT / "training" / "tiny"))

import build_data  # noqa: E402
import tinydata  # noqa: E402

CLEAN = ("Paris is the capital of France. It has been the country's largest city for centuries. "
         "Many visitors come to see its museums and old streets.")
LISTED = ("Here are three tips:\n1. Drink water every morning.\n2. Walk for twenty minutes a day.\n"
          "3. Sleep at least seven hours.")
SENTENCES = ["Paris is the capital of France.", "It has been the country's largest city for centuries.",
             "Many visitors come to see its museums and old streets."]
ITEMS = ["Drink water every morning.", "Walk for twenty minutes a day.", "Sleep at least seven hours."]


# ----------------------------------------------------------------------------- checks

def test_checks_pass_clean_texts():
    assert tinydata.failed(CLEAN) == []
    assert tinydata.failed(LISTED) == []
    assert tinydata.usable_draft(CLEAN)


@pytest.mark.parametrize("key, text", [
    ("repetition", CLEAN + " Paris is the capital of France."),
    ("repetition", "Paris is the capital of France. PARIS is the capital of France!"),
    ("length", CLEAN + " I hope this information is helpful to you."),
    ("politeness", "Ugh, fine. " + CLEAN),
    ("politeness", CLEAN + " Now stop wasting my time."),
    ("formatting", "Paris is the capital of France. IT HAS BEEN THE COUNTRY'S LARGEST CITY."),
    ("formatting", "Here are three tips: 1. Drink water every morning. 2. Walk for twenty minutes a day."),
])
def test_each_check_catches_its_own_fault_only(key, text):
    assert tinydata.failed(text) == [key]


def test_short_repeated_phrases_and_acronyms_are_not_faults():
    assert tinydata.check_repetition("Yes. Yes. I agree with you here.")   # under four words
    assert tinydata.check_formatting("The USA and the UK signed it.")     # two capitals words, not a run
    assert tinydata.check_formatting("It costs 2.5 dollars. It is cheap.")


# ----------------------------------------------------------------------------- degradations

@pytest.mark.parametrize("key", tinydata.KEYS)
def test_degradations_break_one_objective_and_keep_the_words(key):
    for seed in range(20):
        rng = random.Random(seed)
        bad = tinydata.degrade(CLEAN, [key], rng)
        assert bad is not None and tinydata.failed(bad) == [key]
        words_in = " ".join(CLEAN.split()).lower()
        if key == "repetition":  # one or two sentences twice, nothing else new
            counts = [bad.count(s) for s in SENTENCES]
            assert sorted(counts)[-1] == 2 and sum(counts) in (4, 5)
        elif key == "formatting":
            assert " ".join(bad.split()).lower() == words_in  # only the case changed
        else:  # the clean words survive in order, padding/rudeness added around them
            added = [f for f in (tinydata.FILLERS if key == "length" else
                                 tinydata.RUDE_OPENERS + tinydata.RUDE_CLOSERS) if f in bad]
            stripped = bad
            for f in added:
                stripped = stripped.replace(f, " ")
            assert added and " ".join(stripped.split()) == " ".join(CLEAN.split())


def test_flattened_list_is_a_formatting_fault():
    flat = "Here are three tips: 1. Drink water every morning. 2. Walk for twenty minutes a day. 3. Sleep at least seven hours."
    seen_flat = any(tinydata.degrade(LISTED, ["formatting"], random.Random(s)) == flat for s in range(20))
    assert seen_flat


def test_degrade_is_seeded():
    a = [tinydata.degrade(CLEAN, [k], random.Random(7)) for k in tinydata.KEYS]
    b = [tinydata.degrade(CLEAN, [k], random.Random(7)) for k in tinydata.KEYS]
    assert a == b


# ----------------------------------------------------------------------------- records and Algorithm 1

def _records(n=30, seed=3):
    drafts = [(f"Question number {i}?", CLEAN if i % 2 else LISTED) for i in range(n)]
    return drafts, tinydata.make_records(drafts, seed=seed, p_two=0.5, p_clean=0.5)


def _shouts(text: str) -> bool:
    w = [x.strip(".,:;!?") for x in text.split()]
    return any(all(len(x) > 1 and x.isupper() for x in w[i:i + 4]) for i in range(len(w) - 3))


def _gained(r1: str, r2: str) -> set[str]:
    """The objectives whose fault ``r2`` has and ``r1`` has not, found by counting the inserted
    strings (independent of the checks). A degradation applied after another may repeat the
    sentence the first one added."""
    said = SENTENCES + ITEMS + list(tinydata.FILLERS + tinydata.RUDE_OPENERS + tinydata.RUDE_CLOSERS)
    # a filler may land between the two sentences of a rude opener: count the sentences
    rude = [piece for f in tinydata.RUDE_OPENERS + tinydata.RUDE_CLOSERS for piece in re.split(r"(?<=[.?!])\s+", f)]
    gained = {
        "repetition": max(r2.lower().count(s.lower()) for s in said) > max(r1.lower().count(s.lower()) for s in said),
        "length": sum(f.lower() in r2.lower() for f in tinydata.FILLERS) > sum(f.lower() in r1.lower() for f in tinydata.FILLERS),
        "politeness": sum(f.lower() in r2.lower() for f in rude) > sum(f.lower() in r1.lower() for f in rude),
        "formatting": (_shouts(r2) and not _shouts(r1)) or r2.count("\n") < r1.count("\n"),
    }
    return {k for k, v in gained.items() if v}


def test_record_labels_name_only_what_was_broken():
    drafts, records = _records()
    assert len(records) > len(drafts)
    kinds = set()
    for r in records:
        r1, r2, labels = r["response_1"], r["response_2"], r["labels"]
        assert labels and set(labels) <= set(tinydata.KEYS)
        if r1 == r2:
            kinds.add("clean")
            assert set(labels.values()) == {"="}
            continue
        # A degraded pair is labelled on its broken objectives alone, each ">": no "=" label whose
        # equal row would copy the fault's repair into other objectives' rows.
        assert labels == {k: ">" for k in _gained(r1, r2)}
        kinds.add("two faults" if len(labels) == 2 else "one fault")
    assert kinds == {"clean", "one fault", "two faults"}


def test_algorithm_1_rows_never_repair_an_unasked_fault(tmp_path):
    from metaaligner_core.dataset import build_dataset_files
    from metaaligner_core.objectives import parse_objectives

    _, records = _records()
    src = write_jsonl(tmp_path / "pairs.jsonl", records)
    objectives = parse_objectives("@" + str(ROOT / "training" / "tiny" / "objectives.txt"))
    assert [o.text for o in objectives] == list(tinydata.OBJECTIVES.values())
    build_dataset_files([str(src)], tmp_path / "ds", source="generic", objectives=objectives, warmup_size=5, seed=0)
    pref, equal, warm = (read_jsonl(tmp_path / "ds" / f"{s}.jsonl") for s in ("preference", "equal", "warmup"))
    assert len(pref) == sum(1 for r in records if r["response_1"] != r["response_2"])
    assert len(equal) == sum(1 for r in records if r["response_1"] == r["response_2"]) and len(warm) == 5
    for row in pref:
        rec = records[row["source_index"]]
        assert sorted(row["objectives"]) == sorted(_gained(rec["response_1"], rec["response_2"]))
        assert row["completion"] == rec["response_1"] and "| Answer: " + rec["response_2"] + " | Edit: " in row["prompt"]
        assert "improve it" in row["prompt"]
    for row in equal + warm:  # every equal and warm-up row's target is the answer in its prompt
        assert "make it equal" in row["prompt"]
        assert "| Answer: " + row["completion"] + " | Edit: " in row["prompt"]


def test_direct_examples_ask_for_objectives_the_draft_meets():
    drafts = [(f"Question number {i}?", CLEAN if i % 2 else LISTED) for i in range(200)]
    examples = tinydata.direct_examples(drafts, seed=5, p_second_keep=0.5, p_fix_with_met=0.5, p_leave_unasked=0.5)
    by_kind = {}
    for e in examples:
        by_kind.setdefault(e["kind"], []).append(e)
        faults = _gained(e["target"] if e["kind"] == "fix_with_met" else
                         (CLEAN if CLEAN.split()[0] in e["draft"] else LISTED), e["draft"])
        asked = set(e["objectives"])
        if e["kind"] == "keep":
            assert e["target"] == e["draft"] in (CLEAN, LISTED) and not faults and 1 <= len(asked) <= 2
        elif e["kind"] == "fix_with_met":
            assert len(faults) == 1 and faults < asked and len(asked) == 2 and e["target"] in (CLEAN, LISTED)
        else:
            assert e["kind"] == "leave_unasked" and len(faults) == 1 and not faults & asked
            assert e["target"] == e["draft"]
    assert sorted(by_kind) == ["fix_with_met", "keep", "leave_unasked"]
    # most rows ask for an objective the draft already meets
    assert len(by_kind["keep"]) > len(by_kind["fix_with_met"]) + len(by_kind["leave_unasked"])


def test_cut_keep_rows_end_where_a_token_limit_cut_the_draft():
    drafts = [(f"Question number {i}?", CLEAN if i % 2 else LISTED) for i in range(200)]
    plain = tinydata.direct_examples(drafts, seed=3)
    with_cut = tinydata.direct_examples(drafts, seed=3, p_cut_keep=0.5)
    assert not any(e["kind"] == "keep_cut" for e in plain)
    cut = [e for e in with_cut if e["kind"] == "keep_cut"]
    assert 60 <= len(cut) <= 140  # about half of 200 drafts (a cut that breaks a check is skipped)
    mid_word = 0
    for e in cut:
        source = CLEAN if e["draft"][:12] == CLEAN[:12] else LISTED
        assert e["target"] == e["draft"] and source.startswith(e["draft"]), e["draft"]
        assert len(source) * 2 // 3 <= len(e["draft"]) < len(source) and e["draft"][-1] not in ".!?:"
        assert not tinydata.failed(e["draft"]) and 1 <= len(e["objectives"]) <= 2
        mid_word += source[len(e["draft"])].isalnum()
    assert 0 < mid_word < len(cut)  # some cut inside a word, some at a space
    assert with_cut[0] == plain[0]  # the same seed draws the same first draft's rows
    assert tinydata.cut_draft("ab", random.Random(0)) is None  # no room for a cut
    for bad in ("--cut-keep=1.5", "--second-keep=-0.1"):
        with pytest.raises(SystemExit):
            build_data.main(["--out", "unused", bad])


def _subsequence(small: list[str], big: list[str]) -> bool:
    it = iter(big)
    return all(w in it for w in small)


def test_layout_rows_keep_every_word_in_order_and_repeat_an_option():
    drafts = [(f"Question number {i}?", CLEAN if i % 2 else LISTED) for i in range(200)]
    plain = tinydata.direct_examples(drafts, seed=3)
    with_layout = tinydata.direct_examples(drafts, seed=3, p_layout=0.5)
    assert not any(e["kind"].endswith("_layout") for e in plain) and with_layout[0] == plain[0]
    keep = [e for e in with_layout if e["kind"] == "keep_layout"]
    fix = [e for e in with_layout if e["kind"] == "fix_layout"]
    assert 60 <= len(keep) <= 140 and 0 < len(fix) < len(keep)
    shapes = Counter()
    for e in keep:
        source = CLEAN if "Paris" in e["draft"] else LISTED
        assert e["target"] == e["draft"] != source and not tinydata.failed(e["draft"])
        assert _subsequence(source.split(), e["draft"].split()), e["draft"]  # nothing dropped or reordered
        lines = e["draft"].splitlines()
        options = [ln for ln in lines if re.match(r"(?:[A-E][.)]|\([a-e]\)) ", ln)]
        if options:  # the answer line repeats one option
            shapes["options"] += 1
            answer = next(ln for ln in lines if ln.startswith(("Answer: ", "The answer is: ", "Correct answer: ")))
            assert answer.split(": ", 1)[1] in options
        else:
            shapes["label"] += 1
    assert shapes["options"] > 10 and shapes["label"] > 10
    for e in fix:
        assert len(_gained(e["target"], e["draft"])) == 1 and e["objectives"] == sorted(_gained(e["target"], e["draft"]))
        assert not tinydata.failed(e["target"])
    short = [tinydata.relayout("One short line.", random.Random(i)) for i in range(20)]  # no options, no tail
    assert all(t.endswith("One short line.") and t.split(":")[0] + ": " in tinydata._LEAD_LABELS
               for t in short if t is not None) and sum(t is not None for t in short) > 10


def test_weights_break_some_objectives_more_often():
    drafts = [(f"Question number {i}?", CLEAN) for i in range(400)]
    weights = {"length": 6.0, "formatting": 0.0}
    broken = Counter(k for r in tinydata.make_records(drafts, seed=2, p_two=0.0, p_clean=0.0, weights=weights)
                     for k in r["labels"])
    # one fault a record: P(length) = 6 / (6 + 1 + 1 + 0) = 0.75, P(formatting) = 0
    assert broken["formatting"] == 0 and 0.65 < broken["length"] / sum(broken.values()) < 0.85
    fixes = Counter(tuple(set(e["objectives"]) & set(_gained(CLEAN, e["draft"])))
                    for e in tinydata.direct_examples(drafts, seed=2, p_fix_with_met=1.0, p_leave_unasked=0.0,
                                                      weights=weights) if e["kind"] == "fix_with_met")
    assert ("formatting",) not in fixes and fixes[("length",)] / sum(fixes.values()) > 0.65
    nothing = {k: 0.0 for k in tinydata.KEYS}  # no objective may be broken: no degraded pair, no fix row
    assert tinydata.make_records(drafts[:20], seed=2, p_two=0.5, p_clean=0.0, weights=nothing) == []
    assert {e["kind"] for e in tinydata.direct_examples(drafts[:20], seed=2, p_fix_with_met=1.0,
                                                         weights=nothing)} <= {"keep", "leave_unasked"}
    uniform = Counter(k for r in tinydata.make_records(drafts, seed=2, p_two=0.0, p_clean=0.0) for k in r["labels"])
    assert all(0.15 < uniform[k] / sum(uniform.values()) < 0.35 for k in tinydata.KEYS)


def test_weights_option_rejects_unknown_objectives_and_bad_numbers():
    assert build_data.parse_weights("length=2, formatting=0.5") == {"length": 2.0, "formatting": 0.5}
    for bad, said in (("tone=2", "'tone' is not one of"), ("length=x", "expected KEY=NUMBER"),
                      ("length=-1", "cannot be negative")):
        with pytest.raises(Exception, match=said):
            build_data.parse_weights(bad)


def test_apology_openers_are_capped_in_order():
    train = [("q", f"I apologize, but no {i}.", "s") if i % 2 else ("q", f"Plain answer {i}.", "s") for i in range(100)]
    kept = build_data.cap_apologies(train, 0.2)
    apologies = [t for t in kept if t[1].startswith("I apologize")]
    assert len(kept) - len(apologies) == 50 and len(apologies) == int(0.2 * 50 / 0.8)
    assert kept == [t for t in train if t in kept]  # order kept
    assert build_data.cap_apologies(train, 1.0) == train


def test_failure_kinds_name_what_went_wrong():
    import failure_kinds

    filler = tinydata.FILLERS[0]
    padded = CLEAN + " " + filler
    one, two, three = SENTENCES
    cases = {
        "loop": ("clean", "repetition", CLEAN, CLEAN + " " + one * 5, True),
        "fault left": ("repair", "length", padded, padded, False),
        "stopped early": ("clean", "length", CLEAN, one + " " + two, False),
        "dropped": ("clean", "length", CLEAN, one + " " + three, False),
        "added": ("repair", "length", padded, "I'm sorry, but " + CLEAN, False),
        "rewrote": ("clean", "formatting", CLEAN, "Paris is France's capital. " + two + " " + three, False),
    }
    for want, (kind, objective, draft, out, hit) in cases.items():
        assert failure_kinds.failure_kind(kind, objective, draft, CLEAN, out, hit) == want, want
    assert set(cases) == set(failure_kinds.KINDS)


# ----------------------------------------------------------------------------- the builder's split

def _write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def test_builder_trains_on_gpt_and_claude_and_holds_out_the_others(tmp_path):
    data = tmp_path / "data"
    po = data / "policy-outputs"
    for rel in ("hh-rlhf/Claude-3.csv", "hh-rlhf/gpt-3.5-turbo.csv", "ultrafeedback/gpt-3.5-turbo.csv"):
        _write_csv(po / rel, [{"query": f"train {rel} {i}", "goldens": "", "generated_text": CLEAN} for i in range(3)]
                   + [{"query": "too short", "goldens": "", "generated_text": "Fine."},
                      {"query": "rude", "goldens": "", "generated_text": CLEAN + " Whatever."}])
    _write_csv(po / "ultrafeedback/Vicuna-7B.csv", [{"query": "held vicuna", "goldens": "", "generated_text": CLEAN}])
    for model in ("llama2-chat-7B", "Mentallama-7B", "Gemma_instruct_7B"):
        _write_csv(po / "imhi" / model / "DR.csv", [{"goldens": "", "generated_text": CLEAN}] * 2)
    _write_csv(data / "imhi-queries" / "DR.csv", [{"query": "post one", "gpt-3.5-turbo": ""},
                                                  {"query": "post two", "gpt-3.5-turbo": ""}])
    out = tmp_path / "out"
    assert build_data.main(["--data", str(data), "--out", str(out), "--seed", "1"]) == 0
    pairs, held = read_jsonl(out / "pairs.jsonl"), read_jsonl(out / "heldout.jsonl")
    assert pairs and {p["query"].split()[0] for p in pairs} == {"train"}
    assert len({p["query"] for p in pairs}) == 9  # 3 usable drafts from each training file
    assert sorted(h["model"] for h in held) == sorted(["Vicuna-7B"] + ["llama2-chat-7B", "Mentallama-7B",
                                                                         "Gemma_instruct_7B"] * 2)
    assert {h["query"] for h in held if h["model"] != "Vicuna-7B"} == {"post one", "post two"}
    stats = json.loads((out / "stats.json").read_text())
    assert stats["train_drafts"] == 9 and stats["heldout_drafts"] == 7
    # the training folder: Algorithm 1's rows and the direct rows, prompts exactly as inference builds them
    from metaaligner_core.objectives import Objective
    from metaaligner_core.templates import build_prompt

    pref = read_jsonl(out / "dataset" / "preference.jsonl")
    direct = [r for r in pref if "kind" in r]
    assert len(pref) - len(direct) == sum(1 for p in pairs if p["response_1"] != p["response_2"])
    assert {r["kind"] for r in direct} >= {"keep"}
    for r in direct:
        objs = [Objective.parse(tinydata.OBJECTIVES[k]) for k in r["objectives"]]
        answer = r["prompt"].split("| Answer: ", 1)[1].rsplit(" | Edit: ", 1)[0]
        query = r["prompt"].split("| Query: ", 1)[1].split(" | Answer: ", 1)[0]
        assert r["prompt"] == build_prompt("ultrafeedback", query, answer, objs)
    assert json.loads((out / "dataset" / "stats.json").read_text())["rows"]["preference"] == len(pref)


def test_builder_adds_imhi_references_and_leaves_out_excluded_queries(tmp_path, capsys):
    data = tmp_path / "data"
    po = data / "policy-outputs"
    for rel in ("hh-rlhf/Claude-3.csv", "hh-rlhf/gpt-3.5-turbo.csv", "ultrafeedback/gpt-3.5-turbo.csv"):
        _write_csv(po / rel, [{"query": f"train {rel} {i}", "goldens": "", "generated_text": CLEAN} for i in range(2)])
    _write_csv(data / "imhi-queries" / "DR.csv", [{"query": f"post {i}", "gpt-3.5-turbo": LISTED} for i in range(4)]
               + [{"query": "post short", "gpt-3.5-turbo": "Too short."}])
    exclude = write_jsonl(tmp_path / "bench-queries.jsonl",
                          [{"query": "post 1"}, {"query": "train hh-rlhf/Claude-3.csv 0"}])
    out = tmp_path / "out"
    base = ["--data", str(data), "--seed", "1", "--skip-heldout"]
    assert build_data.main(base + ["--out", str(out)]) == 0
    assert {p["query"] for p in read_jsonl(out / "pairs.jsonl")} == {f"train {r} {i}" for r in (
        "hh-rlhf/Claude-3.csv", "hh-rlhf/gpt-3.5-turbo.csv", "ultrafeedback/gpt-3.5-turbo.csv") for i in range(2)}
    assert build_data.main(base + ["--out", str(out), "--imhi-references", "--exclude-queries", str(exclude)]) == 0
    stats = json.loads((out / "stats.json").read_text())
    queries = {p["query"] for p in read_jsonl(out / "pairs.jsonl")}
    assert {q for q in queries if q.startswith("post")} == {"post 0", "post 2", "post 3"}
    assert "post 1" not in queries and "train hh-rlhf/Claude-3.csv 0" not in queries
    assert stats["train_drafts"] == 8 and stats["excluded_by_query"] == 2
    assert stats["train_by_source"]["imhi-references/DR"] == 3
    capsys.readouterr()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "post 1"}\n{"q": 1}\n')
    with pytest.raises(SystemExit, match=r"bad\.jsonl:2: query"):
        build_data.main(base + ["--out", str(tmp_path / "o2"), "--exclude-queries", str(bad)])
    assert not (tmp_path / "o2").exists()


def test_builder_without_data_folder_fails_clearly(tmp_path, capsys):
    assert build_data.main(["--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "no policy-outputs folder" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_short_rows_are_a_drafts_first_sentences_kept_or_fixed_back():
    longer = CLEAN + " The river Seine runs through its centre."
    drafts = [(f"Question number {i}?", longer if i % 2 else LISTED) for i in range(200)]
    plain = tinydata.direct_examples(drafts, seed=3)
    with_short = tinydata.direct_examples(drafts, seed=3, p_short=0.5)
    assert not any(e["kind"].endswith("_short") for e in plain) and with_short[0] == plain[0]
    keep = [e for e in with_short if e["kind"] == "keep_short"]
    fix = [e for e in with_short if e["kind"] == "fix_short"]
    firsts = {" ".join(SENTENCES[:2]), " ".join(SENTENCES)}  # its first two or three sentences, nothing else
    assert 30 <= len(keep) <= 70 and {e["target"] for e in keep} == firsts
    assert all(e["draft"] == e["target"] and e["query"] != drafts[0][0] for e in keep)
    assert 0.8 * len(keep) <= len(fix) <= len(keep)
    for e in fix:  # one fault added, asked first, fixed back to the short draft
        assert e["target"] in firsts and _gained(e["target"], e["draft"]) == {e["objectives"][0]}, e
        assert not tinydata.failed(e["target"]) and len(e["objectives"]) in (1, 2)
    headed = "## Paris\n\n" + longer
    assert all(tinydata.short_draft(headed, random.Random(i)) is None for i in range(5))  # its heading would be lost
    numbered = "\n".join(f"{i}. {s}" for i, s in enumerate(SENTENCES + ["The river runs through it."], 1))
    assert all(tinydata.short_draft(numbered, random.Random(i)) is None for i in range(5))  # and its list markers
    assert tinydata.short_draft(" ".join(SENTENCES[:2]), random.Random(0)) is None  # nothing left to drop


def test_parallel_rows_open_each_first_sentence_alike_and_keep_the_rest():
    longer = CLEAN + " It is also known for its food."
    drafts = [(f"Question number {i}?", longer) for i in range(100)]
    rows = tinydata.direct_examples(drafts, seed=5, p_parallel=1.0)
    keep = [e for e in rows if e["kind"] == "keep_parallel"]
    fix = [e for e in rows if e["kind"] == "fix_parallel"]
    assert len(keep) == 100 and 80 <= len(fix) <= 100  # every sentence opens with a word it can follow
    openers = Counter()
    for e in keep:
        opener = next(o for o in tinydata._PARALLEL_OPENERS if e["draft"].startswith(o))
        openers[opener] += 1
        parts = [ln for ln in e["draft"].split("\n") if ln]
        lined = [p for p in parts if p.startswith(opener)]
        assert 3 <= len(lined) <= 4 and sum(p.count(opener) for p in parts) == len(lined)
        # after the opener each sentence is the draft's own, "Paris" keeps its capital, "It"/"Many" do not
        assert lined[0] == opener + SENTENCES[0] and lined[1] == opener + "it" + SENTENCES[1][2:]
        assert lined[2] == opener + "many" + SENTENCES[2][4:]
        assert " ".join(p.removeprefix(opener) for p in parts).lower().split() == longer.lower().split()
        assert e["target"] == e["draft"] and not tinydata.failed(e["draft"])
    assert len(openers) >= 4
    for e in fix:
        assert e["target"] in {k["draft"] for k in keep} and len(tinydata.failed(e["draft"])) == 1
        assert tinydata.failed(e["draft"])[0] == e["objectives"][0]
    reply = "Yes, that is a fair question. " + " ".join(SENTENCES)  # "Note that yes, ..." does not read
    assert all(tinydata.parallel_draft(reply, random.Random(i)) is None for i in range(5))
    assert all(tinydata.parallel_draft(" ".join(SENTENCES[:2]), random.Random(i)) is None for i in range(5))


def test_first_rows_restate_the_first_sentence_and_fix_it_when_repetition_is_asked():
    longer = CLEAN + " It is also known for its food."
    rows = tinydata.direct_examples([(f"Question number {i}?", longer) for i in range(200)], seed=2, p_first=0.5)
    first = [e for e in rows if e["kind"] == "fix_first"]
    assert 70 <= len(first) <= 130
    where = Counter()
    for e in first:
        assert e["target"] in (longer, " ".join(SENTENCES[:2]), " ".join(SENTENCES)) and e["objectives"][0] == "repetition"
        # the draft is the target with its first sentence once more: right after itself, or at the end
        d, s0 = e["draft"], SENTENCES[0]
        second = d.rindex(s0)
        assert d.count(s0) == 2 and (d[:second] + d[second + len(s0):]).split() == e["target"].split()
        where["end" if d.rstrip().endswith(s0) else "after"] += 1
        assert tinydata.failed(e["draft"]) == ["repetition"] and not tinydata.failed(e["target"])
    assert where["after"] > 20 and where["end"] > 20 and len({e["target"] for e in first}) == 3
    assert tinydata.repeat_first("Hi there. " + CLEAN, random.Random(0)) is None  # a first sentence under four words


# ----------------------------------------------------------------------------- the shipped adapter

@pytest.fixture(scope="module")
def merged_dir(tmp_path_factory, embedded_dir):
    """The shipped adapter merged into a fresh cache (the base model linked from the shared one)."""
    from metaaligner_core import embedded

    assert embedded.has_tiny_adapter(), "training/tiny/adapter is missing"
    cache = tmp_path_factory.mktemp("cache")
    (cache / embedded.CACHE_NAME).symlink_to(embedded_dir)
    mp = pytest.MonkeyPatch()
    mp.setenv("METAALIGNER_CACHE", str(cache))
    try:
        merged = embedded.default_aligner_dir()
        assert merged.parent == cache and (merged / "model.safetensors").is_file()
        assert embedded.default_aligner_dir() == merged  # cached: the second call does not merge again
        yield merged
    finally:
        mp.undo()


@pytest.mark.slow
def test_shipped_adapter_is_small_and_merges_exactly(merged_dir, embedded_dir):
    from safetensors.torch import load_file

    from metaaligner_core import embedded

    adapter = embedded.tiny_adapter_dir()
    assert (adapter / "adapter_model.safetensors").stat().st_size < 25 * 10 ** 6
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    lora = load_file(str(adapter / "adapter_model.safetensors"))
    base, merged = load_file(str(embedded_dir / "model.safetensors")), load_file(str(merged_dir / "model.safetensors"))
    scale = cfg["lora_alpha"] / cfg["r"]
    a_keys = sorted(k for k in lora if k.endswith("lora_A.weight"))
    assert len(a_keys) == 7 * 30  # every linear matrix of all 30 layers
    for key in a_keys:  # W_merged = W_base + scale * B @ A, computed here without PEFT
        name = key.replace("base_model.model.", "").replace(".lora_A.weight", ".weight")
        want = base[name].float() + scale * lora[key.replace("lora_A", "lora_B")].float() @ lora[key].float()
        assert (merged[name] - want).abs().max() < 1e-4, name
        assert (merged[name] - base[name]).abs().max() > 1e-4, name  # the adapter changes every matrix it targets
    untouched = [k for k in base if k not in {k2.replace("base_model.model.", "").replace(".lora_A.weight", ".weight")
                                              for k2 in a_keys}]
    assert untouched and all(bool((merged[k] == base[k]).all()) for k in untouched)


@pytest.mark.slow
def test_tiny_model_string_is_the_merged_aligner(merged_dir):
    from metaaligner_core.models import is_default, parse_model, resolve_pretrained

    assert resolve_pretrained("tiny") == (str(merged_dir), {})
    assert resolve_pretrained(" tiny ") == (str(merged_dir), {})
    assert not parse_model("tiny").is_api and not is_default("tiny")


@pytest.mark.slow
def test_shipped_adapter_leaves_a_clean_draft_unchanged(merged_dir):
    from metaaligner_core.inference import Aligner

    clean = ("Drinking water helps the body stay healthy. Most adults need about two liters a day, "
             "more if you exercise.")
    aligner = Aligner.load(str(merged_dir), template="ultrafeedback")
    out = aligner.align("How much water should I drink?", clean, [tinydata.OBJECTIVES["repetition"]],
                        max_new_tokens=64)
    assert out.split() == clean.split(), out


# The shipped adapter repairs 74% of repeated sentences on held-out drafts (training/tiny/README.md: measured
# figures); on this short draft it returns the draft unchanged. Strict: a better adapter that passes turns this red, so the
# marker is removed together with the claim in the README.
@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="the shipped CPU-trained adapter does not yet repair this draft faithfully")
def test_shipped_adapter_removes_a_repeated_sentence(merged_dir):
    from metaaligner_core.inference import Aligner

    draft = ("Drinking water helps the body stay healthy. Drinking water helps the body stay healthy. "
             "Most adults need about two liters a day.")
    want = "Drinking water helps the body stay healthy. Most adults need about two liters a day."
    aligner = Aligner.load(str(merged_dir), template="ultrafeedback")
    out = aligner.align("How much water should I drink?", draft, [tinydata.OBJECTIVES["repetition"]],
                        max_new_tokens=64)
    assert tinydata.check_repetition(out) and tinydata.word_ratio(out, want, ignore_case=True) >= 0.9, out


def test_benchmark_budget_never_cuts_a_faithful_copy():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_tiny_aligner", ROOT / "bench" / "bench_tiny_aligner.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.batch_budget(100, 320) == 154        # 1.3 x 100 + 24
    assert bench.batch_budget(250, 320) == 320        # the cap, above the draft + 24
    assert bench.batch_budget(337, 320) == 361        # a longer draft: room for a copy and 24 more
    assert bench.batch_budget(337, 2000) == 462
