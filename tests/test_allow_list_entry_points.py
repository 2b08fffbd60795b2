"""The model allow-list refuses plain MODEL strings, not only ``openai-compatible:`` URLs
(issue 26): hub ids, local paths, ``openai:`` and ``anthropic:`` models that the operator did not
configure are refused by ``ModelAllowList.check`` and by the app service's own entry points (the
pipeline's ``stream``/``correct`` and the model registry's hook), before anything is loaded or
any provider is called. Nothing here goes through Gradio's dropdown.
"""
from __future__ import annotations

import pytest

from metaaligner_core.errors import MetaAlignerError
from webapp import security as sec
from webapp.config import AppConfig, make_service

UNLISTED = ["some/hub-model", "MetaAligner/MetaAligner-HH-RLHF-7B", "/etc/passwd", "./runs/aligner/final",
            "~/models/x.gguf", "openai:gpt-4o-mini", "anthropic:claude-3-5-haiku-latest", "openai:gpt-4o@http://x/v1"]


@pytest.mark.parametrize("kind", ["policy", "aligner"])
@pytest.mark.parametrize("spec", UNLISTED)
def test_check_refuses_unlisted_plain_strings(kind, spec):
    allow = sec.ModelAllowList(["default", "openai-compatible:m@http://10.0.0.2:8000/v1"], ["default"])
    with pytest.raises(MetaAlignerError, match="not offered by this server"):
        allow.check(kind, spec)
    # the same string, configured by the operator, is accepted (so the refusal is about the list)
    allow.add(kind, spec)
    assert allow.check(kind, spec) == spec


@pytest.fixture
def service(tmp_path):
    config = AppConfig(preload=False, max_new_tokens=8, db_url=f"sqlite:///{tmp_path / 'ann.db'}",
                           allow_models=["openai-compatible:m@http://127.0.0.1:9/v1"])
    return make_service(config)


@pytest.mark.parametrize("spec", UNLISTED)
def test_service_entry_points_refuse_unlisted_models_before_loading(service, spec, monkeypatch):
    loads = []
    for name in ("_load_policy", "_load_aligner"):  # a load would mean the check let it through
        monkeypatch.setattr(service.registry, name, lambda *a, **k: loads.append(a))
    # an API model is never an aligner: refused by that rule first, or by the list
    refused_aligner = "not offered by this server|can only be a policy"
    with pytest.raises(MetaAlignerError, match="not offered by this server"):
        list(service.stream("Why is the sky blue?", ["ultrafeedback/honesty"], "", policy=spec))
    with pytest.raises(MetaAlignerError, match=refused_aligner):
        service.correct("Why is the sky blue?", ["ultrafeedback/honesty"], "A draft.", aligner=spec)
    with pytest.raises(MetaAlignerError, match="not offered by this server"):
        service.registry.get("policy", spec)
    with pytest.raises(MetaAlignerError, match=refused_aligner):
        service.registry.get("aligner", spec)
    assert loads == [] and service.registry.loaded("policy", spec) is None


def test_allow_any_model_lets_plain_strings_through_but_not_unconfigured_endpoints():
    free = sec.ModelAllowList(["default"], ["default"], allow_any=True)
    for spec in UNLISTED[:-1]:
        assert free.check("policy", spec) == spec
    with pytest.raises(MetaAlignerError, match="endpoints its operator configured"):
        free.check("policy", "openai-compatible:x@http://127.0.0.1:9999/v1")
