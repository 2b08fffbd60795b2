"""Every "word for word" / "byte for byte" claim in README.md and docs/*.md is true.

Each such claim (found by scanning the documents) must name a source this file knows how to
check, and the check compares the project's string with the reference text in
``../shared/reference`` (the paper's Markdown, whose LaTeX is normalised; the authors' script
strings, JSON-escaped in official-prompts.md). A claim nobody checks fails the scan; where the
reference folder is absent, the checks skip and say so.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT.parent / "shared" / "reference"
PAPER, PROMPTS = REFERENCE / "metaaligner-paper.md", REFERENCE / "official-prompts.md"
CLAIM = re.compile(r"word for word|byte for byte|byte-exact|byte-for-byte|word-for-word|character for character",
                   re.I)
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def reference(path: Path) -> str:
    if not path.is_file():
        pytest.skip(f"{path} is absent (the reference texts sit beside the checkout in CI); claim not checked here")
    return path.read_text(encoding="utf-8")


def paper_plain(text: str) -> str:
    """The paper's Markdown with its LaTeX turned back into the printed characters."""
    text = text.replace("$", "")
    text = re.sub(r"\\text\{([^{}]*)\}", r"\1", text)
    text = re.sub(r"\\mathcal\{(\w)\}", r"\1", text)
    text = text.replace("\\mid", "|").replace("\\{", "{").replace("\\}", "}")
    text = re.sub(r"\\langle\s*r\s*\\rangle", "<r>", text)
    text = re.sub(r"\{\s*([^{}]*?)\s*\}", r"{\1}", text)  # "{ r_1 }" -> "{r_1}"
    text = text.replace("{{<r>}}", "{<r>}")
    return " ".join(text.split())


def plain(template: str, names: dict[str, str]) -> str:
    for ours, theirs in names.items():
        template = template.replace("{" + ours + "}", "{" + theirs + "}")
    return " ".join(template.split())


def script_string(section: str, nth: int = 0, source: Path | None = None) -> str:
    """The nth JSON-escaped string value in a code block of official-prompts.md's section (or of
    ``source``'s)."""
    text = reference(PROMPTS) if source is None else source.read_text(encoding="utf-8")
    start = text.index(f"## {section}")
    end = text.find("\n## ", start + 1)
    blocks = re.findall(r"```\n(.*?)\n```", text[start:end if end > 0 else None], re.S)
    return json.loads(blocks[nth])


# ----------------------------------------------------------------------------- the checks

def check_aligner_templates(claim: str) -> None:
    """The UltraFeedback and HH-RLHF templates and their equal variants: paper Appendix B."""
    from metaaligner_core.templates import EQUAL_TEMPLATES, TEMPLATES

    paper = paper_plain(reference(PAPER))
    names = {"aspects": "O", "question": "q", "answer": "y"}
    for table in (TEMPLATES, EQUAL_TEMPLATES):
        for name in ("ultrafeedback", "hh-rlhf"):
            assert plain(table[name], names) in paper, f"{name}: not the paper's template"
    # No source shows an IMHI equal template (and the IMHI prompt is not in the reference texts):
    # a claim covering them would be false.
    assert "imhi" not in claim.lower(), "an IMHI template claimed exact: it has no source in the reference texts"


def check_pairwise_paper(claim: str) -> None:
    from metaaligner_core.evaluation.prompts import PAIRWISE

    names = {"query": "q", "response_1": "r_1", "response_2": "r_2", "aspect": "<r>"}
    assert plain(PAIRWISE, names) in paper_plain(reference(PAPER))


def check_score_paper(claim: str) -> None:
    from metaaligner_core.evaluation.prompts import SCORE

    names = {"query": "q", "response": "a", "aspect": "<r>"}
    assert plain(SCORE, names) in paper_plain(reference(PAPER))
    # official-prompts.md quotes the same paper wording; the two must agree too
    block = re.search(r"Paper Appendix E\.1 wording.*?```\n(.*?)\n```", reference(PROMPTS), re.S).group(1)
    assert SCORE.replace("{query}", "{q}").replace("{response}", "{a}").replace("{aspect}", "{<r>}") == block


def check_score_script(claim: str) -> None:
    from metaaligner_core.evaluation.prompts import SCORE_SCRIPT

    want = script_string("evaluation/UltraFeedback_GPT4_rate.py")
    assert SCORE_SCRIPT.replace("{response}", "{output}").replace("{aspect}", "{aspects}") == want


def check_pairwise_script(claim: str) -> None:
    from metaaligner_core.evaluation.prompts import PAIRWISE_SCRIPT

    heading = "evaluation/HH-RLHF_GPT4_score.py and evaluation/UltraFeedback_GPT4_score.py"
    # transcribed with the scripts' commits in docs/authors-scripts.md (not in the shared reference)
    want = script_string(heading, source=ROOT / "docs" / "authors-scripts.md")
    ours = (PAIRWISE_SCRIPT.replace("{response_1}", "{output1}").replace("{response_2}", "{output2}")
            .replace("{aspect}", "{aspects}"))
    assert ours == want


def check_imhi_judge(claim: str) -> None:
    from metaaligner_core.evaluation.prompts import IMHI_SYSTEM, PAIRWISE_IMHI

    want = script_string("evaluation/IMHI_GPT4_score.py")
    ours = (PAIRWISE_IMHI.replace("{response_1}", "{output1}").replace("{response_2}", "{output2}")
            .replace("{aspect}", "{aspects}"))
    assert ours == want
    assert f'System message: "{IMHI_SYSTEM}"' in reference(PROMPTS)


def check_imhi_protocol(claim: str) -> None:
    """annotation/protocols/imhi.yaml against Appendix C.3: the procedure, every aspect's name,
    definition and 0-3 level descriptions, the symptom list in the paper's order, its
    criticality split and the closing sentence, each found in the paper's text."""
    import yaml

    paper = paper_plain(reference(PAPER))
    data = yaml.safe_load((ROOT / "annotation" / "protocols" / "imhi.yaml").read_text(encoding="utf-8"))
    texts = [data["procedure"]]
    for obj in data["objectives"]:
        texts += [obj["name"], obj["definition"], *(lv["description"] for lv in obj["levels"])]
        ref = obj.get("reference")
        if ref:
            texts += [ref["title"], ref["split"], ref["after"]]
            where = [paper.find(" ".join(item.split())) for item in ref["items"]]
            assert -1 not in where, [i for i, w in zip(ref["items"], where) if w < 0]
            assert where == sorted(where), "the symptom list is not in the paper's order"
            assert len(ref["items"]) == 11
    for text in texts:
        assert " ".join(text.split()) in paper, f"not in Appendix C.3: {text[:80]!r}"


# A phrase in the claim's paragraph -> its check. The most specific phrases first.
CHECKS = [
    ("HH-RLHF_GPT4_score.py", check_pairwise_script),
    ("IMHI_GPT4_score.py", check_imhi_judge),
    ("UltraFeedback_GPT4_rate.py", check_score_script),
    ("Appendix E.1", check_score_paper),
    ("Appendix C.1", check_pairwise_paper),
    ("Appendix C.3", check_imhi_protocol),
    ("templates", check_aligner_templates),
]


def claims() -> list[tuple[str, int, str]]:
    """(file, line, claim) of every claim in the documents: the clause that makes it."""
    out = []
    for path in DOCS:
        lines = path.read_text(encoding="utf-8").splitlines()
        for n, line in enumerate(lines):
            if CLAIM.search(line):
                # the claim's paragraph (or table row): the lines around it up to blank lines
                a = n
                while a > 0 and lines[a - 1].strip() and not line.startswith("|"):
                    a -= 1
                b = n
                while b + 1 < len(lines) and lines[b + 1].strip() and not line.startswith("|"):
                    b += 1
                paragraph = " ".join(lines[a:b + 1])
                # the clause that makes the claim: the sentence (or ';'-part) holding the phrase
                clause = next(c for c in re.split(r"(?<=\.)\s+(?=[A-Z`])|;\s+", paragraph) if CLAIM.search(c))
                out.append((path.relative_to(ROOT).as_posix(), n + 1, clause))
    return out


CLAIMS = claims()


def test_the_documents_make_claims_this_file_checks():
    assert CLAIMS, "no claims found: the scan itself is broken"
    for where, line, text in CLAIMS:
        assert any(key in text for key, _ in CHECKS), \
            f'{where}:{line}: a "word for word"/"byte for byte" claim with no check here: add one to CHECKS'


@pytest.mark.parametrize("where,line,text", CLAIMS, ids=[f"{w}:{n}" for w, n, _ in CLAIMS])
def test_claim_is_true_against_the_reference(where, line, text):
    key, check = next((k, c) for k, c in CHECKS if k in text)
    check(text)


def test_the_template_check_would_catch_a_changed_template(monkeypatch):
    """The normalised comparison is strict: one changed word fails it."""
    from metaaligner_core import templates

    monkeypatch.setitem(templates.TEMPLATES, "hh-rlhf", templates.TEMPLATES["hh-rlhf"].replace("improve", "better"))
    with pytest.raises(AssertionError, match="hh-rlhf: not the paper's template"):
        check_aligner_templates("templates")
