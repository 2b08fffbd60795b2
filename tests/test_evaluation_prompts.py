"""Judge prompts against the reference texts: the paper (Appendix C.1, E.1) and the authors'
script strings (``../shared/reference``). Where the reference files are absent the comparison
tests skip and say so; they never pass without comparing.
"""
from __future__ import annotations

import json
import re

import pytest

from conftest import ROOT
from metaaligner_core.evaluation import prompts
from metaaligner_core.evaluation.prompts import judge_prompt, pairwise_prompt, score_prompt
from metaaligner_core.errors import MetaAlignerError
from metaaligner_core.objectives import lookup

REFERENCE = ROOT.parent / "shared" / "reference"
OFFICIAL, PAPER = REFERENCE / "official-prompts.md", REFERENCE / "metaaligner-paper.md"
# sentinel values, so that both sides are filled the same way whatever their placeholder names
Q, R1, R2, A = "<<QUERY>>", "<<R1>>", "<<R2>>", "<<ASPECT>>"


def _read(path):
    if not path.is_file():
        pytest.skip(f"reference text {path} not found (it sits beside the checkout in CI); prompt not compared")
    return path.read_text(encoding="utf-8")


def _section_blocks(text: str, heading: str) -> list[str]:
    start = text.index(heading)
    end = text.find("\n## ", start + 1)
    return re.findall(r"```\n(.*?)\n```", text[start:end if end > 0 else None], re.S)


def _fill(template: str, mapping: dict[str, str]) -> str:
    for k, v in mapping.items():
        template = template.replace(k, v)
    return template


def _ours(kind: str, name: str) -> str:
    jp = prompts.VARIANTS[(kind, name)]
    return jp.fill(Q, A, response=R1, response_1=R1, response_2=R2)


def test_imhi_judge_is_the_authors_script_word_for_word_typos_kept():
    text = _read(OFFICIAL)
    block = _section_blocks(text, "## evaluation/IMHI_GPT4_score.py")[0]
    reference = _fill(json.loads(block), {"{query}": Q, "{output1}": R1, "{output2}": R2, "{aspects}": A})
    assert _ours("pairwise", "imhi") == reference
    system = re.search(r'System message: "(.*)"', text).group(1)
    assert prompts.VARIANTS[("pairwise", "imhi")].system == system
    assert "query.QUERY" in reference and "in the two response," in reference  # the kept typos


def test_pairwise_script_variant_is_the_authors_hh_rlhf_and_ultrafeedback_string():
    # The string is transcribed, with the scripts' commits, in docs/authors-scripts.md (the shared
    # reference file has no section on these two scripts).
    heading = "## evaluation/HH-RLHF_GPT4_score.py and evaluation/UltraFeedback_GPT4_score.py"
    text = (ROOT / "docs" / "authors-scripts.md").read_text(encoding="utf-8")
    assert heading in text
    block = _section_blocks(text, heading)[0]
    reference = _fill(json.loads(block), {"{query}": Q, "{output1}": R1, "{output2}": R2, "{aspects}": A})
    assert _ours("pairwise", "script") == reference
    assert prompts.VARIANTS[("pairwise", "script")].system is None
    assert not reference.startswith("You are a skilled evaluator")  # unlike Appendix C.1
    assert judge_prompt("pairwise", "script").name == "script"


def test_score_script_variant_is_the_authors_string_word_for_word():
    block = _section_blocks(_read(OFFICIAL), "## evaluation/UltraFeedback_GPT4_rate.py")[0]
    reference = _fill(json.loads(block), {"{query}": Q, "{output}": R1, "{aspects}": A})
    assert _ours("score", "script") == reference
    assert prompts.VARIANTS[("score", "script")].system is None


def test_score_prompt_is_appendix_e1_word_for_word():
    # official-prompts.md quotes Appendix E.1 with {q}, {a}, {<r>} ...
    block = _section_blocks(_read(OFFICIAL), "## evaluation/UltraFeedback_GPT4_rate.py")[1]
    assert _ours("score", "paper") == _fill(block, {"{q}": Q, "{a}": R1, "{<r>}": A})
    # ... and so does the paper itself (LaTeX placeholders)
    line = next(ln for ln in _read(PAPER).splitlines() if r"$[S(q, a, \langle r \rangle)]$" in ln)
    paper = line.split("$[S(q, a, \\langle r \\rangle)]$", 1)[1].strip()
    assert _ours("score", "paper") == _fill(paper, {"{q}": Q, "{a}": R1, r"$\{\langle r \rangle\}$": A})


def test_pairwise_prompt_is_appendix_c1_word_for_word():
    line = next(ln for ln in _read(PAPER).splitlines() if r"$[\mathcal{E}(q, r_1, r_2, \langle r \rangle)]$" in ln)
    paper = line.split(r"$[\mathcal{E}(q, r_1, r_2, \langle r \rangle)]$", 1)[1].strip()
    expected = _fill(paper, {"{q}": Q, "{ r_1 }": R1, "{ r_2 }": R2, r"{ $\langle r \rangle$ }": A})
    assert _ours("pairwise", "paper") == expected


def test_prompts_fill_user_text_verbatim_and_pick_the_variant():
    honesty = lookup("honesty")
    p = pairwise_prompt("Q {aspect}?", "first {x}", "second", honesty)
    assert "QUERY: Q {aspect}? | RESPONSE 1: first {x} | RESPONSE 2: second. Consider the following aspect: " \
           "Honesty: the response should not tell lies, then" in p
    s = score_prompt("Q?", "an answer", honesty)
    assert "QUERY: Q? | RESPONSE: an answer Assign a score" in s
    assert judge_prompt("pairwise", "auto", "imhi").name == "imhi"
    assert judge_prompt("pairwise", None, "hh-rlhf").name == "paper"
    assert judge_prompt("score", "auto", "imhi").name == "paper"  # the authors have no IMHI score prompt
    with pytest.raises(MetaAlignerError, match=r'--judge-prompt "imhi" does not exist in score mode'):
        judge_prompt("score", "imhi")
