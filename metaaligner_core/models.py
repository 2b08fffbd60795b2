"""The MODEL-string grammar (one parser for every caller) and the loader for local models.

MODEL strings (:func:`parse_model`):

- ``default``: the embedded SmolLM2-135M-Instruct;
- ``tiny``: the embedded model with the project's tiny MetaAligner adapter merged
  (``training/tiny``; four program-checkable objectives only, see its README);
- a local directory (``config.json`` inside), a ``.gguf`` file, or a Hugging Face id;
- ``openai:NAME`` (key ``OPENAI_API_KEY``), ``anthropic:NAME`` (key ``ANTHROPIC_API_KEY``);
- ``openai-compatible:NAME@URL``: any OpenAI-compatible server (vLLM, SGLang, TGI, llama.cpp).
  It never sends ``OPENAI_API_KEY`` (that key belongs to OpenAI, not to a third-party server):
  its key is read from ``METAALIGNER_COMPAT_API_KEY``, or from the environment variable the
  operator names in ``METAALIGNER_COMPAT_API_KEY_ENV``; without one a placeholder is sent.

Device, dtype and attention are chosen automatically: CUDA → MPS → CPU; bf16 on CUDA, fp32
elsewhere; models loaded for decoding (:func:`load_causal_lm`) use PyTorch SDPA everywhere —
flash-attention-2 with padded decode rows makes the host wait for the device twice per layer per
step — and training (:func:`auto_attention`) uses ``flash_attention_2`` when flash-attn is
importable on CUDA, else SDPA.
API models (``openai:``, ``anthropic:``, ``openai-compatible:``) are not handled here; see
:mod:`metaaligner_core.backends`.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .embedded import DISPLAY_NAME, embedded_model_dir
from .errors import MetaAlignerError

log = logging.getLogger(__name__)

API_PREFIXES = ("openai:", "anthropic:", "openai-compatible:")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")

# Environment variable each provider's key is read from.
API_KEY_VARS = {"openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY"}
COMPAT_KEY_VAR = "METAALIGNER_COMPAT_API_KEY"
COMPAT_KEY_ENV_VAR = "METAALIGNER_COMPAT_API_KEY_ENV"  # names another variable holding the key


@dataclass(frozen=True)
class ModelSpec:
    """A parsed MODEL string. ``provider``: ``local`` (``default`` included), ``openai``,
    ``anthropic`` or ``openai-compatible``; ``name``: the model name (the spec itself for local
    models); ``url``: the server of an ``openai-compatible`` model."""

    spec: str
    provider: str
    name: str
    url: str | None = None

    @property
    def is_api(self) -> bool:
        return self.provider != "local"

    @property
    def is_default(self) -> bool:
        return self.provider == "local" and self.name == "default"


def canonical(spec: str | None) -> str:
    """The MODEL string with surrounding blanks removed; empty means ``default``."""
    return (str(spec) if spec is not None else "").strip() or "default"


def parse_compatible(rest: str) -> tuple[str, str]:
    """``NAME@URL`` -> ``(NAME, URL)``; the URL starts at the ``@http`` (a NAME may contain ``@``)."""
    at = max(rest.rfind("@http://"), rest.rfind("@https://"))
    if at <= 0:
        raise MetaAlignerError(f'"openai-compatible:{rest}": expected openai-compatible:NAME@URL '
                               '(e.g. openai-compatible:llama3@http://localhost:8000/v1)')
    return rest[:at], rest[at + 1:]


def parse_model(spec: str | None) -> ModelSpec:
    """Parse a MODEL string (see the module docstring); API specs are checked, local ones are
    resolved only when loaded (:func:`resolve_pretrained`)."""
    spec = canonical(spec)
    provider, sep, rest = spec.partition(":")
    if sep and provider == "openai-compatible":
        name, url = parse_compatible(rest)
        return ModelSpec(spec, provider, name, url)
    if sep and provider in API_KEY_VARS:
        if not rest.strip():
            raise MetaAlignerError(f'"{spec}": the model name after the colon is empty')
        return ModelSpec(spec, provider, rest.strip())
    return ModelSpec(spec, "local", spec)


def is_api_model(spec: str) -> bool:
    return str(spec).startswith(API_PREFIXES)


def is_default(spec: str | None) -> bool:
    return spec is None or canonical(spec) == "default"


def is_tiny(spec: str | None) -> bool:
    return spec is not None and canonical(spec) == "tiny"


def compat_api_key() -> str | None:
    """The key sent to ``openai-compatible:`` servers: never ``OPENAI_API_KEY``."""
    var = os.environ.get(COMPAT_KEY_ENV_VAR, "").strip() or COMPAT_KEY_VAR
    return os.environ.get(var) or None


def missing_api_key(spec: str) -> str | None:
    """The message to show when an API model cannot be used because its key is not set."""
    provider = str(spec).partition(":")[0]
    var = API_KEY_VARS.get(provider) if ":" in str(spec) else None
    if var and not os.environ.get(var):
        return f"{var} is not set on the server, so {spec} cannot be used; set it and restart"
    return None


def display_name(spec: str | None) -> str:
    return DISPLAY_NAME if is_default(spec) else str(spec)


def resolve_pretrained(spec: str | None) -> tuple[str, dict]:
    """Map a MODEL string to ``(name_or_path, extra from_pretrained kwargs)``."""
    if is_default(spec):
        return str(embedded_model_dir()), {}
    if is_tiny(spec):
        from .embedded import default_aligner_dir
        return str(default_aligner_dir()), {}
    spec = str(spec)
    if is_api_model(spec):
        raise MetaAlignerError(f'"{spec}" is an API model; it can only be used as a policy, not loaded locally')
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise MetaAlignerError(f"{path}: GGUF file not found")
        return str(path.parent), {"gguf_file": path.name}
    if path.exists():
        if not (path / "config.json").is_file():
            raise MetaAlignerError(f"{path}: not a model directory (no config.json)")
        return str(path), {}
    if spec.startswith((".", "/", "~")) or not _HUB_ID.match(spec):
        raise MetaAlignerError(f'model "{spec}": not a local directory, a .gguf file, "default" or a Hugging Face id')
    return spec, {}


def auto_device(device: str | None = None) -> str:
    if device and device != "auto":
        return device
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def auto_dtype(device: str, dtype: str | None = None):
    import torch

    if dtype and dtype != "auto":
        named = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
                 "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}
        if dtype not in named:
            raise MetaAlignerError(f'--dtype "{dtype}": expected bf16, fp16, fp32 or auto')
        return named[dtype]
    if device.startswith("cuda") and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def flash_attn_available() -> bool:
    # Imported for real and checked against the GPU (metaaligner_core.hardware): a copy built for
    # another torch, or a pre-Ampere GPU, must fall back to SDPA instead of crashing later.
    from .hardware import flash_attention_status

    return flash_attention_status().usable


def auto_attention(device: str, attn: str | None = None, *, decoding: bool = False) -> str:
    """``attn`` when given; else SDPA for decoding, and for training flash-attention-2 where it is
    usable on CUDA (SDPA otherwise)."""
    if attn and attn != "auto":
        return attn
    if decoding:
        return "sdpa"
    return "flash_attention_2" if device.startswith("cuda") and flash_attn_available() else "sdpa"


def load_tokenizer(spec: str | None, padding_side: str = "left"):
    """The tokenizer of a MODEL, with a pad token (falls back to unk, then eos)."""
    from transformers import AutoTokenizer

    name, extra = resolve_pretrained(spec)
    try:
        tok = AutoTokenizer.from_pretrained(name, **extra)
    except (OSError, ValueError) as e:
        raise MetaAlignerError(f'cannot load the tokenizer of "{spec}": {str(e).splitlines()[0]}') from None
    tok.padding_side = padding_side
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token if tok.unk_token is not None else tok.eos_token
    return tok


def load_causal_lm(spec: str | None, device: str | None = None, dtype: str | None = None,
                   attn: str | None = None, padding_side: str = "left"):
    """Load ``(model, tokenizer)`` for a local MODEL string, in eval mode on the chosen device."""
    from transformers import AutoModelForCausalLM

    name, extra = resolve_pretrained(spec)
    dev = auto_device(device)
    torch_dtype = auto_dtype(dev, dtype)
    attn_impl = auto_attention(dev, attn, decoding=True)
    tok = load_tokenizer(spec, padding_side=padding_side)
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype, attn_implementation=attn_impl, **extra)
    except (OSError, ValueError) as e:
        raise MetaAlignerError(f'cannot load model "{spec}": {str(e).splitlines()[0]}') from None
    model.to(dev).eval()
    log.info("loaded %s on %s (%s, %s)", display_name(spec), dev, str(torch_dtype).replace("torch.", ""), attn_impl)
    return model, tok
