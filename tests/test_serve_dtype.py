"""``metaaligner serve --dtype``: the local models' weights in bf16 where the CPU computes bf16
natively, refused where it would be emulated (or fp16 on a CPU), and stated in ``/v1/models``.

The server is a real one on 127.0.0.1 (``ServerThread``) with a tiny random Llama as policy and
aligner; its answer is compared with the same model loaded in bf16 through the library's own
entry points (``HFChatBackend``, ``Aligner``), without the server.
"""
from __future__ import annotations

import openai
import pytest

from conftest import run_cli
from metaaligner_core.commands.serve import check_dtype
from metaaligner_core.errors import MetaAlignerError
from metaaligner_core.hardware import cpu_flags, cpu_has_fast_bf16
from metaaligner_core.serve import ServerThread
from metaaligner_core.serve.api import create_app
from metaaligner_core.serve.service import CorrectionService
from test_serve import build_tiny_model

N = 6
INTEL_SPR = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_tile amx_bf16\n\nprocessor\t: 1\n"
AMD_ZEN3 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n"


def test_cpu_flags_come_from_the_first_flags_line():
    assert cpu_flags(AMD_ZEN3) == {"fpu", "sse2", "avx2", "fma"}
    assert cpu_has_fast_bf16(INTEL_SPR) and not cpu_has_fast_bf16(AMD_ZEN3)
    assert cpu_flags("") == set() and not cpu_has_fast_bf16("model name: something\n")


@pytest.mark.parametrize("dtype,cpuinfo,refused", [
    ("auto", AMD_ZEN3, None), ("fp32", AMD_ZEN3, None),
    ("bf16", INTEL_SPR, None),
    ("bf16", AMD_ZEN3, "neither avx512_bf16 nor AMX"),
    ("fp16", INTEL_SPR, "not on a CPU"),
    ("int4", INTEL_SPR, 'expected auto, fp32, bf16 or fp16'),
])
def test_dtype_is_refused_where_the_cpu_would_compute_it_slowly(dtype, cpuinfo, refused):
    if refused is None:
        check_dtype(dtype, "cpu", cpuinfo)
    else:
        with pytest.raises(MetaAlignerError, match=refused):
            check_dtype(dtype, "cpu", cpuinfo)


def test_serve_refuses_fp16_on_a_cpu_before_loading_anything(tmp_path):
    r = run_cli("serve", "--device", "cpu", "--dtype", "fp16", "--aligner", str(tmp_path / "nothing-here"),
                "--port", "1", timeout=120)
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert lines[-1].startswith("metaaligner: error: --dtype fp16: not on a CPU"), r.stderr[-2000:]
    assert "Traceback" not in r.stderr


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, embedded_dir):
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", embedded_dir))


@pytest.mark.parametrize("dtype,torch_name", [("bf16", "bfloat16"), ("fp32", "float32")])
def test_serve_loads_its_local_models_in_the_dtype_and_says_so(tiny_dir, dtype, torch_name):
    import torch

    from metaaligner_core.backends.hf import HFChatBackend
    from metaaligner_core.inference import Aligner

    svc = CorrectionService(policies=[f"tiny={tiny_dir}"], aligner=tiny_dir, objectives="honesty",
                            max_new_tokens=N, device="cpu", dtype=dtype)
    svc.load()
    try:
        assert svc.aligner.generator.model.dtype == getattr(torch, torch_name)
        with ServerThread(create_app(svc)) as server:
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
            card = client.models.retrieve("tiny")
            assert card.metaaligner["dtype"] == dtype
            r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Why is the sky blue?"}])
        # the same model loaded in the same dtype, without the server
        ref = Aligner.load(tiny_dir, device="cpu", dtype=dtype)
        draft = HFChatBackend(ref.generator).complete("Why is the sky blue?", max_tokens=N).text
        assert r.metaaligner["original"] == draft
        assert r.choices[0].message.content == ref.align("Why is the sky blue?", draft, "honesty", max_new_tokens=N)
    finally:
        svc.close()
