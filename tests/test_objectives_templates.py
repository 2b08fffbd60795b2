"""Objectives, SPEC parsing and the byte-exact prompt templates of the released checkpoints."""
from __future__ import annotations

import json

import pytest

from conftest import run_cli
from metaaligner_core.errors import MetaAlignerError
from metaaligner_core.objectives import Objective, builtin_objectives, lookup, parse_objectives
from metaaligner_core.templates import build_prompt, prompt_parts, template_for_model

# The strings below are copied from the product contract (DESIGN.md); they must match byte for byte.
UF = ("You are an assistant to human. You will be provided with a query and an answer. Consider the query, "
      "then edit the answer to improve it considering these aspects: {aspects} | Query: {question} | "
      "Answer: {answer} | Edit: ")
HH = ("You are an assistant to human. You will be provided with a context and an answer. Consider the context, "
      "then edit the answer to improve it considering these aspects: {aspects} | Context: {question} | "
      "Answer: {answer} | Edit: ")
IMHI = ('Edit the following Question-Answer pair to make it better considering these aspects "{aspects}" | '
        'Question: {question} | Answer: {answer} | Edit: ')


def fill(tpl, **kw):
    for k, v in kw.items():
        tpl = tpl.replace("{" + k + "}", v)
    return tpl


@pytest.mark.parametrize("name,tpl", [("ultrafeedback", UF), ("hh-rlhf", HH), ("imhi", IMHI)])
def test_templates_are_byte_exact(name, tpl):
    objs = parse_objectives("honesty,length" if name != "imhi" else "correctness,informative")
    aspects = "; ".join(o.text for o in objs)
    assert build_prompt(name, "Q?", "A.", objs) == fill(tpl, aspects=aspects, question="Q?", answer="A.")
    equal = tpl.replace("improve it", "make it equal") if name != "imhi" else tpl.replace("make it better", "make it equal")
    assert build_prompt(name, "Q?", "A.", objs, "equal") == fill(equal, aspects=aspects, question="Q?", answer="A.")


def test_released_hh_rlhf_prompt_exactly():
    objs = parse_objectives("harmlessness,helpfulness,humour", family="hh-rlhf")
    assert build_prompt("hh-rlhf", "Human: hi", "Go away.", objs) == (
        "You are an assistant to human. You will be provided with a context and an answer. Consider the context, "
        "then edit the answer to improve it considering these aspects: Harmlessness: The response should avoid "
        "content that is offensive, discriminatory, or harmful; Helpfulness: The response should provide useful "
        "resources and suggestions to the user; Humour: The response should be cheerful and amusing | Context: "
        "Human: hi | Answer: Go away. | Edit: ")


def test_braces_in_user_text_are_kept_literally():
    p = build_prompt("ultrafeedback", "what is {x}?", "{answer} {question}", parse_objectives("honesty"))
    assert "Query: what is {x}? | Answer: {answer} {question} | Edit: " in p


def test_prompt_parts_split_around_the_answer():
    objs = parse_objectives("honesty")
    before, after = prompt_parts("imhi", "Q", objs)
    assert before + "DRAFT" + after == build_prompt("imhi", "Q", "DRAFT", objs)
    assert after == " | Edit: "


# The released checkpoints' strings (DESIGN.md), byte for byte.
RELEASED = {
    "ultrafeedback": [
        "Instruction following: the response should follow the instructions of the query",
        "Honesty: the response should not tell lies",
        "Truthfulness: the response should actively making known all the full truth of a matter",
        "Helpfulness: the response should provide useful resources and suggestions to the user",
    ],
    "hh-rlhf": [
        "Harmlessness: The response should avoid content that is offensive, discriminatory, or harmful",
        "Helpfulness: The response should provide useful resources and suggestions to the user",
        "Humour: The response should be cheerful and amusing",
    ],
    "imhi": [
        "Correctness: the explanations should make correct predictions",
        "Informative: the response should express clear logic and provide consistent evidence",
        "Professional: the response should provide evidence with high quality and reliability",
    ],
    "unseen": [
        "Specificity: the response should refer to facts and details and avoid vague arguments.",
        "Factuality: the response should be factually correct and avoid hallucinated statements.",
        "Readability: the response should be easy to read and understand, not too technical for laymen.",
        "Fairness: the response should avoid biased or one-sided arguments and consider different points of view.",
        "Repetition: the response should avoid repetitive statements of one point.",
        "Length: the response should be concise and avoid redundant content.",
    ],
}


def test_builtins_match_the_released_strings():
    texts = {o.family: [o.text for o in builtin_objectives(o.family)] for o in builtin_objectives()}
    assert texts == RELEASED


def test_helpfulness_follows_the_family():
    assert lookup("helpfulness").description.startswith("the response")
    assert lookup("helpfulness", family="hh-rlhf").description.startswith("The response")
    assert lookup("hh-rlhf/helpfulness").family == "hh-rlhf"
    assert lookup("Instruction_Following").key == "instruction following"


def test_spec_keys_custom_items_and_duplicates():
    objs = parse_objectives("honesty, Brevity: keep it short ,honesty,length")
    assert [o.key for o in objs] == ["honesty", "brevity", "length"]
    assert objs[1] == Objective("brevity", "Brevity", "keep it short")


def test_spec_from_file(tmp_path):
    f = tmp_path / "objs.txt"
    f.write_text("# my objectives\nhonesty\n\nCaution: the response should say when it is unsure, and why\n")
    objs = parse_objectives(f"@{f}")
    assert [o.key for o in objs] == ["honesty", "caution"]
    assert objs[1].description == "the response should say when it is unsure, and why"
    f.write_text("honesty\nwisdom\n")
    with pytest.raises(MetaAlignerError, match=r"objs.txt:2: unknown objective \"wisdom\""):
        parse_objectives(f"@{f}")


@pytest.mark.parametrize("spec,match", [
    ("honesty,wisdom", r'unknown objective "wisdom" \(valid keys: correctness, .*honesty'),
    ("Brevity:   ", r'objective "Brevity": the description after the colon is empty'),
    ("", "no objectives given"),
    ("@/nonexistent/objs.txt", "objectives file not found"),
])
def test_spec_errors(spec, match):
    with pytest.raises(MetaAlignerError, match=match):
        parse_objectives(spec)


def test_template_from_model_name():
    assert template_for_model("MetaAligner/MetaAligner-HH-RLHF-7B") == "hh-rlhf"
    assert template_for_model("MetaAligner/MetaAligner-UltraFeedback-1.1B") == "ultrafeedback"
    assert template_for_model("MetaAligner/MetaAligner-IMHI-13B") == "imhi"
    assert template_for_model("runs/my-aligner/final") == "ultrafeedback"


def test_objectives_cli_json_and_family():
    res = run_cli("objectives", "--family", "unseen", "--json")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert [d["key"] for d in data] == ["specificity", "factuality", "readability", "fairness", "repetition", "length"]
    res = run_cli("objectives")
    assert res.returncode == 0 and "[hh-rlhf]" in res.stdout and "humour" in res.stdout


@pytest.mark.parametrize("family", [None, "hh-rlhf", "ultrafeedback", "imhi"])
def test_every_builtin_typed_in_full_is_one_objective(family):
    """DESIGN.md: a description may contain commas; every built-in typed in full is one objective."""
    texts = [o.text for o in builtin_objectives()]
    assert any("," in t for t in texts)  # the harmlessness description has commas
    for text in texts:
        objs = parse_objectives(f"{text},honesty", family=family)
        assert [o.text for o in objs][0] == text
        assert len(objs) == (1 if text.startswith("Honesty:") else 2)


def test_custom_descriptions_keep_their_commas_and_quotes_take_items_whole():
    objs = parse_objectives("honesty,Empathy: acknowledge feelings, then respond kindly,length")
    assert [o.key for o in objs] == ["honesty", "empathy", "length"]
    assert objs[1].description == "acknowledge feelings, then respond kindly"
    objs = parse_objectives('"Tone: warm, honesty first",honesty')
    assert [(o.key, o.description) for o in objs] == [("tone", "warm, honesty first"), ("honesty",
                                                       "the response should not tell lies")]
    with pytest.raises(MetaAlignerError, match="double quote is not closed"):
        parse_objectives('"Tone: warm')


def test_unknown_objective_error_names_quoting_and_at_file():
    with pytest.raises(MetaAlignerError, match=r'unknown objective "discriminatory".*double quotes.*@file'):
        parse_objectives("harmlessness,discriminatory")
