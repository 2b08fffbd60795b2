"""The app's non-UI logic without a model: objectives from the UI, API SPECs, templates,
settings, key checks, flags, and that importing app.py stays light."""
from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import ROOT
from webapp.service import (GenerationSettings, ModelRegistry, collect_objectives, missing_api_key,
                            objective_choices, parse_api_objectives, parse_new_objectives, resolve_template,
                            with_template)
from metaaligner_core.errors import MetaAlignerError
from metaaligner_core.objectives import builtin_objectives
from metaaligner_core.templates import build_prompt

from webapp.config import AppConfig, make_service, parse_args


def test_checkbox_values_resolve_to_the_family_of_the_box():
    choices = objective_choices()
    assert [fam for fam in choices] == ["ultrafeedback", "hh-rlhf", "imhi", "unseen"]
    for fam, items in choices.items():
        assert [label for label, _ in items] == [o.text for o in builtin_objectives(fam)]
    # "helpfulness" exists in two families with different wording: the ticked box decides.
    objs = collect_objectives(["hh-rlhf/helpfulness", "ultrafeedback/helpfulness"], "", "ultrafeedback")
    assert [o.text for o in objs] == [
        "Helpfulness: The response should provide useful resources and suggestions to the user"]
    objs = collect_objectives(["ultrafeedback/helpfulness"], "", "hh-rlhf")
    assert objs[0].text.startswith("Helpfulness: the response")


def test_new_objectives_one_per_line_may_contain_commas():
    text = "Politeness: be kind, calm, and brief\n\n# a comment\nlength\n"
    objs = collect_objectives(["ultrafeedback/honesty"], text, "ultrafeedback")
    assert [o.text for o in objs] == [
        "Honesty: the response should not tell lies",
        "Politeness: be kind, calm, and brief",
        "Length: the response should be concise and avoid redundant content.",
    ]


def test_bad_new_objective_line_is_named():
    with pytest.raises(MetaAlignerError, match=r"new objectives, line 2: .*description after the colon is empty"):
        parse_new_objectives("Politeness: be kind\nTone:")
    with pytest.raises(MetaAlignerError, match=r'line 1: unknown objective "wit"'):
        parse_new_objectives("wit")


def test_no_objectives_is_an_error():
    with pytest.raises(MetaAlignerError, match="no objectives"):
        collect_objectives([], "  \n", "ultrafeedback")


def test_api_spec_parsing_and_file_specs_refused(tmp_path):
    objs = parse_api_objectives("honesty, Politeness: be kind", "ultrafeedback")
    assert [o.key for o in objs] == ["honesty", "politeness"]
    secret = tmp_path / "objs.txt"
    secret.write_text("Secret: do not read me\n")
    with pytest.raises(MetaAlignerError, match="@file SPECs are not accepted"):
        parse_api_objectives(f"@{secret}", "ultrafeedback")
    with pytest.raises(MetaAlignerError, match='unknown objective "bogus"'):
        parse_api_objectives("honesty,bogus", "ultrafeedback")


def test_template_resolution():
    from metaaligner_core.pipeline import choose_template

    # One rule: explicit > the aligner's name > the data's name > ultrafeedback.
    assert choose_template(None, "default", "../shared/data/policy-outputs/hh-rlhf/gpt-3.5-turbo.csv") == "hh-rlhf"
    assert choose_template("auto", "MetaAligner/MetaAligner-IMHI-7B", "hf:Anthropic/hh-rlhf") == "imhi"
    assert choose_template("ultrafeedback", "MetaAligner/MetaAligner-IMHI-7B", "hh-rlhf.csv") == "ultrafeedback"
    assert choose_template(None, "openai-compatible:MetaAligner-HH-RLHF-7B@http://h:8000/v1") == "hh-rlhf"
    assert choose_template(None, "out/my-aligner", "rows.jsonl") == "ultrafeedback"
    assert resolve_template("auto", "MetaAligner/MetaAligner-HH-RLHF-1.1B") == "hh-rlhf"
    assert resolve_template("", "MetaAligner/MetaAligner-IMHI-7B") == "imhi"
    assert resolve_template("auto", "default") == "ultrafeedback"
    assert resolve_template("imhi", "default") == "imhi"
    with pytest.raises(MetaAlignerError, match='unknown template "chat"'):
        resolve_template("chat", "default")


def test_template_view_shares_the_model():
    class FakeAligner:  # only the attributes with_template touches
        template = "ultrafeedback"
        model = object()

    base = FakeAligner()
    assert with_template(base, None) is base and with_template(base, "ultrafeedback") is base
    view = with_template(base, "imhi")
    assert view.template == "imhi" and base.template == "ultrafeedback" and view.model is base.model


def test_generation_settings_validate():
    s = GenerationSettings(max_new_tokens=24.0, temperature=0.7, top_p=0.9, repetition_penalty=1.1)
    assert s.aligner_kwargs() == {"max_new_tokens": 24, "temperature": 0.7, "top_p": 0.9, "repetition_penalty": 1.1,
                                  "seed": None}
    assert s.policy_kwargs() == {"max_tokens": 24, "temperature": 0.7}
    assert s.policy_kwargs(local=True) == {"max_tokens": 24, "temperature": 0.7, "top_p": 0.9,
                                           "repetition_penalty": 1.1, "seed": None}
    for bad in ({"max_new_tokens": 0}, {"temperature": -1}, {"top_p": 0}, {"repetition_penalty": 0},
                {"max_new_tokens": "many"}):
        with pytest.raises(MetaAlignerError):
            GenerationSettings(**bad)
    with pytest.raises(TypeError, match="unknown generation settings: top_k"):
        GenerationSettings.from_kwargs(top_k=5)
    # One class for the engine, the pipeline and the app; `align` and the server default to the
    # authors' 1024 new tokens, the app to a shorter interactive length.
    from metaaligner_core.backends import hf
    from metaaligner_core import pipeline
    assert hf.GenerationSettings is pipeline.GenerationSettings is GenerationSettings
    assert GenerationSettings().max_new_tokens == 1024
    assert make_service(AppConfig()).settings.max_new_tokens == 256


def test_missing_api_key_message(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test")
    assert "OPENAI_API_KEY is not set" in missing_api_key("openai:gpt-4o-mini")
    assert missing_api_key("anthropic:claude-3-5-haiku-latest") is None
    assert missing_api_key("openai-compatible:m@http://127.0.0.1:1/v1") is None
    assert missing_api_key("default") is None
    reg = ModelRegistry()
    with pytest.raises(MetaAlignerError, match="OPENAI_API_KEY is not set"):
        reg.policy("openai:gpt-4o-mini")
    with pytest.raises(MetaAlignerError, match="can only be a policy"):
        reg.aligner("anthropic:claude-3-5-haiku-latest")
    with pytest.raises(MetaAlignerError, match="can only be a policy"):
        reg.aligner("openai:gpt-4o-mini")
    assert reg.loaded("policy", "openai:gpt-4o-mini") is None


def test_preview_is_the_template_prompt():
    service = make_service(AppConfig())
    objs = collect_objectives(["unseen/length"], "", "imhi")
    assert service.preview("Why?", "Because.", objs, "imhi") == build_prompt("imhi", "Why?", "Because.", objs)
    assert "<the policy's draft>" in service.preview("Why?", "", objs, "imhi")


def test_flags():
    cfg = parse_args([])
    assert (cfg.policy, cfg.aligner, cfg.db_url, cfg.host, cfg.port, cfg.auth) == (
        "default", "default", "sqlite:///data/annotations.db", "127.0.0.1", 7860, None)
    cfg = parse_args(["--policy", "openai:gpt-4o", "--aligner", "out/aligner", "--template", "imhi",
                          "--db", "sqlite:////tmp/x.db", "--host", "0.0.0.0", "--port", "8000",
                          "--share", "--auth", "ann:pa:ss"])
    assert (cfg.policy, cfg.aligner, cfg.template, cfg.db_url, cfg.host, cfg.port, cfg.share, cfg.auth) == (
        "openai:gpt-4o", "out/aligner", "imhi", "sqlite:////tmp/x.db", "0.0.0.0", 8000, True, ("ann", "pa:ss"))
    with pytest.raises(SystemExit):
        parse_args(["--auth", "nopassword"])


def test_core_holds_no_app_code():
    """The core never imports the annotation package or the app side, and holds no UI strings (the
    whole import graph: tests/test_imports.py)."""
    code = ("import sys, metaaligner_core.pipeline, metaaligner_core.commands.align, metaaligner_core.cli, "
            "metaaligner_core.evaluation.experts, metaaligner_core.commands.evaluate; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('annotation', 'webapp', 'gradio')]; "
            "assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    pipeline_modules = ["pipeline.py", "inference.py", "models.py", "settings.py", "commands/align.py",
                        *(f"backends/{p.name}" for p in (ROOT / "metaaligner_core" / "backends").rglob("*.py"))]
    core = "\n".join((ROOT / "metaaligner_core" / p).read_text() for p in pipeline_modules)
    for needle in ("import annotation\n", "import annotation.", "from annotation", "**ready**",
                   "Waiting for a free generation slot"):
        assert needle not in core


def test_import_is_light():
    """Importing app.py (and the web app's modules) must not import gradio, torch or transformers,
    nor build the UI."""
    code = ("import sys, app, webapp.launch, webapp.align_tab, webapp.annotation_tabs, webapp.accounts_tab; "
            "heavy = [m for m in ('gradio', 'torch', 'transformers') if m in sys.modules]; "
            "assert not heavy, heavy; assert 'demo' not in vars(app)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_help_lists_the_design_flags():
    r = subprocess.run([sys.executable, "app.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for flag in ("--policy", "--aligner", "--db", "--host", "--port", "--share", "--auth", "--template"):
        assert flag in r.stdout


def test_a_start_up_policy_refused_before_loading_shows_failed_not_loading(monkeypatch):
    """`app.py --policy openai:…` without the key: the status says why, and nothing stays "loading"."""
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    registry = ModelRegistry()
    registry.preload(policy="openai:gpt-4o-mini", aligner=None).join(timeout=30)
    [status] = registry.statuses()
    assert status.state == "failed" and "OPENAI_API_KEY" in status.detail
    assert not registry.busy()


def test_a_second_stream_waits_for_the_slot_and_close_frees_it(monkeypatch):
    """The app's generation slot (concurrency 1) with a remote aligner: no local model needed."""
    from tests.api_server import FakeProvider
    from webapp.service import AlignService

    monkeypatch.delenv("METAALIGNER_COMPAT_API_KEY", raising=False)
    with FakeProvider(reply=lambda body: "a b c d e f") as server:
        service = AlignService(ModelRegistry(), aligner=f"openai-compatible:m@{server.base_url}/v1", concurrency=1)
        objs = collect_objectives(["ultrafeedback/honesty"], "", "ultrafeedback")
        first = service.stream("Q1?", objs, "draft one")
        assert next(first).phase in ("loading-aligner", "aligning")  # holds the slot now
        second = service.stream("Q2?", objs, "draft two")
        upd = next(second)
        assert upd.phase == "waiting" and upd.status() == "Waiting for a free generation slot…"
        first.close()  # what Stop does: frees the slot
        phases = [u.phase for u in second]
        assert phases[-1] == "done" and upd.draft_source == "user"
        assert service.align("Q3?", "honesty", "draft three") == ("draft three", "a b c d e f")
