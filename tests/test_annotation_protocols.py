"""Protocols as data: the IMHI protocol against the paper's Appendix C.3, user protocol files
with 0-N levels, versions, and the errors of bad files."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from annotation.protocols import builtin_protocols, load_protocol, review_needed, rubric_markdown
from metaaligner_core.errors import InputError, MetaAlignerError
from metaaligner_core.objectives import builtin_objectives

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT.parent / "shared" / "reference" / "metaaligner-paper.md"


def _squash(text: str) -> str:
    return " ".join(text.split())


def _appendix_c3() -> str:
    if not PAPER.is_file():
        pytest.skip(f"{PAPER} not present (the paper's text lives outside the repository, in ../shared/reference)")
    text = PAPER.read_text(encoding="utf-8")
    start = text.index("C.3 IMHI Annotation")
    end = text.index("Algorithm 2", start)
    # the converted PDF breaks one sentence over a page ("... and 3" / "denotes ...")
    return text[start:end]


def test_imhi_protocol_is_the_papers_appendix_c3_word_for_word():
    c3 = _appendix_c3()
    lines = [ln.strip() for ln in c3.splitlines() if ln.strip()]
    proto = load_protocol("imhi")
    assert proto.keys == ["correctness", "informative", "professional"]
    by_name = {o.name: o for o in proto.objectives}

    # the aspect definitions: the paragraph after "Correctness." etc.
    for name, head in (("Correctness", "Correctness."), ("Informativeness", "Informativeness."),
                       ("Professionalism", "Professionalism.")):
        para = next(ln for ln in lines if ln.startswith(head))
        assert by_name[name].definition == para[len(head):].strip()

    # the levels: the "- N: ..." bullets in order, three blocks of four
    bullets = [re.match(r"- (\d): (.*)", ln) for ln in lines]
    levels = [(int(m.group(1)), m.group(2)) for m in bullets if m]
    assert len(levels) == 12
    ours = [(lv.score, lv.description) for o in proto.objectives for lv in o.levels]
    assert ours == levels

    # the symptom list, in order, with the criticality split where the paper puts it
    start = lines.index("Specifically, the following symptoms are checked (sorted by criticality):")
    end = next(i for i, ln in enumerate(lines) if ln.startswith("Based on the above symptoms"))
    paper_list = [ln[2:] for ln in lines[start + 1:end]]
    ref = by_name["Professionalism"].reference
    assert ref.title == lines[start]
    assert ref.after == lines[end]
    split_at = next(i for i, item in enumerate(paper_list) if item.startswith("Symptoms above are classified"))
    assert ref.split == paper_list[split_at]
    assert list(ref.items) == paper_list[:split_at] + paper_list[split_at + 1:]
    assert ref.high_criticality == split_at == 4
    assert "Uncontrollable sexual desire or sexual frigidity." in ref.items and ref.items[-1] == "Other symptoms."

    # the procedure: the two paragraphs from "The annotation protocol is developed" to the
    # sentence introducing the objectives, joined over the page break
    c3_flat = _squash(c3.replace("and 3\n\ndenotes", "and 3 denotes"))
    first = "The annotation protocol is developed"
    last = "from the following objectives:"
    paper_procedure = c3_flat[c3_flat.index(first):c3_flat.index(last) + len(last)]
    assert _squash(proto.procedure) == paper_procedure
    assert "Appendix C.3" in proto.source and "2403.17141" in proto.source
    assert proto.raters == 2  # "assigned a score by 2 domain experts ... examination of 1 domain expert"

    md = rubric_markdown(proto)
    assert md.index("3. Feeling down, depressed, or hopeless.") < md.index(ref.split) < md.index("5. Feeling tired")


def test_imhi_objective_texts_are_the_released_builtin_strings():
    proto = load_protocol("imhi")
    assert [o.text for o in proto.objectives] == [o.text for o in builtin_objectives("imhi")]
    assert proto.version and proto.version != "1"


def test_ultrafeedback_protocol_takes_the_builtin_wording():
    proto = load_protocol("ultrafeedback")
    by_key = {o.key: o for o in builtin_objectives("ultrafeedback")}
    assert proto.keys == list(by_key)
    for o in proto.objectives:
        assert o.description == by_key[o.key].description and o.text == by_key[o.key].text


def _levels(n: int) -> list[dict]:
    return [{"score": s, "label": f"L{s}", "description": f"level {s}"} for s in range(n)]


def test_user_protocol_with_its_own_aspects_scale_version_and_raters(tmp_path):
    path = tmp_path / "mentalllama.yaml"
    path.write_text(
        "name: mentalllama-eval\nversion: 3\nraters: 3\nreview: range:2\nguidelines: Rate each aspect.\n"
        "objectives:\n"
        "  - key: fluency\n    name: Fluency\n    description: the response should read fluently\n"
        "    levels:\n" + "".join(f"      - {{score: {s}, description: level {s}}}\n" for s in range(6)) +
        "  - key: overall\n    name: Overall\n    description: the response should be good overall\n"
        "    levels:\n" + "".join(f"      - {{score: {s}, label: L{s}, description: level {s}}}\n" for s in range(4)),
        encoding="utf-8")
    proto = load_protocol(path)
    assert (proto.name, proto.version, proto.raters, proto.review) == ("mentalllama-eval", "3", 3, "range:2")
    assert proto.objective("fluency").scores == (0, 1, 2, 3, 4, 5) and proto.max_score == 5
    assert proto.objective("fluency").text == "Fluency: the response should read fluently"
    assert "- **5** — level 5" in rubric_markdown(proto)
    assert review_needed("range:2", [1, 3]) and not review_needed("range:2", [1, 2])
    assert review_needed("any", [1, 2]) and not review_needed("any", [2, 2]) and not review_needed("any", [2])
    assert review_needed("all", [2, 2]) and not review_needed("none", [0, 3])


def test_protocol_file_errors_name_the_field(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("name: x\nobjectives:\n  - key: honesty\n    levels:\n"
                   "      - {score: 0, label: a, description: a}\n      - {score: 1, label: b, description: b}\n"
                   "      - {score: 2, label: c, description: c}\n      - {score: 4, label: d, description: d}\n")
    with pytest.raises(InputError, match=r'p.yaml: field "objectives\[0\].levels\[3\].score": expected an integer 0-3'):
        load_protocol(bad)
    custom = tmp_path / "c.json"
    custom.write_text(json.dumps({"name": "c", "objectives": [{"key": "warmth", "levels": _levels(4)}]}))
    with pytest.raises(InputError, match=r'objectives\[0\].description.*not a built-in objective'):
        load_protocol(custom)
    custom.write_text(json.dumps({"name": "c", "objectives": [{"key": "warmth", "name": "Warmth",
                                                               "description": "kind", "levels": _levels(1)}]}))
    with pytest.raises(InputError, match=r'objectives\[0\].levels": expected a list of 2 to 11 levels'):
        load_protocol(custom)
    custom.write_text(json.dumps({"name": "c", "review": "sometimes", "objectives": [
        {"key": "Warmth", "name": "Warmth", "description": "the response should be kind", "levels": _levels(4)}]}))
    with pytest.raises(InputError, match=r'field "review"'):
        load_protocol(custom)
    custom.write_text(json.dumps({"name": "c", "raters": 0, "objectives": [
        {"key": "Warmth", "name": "Warmth", "description": "the response should be kind", "levels": _levels(4)}]}))
    with pytest.raises(InputError, match=r'field "raters"'):
        load_protocol(custom)
    with pytest.raises(MetaAlignerError, match="neither a built-in protocol"):
        load_protocol("no-such-protocol")
    assert {"imhi", "ultrafeedback"} <= set(builtin_protocols())
