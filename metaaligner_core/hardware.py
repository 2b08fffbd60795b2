"""What the hardware can do: whether Flash-Attention 2 really works here, the bf16 peak of a
device, whether this CPU computes bf16 natively, and the FLOPs a training step of a decoder costs
(for model FLOPs utilisation, MFU).

Kept free of heavy imports at module level: the CLI imports it on machines without CUDA.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)

# Flash-Attention 2 kernels need Ampere (compute capability 8.0) or newer.
FLASH_MIN_CAPABILITY = (8, 0)
# transformers' flash_attention_2 path needs flash-attn 2.1 or newer (bottom-right causal mask).
FLASH_MIN_VERSION = (2, 1)


# CPU flags (Linux /proc/cpuinfo names) of native bf16 matrix products: AVX-512 BF16 and AMX.
FAST_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The feature flags of this CPU (``/proc/cpuinfo``'s first ``flags`` line); empty where there
    is no such file (macOS, Windows)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
                cpuinfo = fh.read()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return set()


def cpu_has_fast_bf16(cpuinfo: str | None = None) -> bool:
    """True when this CPU multiplies bf16 matrices natively (avx512_bf16 or AMX): there, a bf16
    model decodes faster than fp32; elsewhere bf16 is emulated and slower."""
    return bool(cpu_flags(cpuinfo) & set(FAST_BF16_FLAGS))


@dataclass(frozen=True)
class FlashStatus:
    usable: bool
    reason: str  # why not (or the version that works)


def _version_tuple(text: str) -> tuple[int, ...]:
    out = []
    for part in text.split("+")[0].split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        if not digits:
            break
        out.append(int(digits))
    return tuple(out)


def flash_attention_status(capability: tuple[int, int] | None = None) -> FlashStatus:
    """Whether ``attn_implementation="flash_attention_2"`` will run on this machine.

    Finding the package is not enough: a wheel built against another torch imports its CUDA
    extension with undefined symbols, and Flash-Attention 2 has no kernels before Ampere. So the
    package and its compiled extension are imported for real, its version is checked, and the
    GPU's compute capability (``capability``, else that of the current CUDA device) must be at
    least 8.0.
    """
    if importlib.util.find_spec("flash_attn") is None:
        return FlashStatus(False, "flash-attn is not installed (pip install flash-attn --no-build-isolation)")
    try:
        flash_attn = importlib.import_module("flash_attn")
        importlib.import_module("flash_attn.flash_attn_interface")  # loads the compiled CUDA extension
    except Exception as e:  # ImportError/OSError (undefined symbol: built for another torch), RuntimeError
        first = (str(e).splitlines() or [type(e).__name__])[0]
        return FlashStatus(False, f"flash-attn is installed but does not load ({first}); it was probably built "
                                  "for another torch or CUDA: reinstall it against this torch")
    version = getattr(flash_attn, "__version__", "0")
    if _version_tuple(version) < FLASH_MIN_VERSION:
        return FlashStatus(False, f"flash-attn {version} is too old (need >= "
                                  f"{'.'.join(map(str, FLASH_MIN_VERSION))})")
    if capability is None:
        try:
            import torch

            if not torch.cuda.is_available():
                return FlashStatus(False, "no CUDA device")
            capability = tuple(torch.cuda.get_device_capability())
        except Exception as e:  # a broken CUDA set-up: no flash attention, not a crash
            return FlashStatus(False, f"cannot read the GPU's compute capability ({e})")
    if tuple(capability) < FLASH_MIN_CAPABILITY:
        return FlashStatus(False, f"the GPU's compute capability {capability[0]}.{capability[1]} is below 8.0 "
                                  "(Flash-Attention 2 needs Ampere or newer)")
    return FlashStatus(True, f"flash-attn {version}")


# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets, matched
# against torch.cuda.get_device_name(); the most specific pattern first.
BF16_PEAK_TFLOPS = (
    ("h200", 989.0), ("gh200", 989.0), ("h100 pcie", 756.0), ("h100 nvl", 835.0), ("h100", 989.0),
    ("h800", 989.0), ("b200", 2250.0), ("a100", 312.0), ("a800", 312.0), ("a6000 ada", 364.0),
    ("rtx 6000 ada", 364.0), ("l40s", 362.0), ("l40", 181.0), ("a6000", 155.0), ("a40", 150.0),
    ("a30", 165.0), ("a10g", 125.0), ("a10", 125.0), ("l4", 121.0), ("4090", 165.0), ("3090", 71.0),
)


def bf16_peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU from its name, or None when it is not in the table."""
    name = device_name.lower()
    for pattern, peak in BF16_PEAK_TFLOPS:
        if pattern in name:
            return peak
    return None


def non_embedding_params(model) -> int:
    """Parameters that take part in a matrix product per token: every parameter except the input
    embedding table (a lookup). A tied output head shares that table but still multiplies by it,
    so its size is added back."""
    total = sum(p.numel() for p in model.parameters())
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    tied = out is not None and out.weight.data_ptr() == emb.data_ptr()
    return total - emb.numel() + (emb.numel() if tied else 0)


def attention_dims(config) -> tuple[int, int]:
    """``(layers, d_attn)`` of a decoder config, d_attn = heads × head dimension."""
    layers = config.num_hidden_layers
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return layers, heads * head_dim


def train_flops_per_token(n_params: int, layers: int, d_attn: int, seq_len: float) -> float:
    """Model FLOPs of one training token (forward + backward): ``6·N + 12·L·d_attn·T``.

    ``6·N``: two FLOPs per multiply-add, forward (×1) and backward (×2), N the non-embedding
    parameters (:func:`non_embedding_params`). ``12·L·d_attn·T``: the attention scores and their
    weighted sum (QKᵀ and AV, 2·2·d_attn·T per layer forward, ×3 with the backward) against T
    positions — the PaLM paper's (Chowdhery et al. 2022, App. B) convention, which counts the
    whole T×T matrix, not the causal half. Activation recomputation (gradient checkpointing) is
    not counted: this is MFU, not hardware FLOPs utilisation.
    For a batch of sequences of different lengths, ``seq_len`` is Σ len² / Σ len (each token
    attends within its own sequence).
    """
    return 6.0 * n_params + 12.0 * layers * d_attn * seq_len


GB = 1e9
CUDA_CONTEXT_GB = 4.0  # CUDA context, allocator slack, NCCL buffers


@dataclass
class MemoryEstimate:
    """Memory per GPU of one training configuration, in GB (10⁹ bytes); docs/training.md derives
    each term. ``total`` is their sum."""

    state: float        # weights + gradients + optimizer states, as the strategy shards them
    unsharded: float    # FSDP without sync_each_batch: full bf16 gradients between micro-batches
    transient: float    # gathered layers (FSDP) or prefetch and reduce buckets (ZeRO-3)
    activations: float  # kept for the backward pass, including the logits
    context: float = CUDA_CONTEXT_GB

    @property
    def total(self) -> float:
        return self.state + self.unsharded + self.transient + self.activations + self.context


def train_memory_estimate(n_params: float, hidden: int, layers: int, vocab: int, batch: int, seq_len: int, *,
                          strategy: str = "fsdp", world: int = 1, checkpointing: bool = True,
                          sync_each_batch: bool = True, heads: int | None = None, eager_attention: bool = False,
                          act_bytes: int = 2) -> MemoryEstimate:
    """Memory per GPU for full fine-tuning with AdamW and mixed precision (docs/training.md, "Memory
    per GPU"): the arithmetic of that section, so the table there and ``gradient_checkpointing:
    auto`` agree.

    ``strategy``: ``fsdp`` (full shard), ``deepspeed`` (ZeRO-3), ``ddp`` or ``no`` (one process).
    State: fp32 weights, fp32 gradients and Adam's two moments, 16 B per parameter, divided by
    ``world`` under FSDP; ZeRO-3 also holds bf16 copies (18 B); DDP and one process hold all of
    it. Transient: FSDP gathers up to three decoder layers' bf16 weights (2 B × N/L × 3); ZeRO-3's
    prefetch and reduce buckets ≈ 3 GB. Activations with checkpointing: each layer's input
    (b·s·h·2 B × L) plus one layer recomputed (34·b·s·h B, Korthikanti et al. 2022, with
    flash/SDPA attention, no s² term); without: 34·b·s·h B for every layer, plus 5·a·s²·b B per
    layer with eager attention (the score matrices). Logits: b·s·V × 10 B (bf16 logits, their fp32
    copy and its gradient). ``act_bytes`` 4 (fp32 training) doubles the 16-bit activation terms.
    """
    n = float(n_params)
    tokens = batch * seq_len
    scale = act_bytes / 2
    if strategy == "fsdp":
        state = 16 * n / world
        transient = 2 * n / layers * 3
    elif strategy == "deepspeed":
        state = 18 * n / world
        transient = 3 * GB
    else:
        state, transient = 16 * n, 0.0
    unsharded = 2 * n if strategy == "fsdp" and world > 1 and not sync_each_batch else 0.0
    per_layer = 34 * tokens * hidden * scale
    if eager_attention:
        per_layer += 5 * (heads or 1) * seq_len * seq_len * batch * scale
    if checkpointing:
        acts = tokens * hidden * 2 * scale * layers + per_layer
    else:
        acts = per_layer * layers
    acts += tokens * vocab * (act_bytes + 8)
    return MemoryEstimate(state / GB, unsharded / GB, transient / GB, acts / GB)
