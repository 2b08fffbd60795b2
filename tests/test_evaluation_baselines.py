"""Prompts of the baseline correctors (metaaligner_core.baselines)."""
import pytest

from metaaligner_core.baselines import (CORRECTORS, PKU_ALIGNER_TEMPLATE, check_corrector, corrector_info,
                                        corrector_prompt, output_column, pku_aligner_prompt,
                                        self_refine_prompt)
from metaaligner_core.errors import MetaAlignerError
from metaaligner_core.objectives import parse_objectives
from metaaligner_core.templates import build_prompt

# The text of the PKU Aligner template, typed out independently of the module.
PKU_EXPECTED = ("BEGINNING OF CONVERSATION: USER: Edit the following Question-Answer pair to make it more helpful "
                "and harmless: What is 2+2? | It is 5. ASSISTANT:")


def test_pku_aligner_prompt_is_the_published_template():
    assert pku_aligner_prompt("What is 2+2?", "It is 5.") == PKU_EXPECTED
    assert PKU_ALIGNER_TEMPLATE.count("{") == 2
    # objectives do not enter the PKU prompt (fixed instruction)
    assert pku_aligner_prompt("What is 2+2?", "It is 5.", parse_objectives("humour")) == PKU_EXPECTED


def test_self_refine_prompt_carries_query_draft_and_every_objective_text():
    objs = parse_objectives("honesty,Empathy: acknowledge feelings")
    p = self_refine_prompt("Q?", "my draft", objs)
    assert "Query: Q?\n" in p and "Draft answer: my draft\n" in p
    assert "Honesty: the response should not tell lies; Empathy: acknowledge feelings\n" in p
    assert p.endswith("Reply with the revised answer only, without any preface or explanation.")


def test_braces_in_user_text_stay_literal():
    p = self_refine_prompt("{answer} {question}", "{aspects}", parse_objectives("honesty"))
    assert "Query: {answer} {question}\n" in p and "Draft answer: {aspects}\n" in p
    assert pku_aligner_prompt("{answer}", "{question}").endswith("pair to make it more helpful and harmless: "
                                                                 "{answer} | {question} ASSISTANT:")


def test_corrector_dispatch_names_and_columns():
    objs = parse_objectives("honesty")
    assert corrector_prompt("metaaligner", "q", "a", objs, template="imhi") == build_prompt("imhi", "q", "a", objs)
    assert corrector_prompt("self_refine", "q", "a", objs) == self_refine_prompt("q", "a", objs)
    assert corrector_prompt("PKU", "q", "a", objs) == pku_aligner_prompt("q", "a")
    assert [output_column(c) for c in CORRECTORS] == ["aligned", "aligned_self_refine", "aligned_pku"]
    assert corrector_info("self-refine")["model"] == "policy" and corrector_info("pku-aligner")["model"] == "aligner"
    assert check_corrector("Self_Refine") == "self-refine"
    with pytest.raises(MetaAlignerError, match='unknown corrector "nope"'):
        check_corrector("nope")
    with pytest.raises(MetaAlignerError, match="at least one objective"):
        self_refine_prompt("q", "a", [])
