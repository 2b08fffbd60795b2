"""Three-stage supervised fine-tuning of the aligner (paper §3.3): warm-up → equal → preference.

Each stage trains on one file of a ``build-dataset`` directory (``warmup.jsonl``, ``equal.jsonl``,
``preference.jsonl``) and starts from the weights the previous stage wrote. TRL's ``SFTTrainer``
runs the loop; this module only tokenizes the rows the way inference reads them, chooses the
device-dependent settings, chains the stages and makes a rerun resume where it stopped.

Output directory::

    OUT/config.json        the TrainConfig and the settings resolved from it
    OUT/metrics.jsonl      one object per logged step: {"stage", "step", "loss", ...}
    OUT/<stage>/           the model after that stage (plain Hugging Face directory + tokenizer)
    OUT/<stage>/stage.json written last: the stage is finished (a rerun skips it)
    OUT/<stage>/checkpoints/checkpoint-N   while the stage runs (a rerun resumes from the last)
    OUT/final/             the model after the last stage: what ``align --aligner`` loads
"""
from __future__ import annotations

import dataclasses
import json
import re
import logging
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from .errors import InputError, MetaAlignerError
from .hardware import GB, train_memory_estimate
from .io import atomic_write, dumps, iter_records

log = logging.getLogger(__name__)

STAGES = ("warmup", "equal", "preference")
STAGE_MARKER = "stage.json"
CHECKPOINTS = "checkpoints"
ADAPTER = "adapter"
# Settings that change how a run is logged or saved, not what it learns: a rerun may change them.
RESUME_NEUTRAL = frozenset({"out", "logging_steps", "save_steps", "save_total_limit", "keep_checkpoints",
                            "dataloader_num_workers", "dataset_num_proc", "disable_tqdm", "ddp_timeout",
                            "save_dtype", "gradient_checkpointing"})  # checkpointing: memory and speed only
# Tokens kept from the end of an over-long prompt: the end of the answer and the "| Edit: " cue.
PROMPT_TAIL_TOKENS = 32


@dataclass
class TrainConfig:
    """Settings of one three-stage training run (``metaaligner train``; recipes in ``training/``).

    > Data and model

    data (`str`):
        A ``build-dataset`` output directory holding ``warmup.jsonl``, ``equal.jsonl`` and
        ``preference.jsonl`` (rows ``{"prompt", "completion", ...}``).
    base (`str`, defaults to ``"default"``):
        The model the first stage starts from: a Hugging Face id, a local directory, a ``.gguf``
        file or ``default`` (the embedded SmolLM2-135M-Instruct).
    out (`str`, defaults to ``"aligner"``):
        Output directory (layout in the module docstring). Rerunning into it resumes.
    stages (`tuple[str, ...]`, defaults to all three):
        The stages to run, always in the order warm-up, equal, preference.

    > Optimisation (per stage; the paper's recipe is lr 1e-5, warm-up ratio 0.05, 2 epochs,
    > effective batch 512, Adam(W), cosine schedule)

    epochs (`float`, defaults to ``2.0``): epochs over each stage's file.
    lr (`float`, defaults to ``1e-5``): peak learning rate.
    warmup_ratio (`float`, defaults to ``0.05``): share of each stage's steps spent warming up linearly.
    lr_scheduler (`str`, defaults to ``"cosine"``): a ``transformers`` scheduler name.
    weight_decay (`float`, defaults to ``0.0``).
    optim (`str`, defaults to ``"adamw_torch_fused"``): a ``transformers`` optimizer name (the fused
        AdamW kernel: the same update as ``adamw_torch``, several times faster, on CPU too).
    max_grad_norm (`float`, defaults to ``1.0``): gradient clipping.
    batch_size (`int`, defaults to ``4``): sequences per device per forward pass.
    grad_accum (`int`, defaults to ``1``): micro-batches per optimizer step (ignored when
        ``effective_batch_size`` is set).
    effective_batch_size (`int` or `None`, defaults to `None`): sequences per optimizer step over
        all devices; ``grad_accum`` is derived from it, ``batch_size`` and the number of processes.
    max_length (`int`, defaults to ``2048``): tokens per sequence (prompt + completion + EOS).
        Longer rows are shortened: the completion keeps its head (at least half the budget, or
        all of it), the prompt keeps its start and its last 32 tokens and loses its middle.
    max_steps (`int` or `None`, defaults to `None`): cap on optimizer steps per stage.
    seed (`int`, defaults to ``42``).
    edit_weight (`float`, defaults to ``1.0``): loss weight of the completion tokens where the
        completion does not continue a copy of the prompt (:func:`edit_loss_weights`): its first
        token, a token after a skipped or changed stretch of the draft, inserted tokens, and EOS.
        An aligner's target is mostly the draft copied, so these few tokens are its decisions
        (what to drop, what to change, where to stop). ``1.0``: every completion token counts the
        same (the paper's SFT, TRL's loss exactly); above 1 they count that many times as much.
        The loss stays the weighted sum over the completion tokens divided by their number.

    > LoRA (PEFT); the adapter is merged after each stage, so every stage directory is a plain model

    lora (`bool`, defaults to `False`): train LoRA adapters instead of all weights.
    lora_r (`int`, defaults to ``16``), lora_alpha (`int`, defaults to ``32``),
    lora_dropout (`float`, defaults to ``0.05``), lora_target_modules (`str`, defaults to ``"all-linear"``).
    lora_init (`str` or `None`): a PEFT LoRA adapter (a directory with ``adapter_config.json``) whose
        weights the first stage's LoRA (the first stage with rows) starts from and keeps training;
        its rank, alpha, dropout and target modules replace ``lora_r``/``lora_alpha``/
        ``lora_dropout``/``lora_target_modules`` for that stage (``OUT/config.json`` records them as
        ``lora_init_adapter``). Later stages start new adapters on the merged result. ``base`` must be the model the
        adapter was trained on. The merged result is then ``base`` plus one adapter of the same
        rank: it can ship as that adapter with nothing truncated.

    > Hardware (``"auto"``/`None` picks by device: on CUDA bf16, Flash-Attention 2 when installed
    > else SDPA, gradient checkpointing when the memory estimate needs it, padding-free batches
    > with Flash-Attention only; on CPU fp32, SDPA, length-grouped batches)

    device (`str`, defaults to ``"auto"``): ``cuda``, ``cpu``, ``mps`` or ``auto``.
    precision (`str`, defaults to ``"auto"``): ``bf16``, ``fp16``, ``fp32`` or ``auto``.
    attn (`str`, defaults to ``"auto"``): ``flash_attention_2``, ``sdpa``, ``eager`` or ``auto``.
    gradient_checkpointing (`bool` or ``"auto"``, defaults to ``"auto"``): recompute activations in
        the backward pass (~25-33% more compute, far less activation memory). ``auto``: on CUDA, on
        only when :func:`metaaligner_core.hardware.train_memory_estimate` without it (the model's
        size, ``batch_size`` full-length rows, the launch's sharding) exceeds the GPU's memory;
        off on CPU and MPS. ``true``/``false`` are obeyed.
    padding_free (`bool` or `None`): flatten each batch into one unpadded sequence with
        ``position_ids`` restarting at each row (needs Flash-Attention 2, whose varlen kernels
        attend within each sequence only; with SDPA transformers would keep the sequences apart
        with a mask over the whole flattened row, not measured faster). ``None``: on with it.
    group_by_length (`bool` or `None`): batch rows of similar length together (less padding);
        on by default whenever batches are padded.

    > Multi-GPU

    ddp_timeout (`int`, defaults to ``10800``): seconds a collective may wait before the job is
        aborted. Set when the process group is created, before anything else: while rank 0 alone
        merges a 13B LoRA on its CPU or writes a full state dict, the other ranks wait at a
        barrier far longer than NCCL's default 10 minutes.
    sync_each_batch (`bool` or `None`): synchronise (reduce-scatter) gradients on every
        micro-batch of a gradient-accumulation window instead of the last one only. ``None``: on
        under FSDP with accumulation (otherwise FSDP keeps full unsharded gradients of the whole
        model on every GPU between micro-batches: ~26 GB for 13B), off elsewhere (DDP keeps full
        gradients anyway, and syncing each micro-batch would only add traffic; DeepSpeed
        accumulates on its own).
    save_dtype (`str`, defaults to ``"auto"``): dtype of the saved stage weights: ``auto`` (the
        training precision: bf16 for bf16 runs, so a 13B stage directory is 26 GB, not the 52 GB
        of the fp32 master weights), ``bf16``, ``fp16`` or ``fp32``.

    > Logging and saving

    logging_steps (`int`, defaults to ``10``): log a metrics line every N optimizer steps.
    save_steps (`int`, defaults to ``500``): checkpoint every N optimizer steps (resume points).
    save_total_limit (`int`, defaults to ``2``): checkpoints kept per stage.
    keep_checkpoints (`bool`, defaults to `False`): keep ``OUT/<stage>/checkpoints`` after the stage ends.
    dataloader_num_workers (`int`, defaults to ``0``), dataset_num_proc (`int` or `None`).
    disable_tqdm (`bool`, defaults to `False`): no progress bars.
    """

    data: str
    base: str = "default"
    out: str = "aligner"
    stages: tuple[str, ...] = STAGES

    epochs: float = 2.0
    lr: float = 1e-5
    warmup_ratio: float = 0.05
    lr_scheduler: str = "cosine"
    weight_decay: float = 0.0
    optim: str = "adamw_torch_fused"
    max_grad_norm: float = 1.0
    batch_size: int = 4
    grad_accum: int = 1
    effective_batch_size: int | None = None
    max_length: int = 2048
    max_steps: int | None = None
    seed: int = 42
    edit_weight: float = 1.0

    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: str = "all-linear"
    lora_init: str | None = None

    device: str = "auto"
    precision: str = "auto"
    attn: str = "auto"
    gradient_checkpointing: bool | str | None = "auto"
    padding_free: bool | None = None
    group_by_length: bool | None = None

    ddp_timeout: int = 10800
    sync_each_batch: bool | None = None
    save_dtype: str = "auto"

    logging_steps: int = 10
    save_steps: int = 500
    save_total_limit: int = 2
    keep_checkpoints: bool = False
    dataloader_num_workers: int = 0
    dataset_num_proc: int | None = None
    disable_tqdm: bool = False

    def __post_init__(self):
        if isinstance(self.stages, str):
            self.stages = tuple(s.strip() for s in self.stages.split(",") if s.strip())
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown or not self.stages:
            raise MetaAlignerError(f'stages: "{",".join(self.stages)}" is not a comma list of {", ".join(STAGES)}')
        self.stages = tuple(s for s in STAGES if s in self.stages)
        for name in ("batch_size", "grad_accum", "logging_steps", "save_steps"):
            if int(getattr(self, name)) < 1:
                raise MetaAlignerError(f"{name} must be at least 1 (got {getattr(self, name)})")
        if self.max_length < 16:
            raise MetaAlignerError(f"max_length must be at least 16 tokens (got {self.max_length})")
        if self.max_steps is not None and self.max_steps < 1:
            raise MetaAlignerError(f"max_steps must be at least 1 (got {self.max_steps})")
        if self.effective_batch_size is not None and self.effective_batch_size < 1:
            raise MetaAlignerError(f"effective_batch_size must be at least 1 (got {self.effective_batch_size})")
        if not (self.lr > 0 and self.epochs > 0 and 0 <= self.warmup_ratio < 1):
            raise MetaAlignerError("lr and epochs must be positive and warmup_ratio in [0, 1)")
        if self.precision not in ("auto", "bf16", "fp16", "fp32"):
            raise MetaAlignerError(f'precision: "{self.precision}" (valid: auto, bf16, fp16, fp32)')
        if self.save_dtype not in ("auto", "bf16", "fp16", "fp32"):
            raise MetaAlignerError(f'save_dtype: "{self.save_dtype}" (valid: auto, bf16, fp16, fp32)')
        if int(self.ddp_timeout) < 60:
            raise MetaAlignerError(f"ddp_timeout must be at least 60 seconds (got {self.ddp_timeout})")
        if self.gradient_checkpointing is None:
            self.gradient_checkpointing = "auto"
        if self.gradient_checkpointing not in (True, False, "auto"):
            raise MetaAlignerError(f'gradient_checkpointing: "{self.gradient_checkpointing}" (valid: auto, true, false)')
        if not (isinstance(self.edit_weight, (int, float)) and 0 < self.edit_weight <= 1000):
            raise MetaAlignerError(f"edit_weight must be a number above 0 (at most 1000; got {self.edit_weight!r})")
        if self.lora_init is not None and not self.lora:
            raise MetaAlignerError("lora_init needs lora: true")
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", str(self.device)):
            raise MetaAlignerError(f'device: "{self.device}" (valid: auto, cuda, cuda:N, cpu, mps)')

    @classmethod
    def from_file(cls, path: str | os.PathLike, **overrides) -> "TrainConfig":
        """A recipe (YAML or JSON mapping of field names) with ``overrides`` applied on top."""
        path = Path(path)
        if not path.is_file():
            raise MetaAlignerError(f"{path}: no such recipe file")
        text = path.read_text(encoding="utf-8")
        try:
            if path.suffix == ".json":
                values = json.loads(text)
            else:
                import yaml

                values = yaml.safe_load(text)
        except Exception as e:  # yaml and json raise different types; both mean "not parseable"
            mark = getattr(e, "problem_mark", None)  # yaml: where; json: e.lineno
            line = mark.line + 1 if mark is not None else getattr(e, "lineno", None)
            raise InputError(path, line, None, f"not a valid recipe ({str(e).splitlines()[0]})") from None
        if not isinstance(values, dict):
            raise MetaAlignerError(f"{path}: expected a mapping of TrainConfig fields")
        types = {f.name: str(f.type) for f in dataclasses.fields(cls)}
        for key, value in values.items():
            if key not in types:
                raise InputError(path, None, key, f"unknown setting (valid: {', '.join(sorted(types))})")
            number = int if types[key].startswith("int") else float if types[key].startswith("float") else None
            if number is not None and isinstance(value, str):  # YAML reads 1e-5 (no dot) as a string
                try:
                    values[key] = number(value)
                except ValueError:
                    raise InputError(path, None, key, f"expected a number, got {value!r}") from None
            elif number is not None and value is not None and not isinstance(value, (int, float)):
                raise InputError(path, None, key, f"expected a number, got {value!r}")
        values.update({k: v for k, v in overrides.items() if v is not None})
        if "data" not in values:
            raise MetaAlignerError(f"{path}: no data directory (give --data)")
        if "base" not in values:
            raise MetaAlignerError(f"{path}: no base model (give --base)")
        return cls(**values)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["stages"] = list(self.stages)
        return d


# --------------------------------------------------------------------------------------------
# Tokenization of a training row (the prompt part is shared with inference).

def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids of an aligner prompt, exactly as inference encodes it (raw template string, no
    chat template, one BOS in front): :func:`metaaligner_core.inference.encode_aligner_prompt`."""
    from .inference import encode_aligner_prompt

    return encode_aligner_prompt(tokenizer, prompt)


def tokenize_example(tokenizer, prompt: str, completion: str, max_length: int | None = None) -> dict:
    """``{"input_ids", "labels"}`` for one row: prompt ids, then completion ids and EOS.

    Labels are -100 on the prompt, so the loss covers the completion and its EOS only. The
    completion is tokenized on its own, so the prompt's ids are exactly those of inference.
    Over ``max_length``: the completion keeps its first ``max(max_length - len(prompt),
    max_length // 2)`` tokens (it is never dropped; a cut completion loses its EOS), then the
    prompt loses tokens from its middle, keeping BOS and the instructions at its start and its
    last ``PROMPT_TAIL_TOKENS`` tokens (end of the answer and ``| Edit: ``).
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise MetaAlignerError("the tokenizer has no EOS token; the aligner could not learn to stop")
    p = prompt_ids(tokenizer, prompt)
    c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [eos]
    if max_length is not None and len(p) + len(c) > max_length:
        c = c[:min(len(c), max(max_length - len(p), max_length // 2))]
        room = max_length - len(c)
        if len(p) > room:
            tail = min(PROMPT_TAIL_TOKENS, room // 2)
            p = p[:room - tail] + (p[len(p) - tail:] if tail else [])
    return {"input_ids": p + c, "labels": [-100] * len(p) + c}


def edit_loss_weights(ids: Sequence[int], labels: Sequence[int], weight: float) -> list[float]:
    """Per position of one row: ``weight`` on the completion tokens (``labels`` not -100) that do
    not continue a copy of the prompt, 1.0 elsewhere.

    A completion token *continues a copy* when it and the token before it stand next to each
    other somewhere in the prompt (the rows' prompt tokens: ``labels`` -100): inside a stretch of
    the draft copied as it is. The others are the completion's decisions: its first token, the
    first token after a skipped or changed stretch, inserted tokens, and EOS (the place to stop).
    Pure bigram lookup, no alignment: a pair that also occurs elsewhere in the prompt counts as a
    copy. In a padding-free row (several examples in one sequence) the prompts of all of them count.
    """
    prompt = {(ids[t], ids[t + 1]) for t in range(len(ids) - 1) if labels[t] == -100 and labels[t + 1] == -100}
    out = [1.0] * len(ids)
    for t in range(1, len(ids)):
        if labels[t] != -100 and (ids[t - 1], ids[t]) not in prompt:
            out[t] = float(weight)
    return out


# --------------------------------------------------------------------------------------------
# Data

def stage_file(data_dir: Path, stage: str) -> Path:
    return data_dir / f"{stage}.jsonl"


def read_stage_rows(path: Path) -> list[dict]:
    """``[{"prompt", "completion"}]`` from one stage file; a bad row raises :class:`InputError`."""
    rows = []
    for line, rec in iter_records(path):
        for key in ("prompt", "completion"):
            if not isinstance(rec.get(key), str):
                raise InputError(path, line, key, "missing or not a string")
        if not rec["prompt"].strip():
            raise InputError(path, line, "prompt", "empty")
        rows.append({"prompt": rec["prompt"], "completion": rec["completion"]})
    return rows


def check_data_dir(data: str | os.PathLike, stages: Sequence[str]) -> dict[str, Path]:
    """The stage files to train on; a missing directory/file or all-empty stages is an error."""
    data_dir = Path(data)
    if not data_dir.is_dir():
        raise MetaAlignerError(f"{data_dir}: no such data directory (make one with `metaaligner build-dataset`)")
    files = {}
    for stage in stages:
        path = stage_file(data_dir, stage)
        if not path.is_file():
            raise MetaAlignerError(f"{path}: missing; {data_dir} is not a complete build-dataset output")
        files[stage] = path
    if all(_is_blank(p) for p in files.values()):
        names = ", ".join(p.name for p in files.values())
        raise MetaAlignerError(f"{data_dir}: nothing to train on ({names} all empty)")
    return files


def _is_blank(path: Path) -> bool:
    with open(path, "rb") as fh:
        return not any(line.strip() for line in fh)


def build_stage_dataset(rows: list[dict], tokenizer, max_length: int, num_proc: int | None = None):
    """A ``datasets.Dataset`` of ``input_ids`` and ``labels``, ready for the trainer."""
    import datasets

    ds = datasets.Dataset.from_list(rows)
    return ds.map(lambda r: tokenize_example(tokenizer, r["prompt"], r["completion"], max_length),
                  remove_columns=ds.column_names, num_proc=num_proc, desc="Tokenizing")


# --------------------------------------------------------------------------------------------
# Device-dependent settings

@dataclass
class Runtime:
    """What ``"auto"`` resolved to on this machine, recorded in ``OUT/config.json``."""

    device: str
    precision: str
    attn: str
    gradient_checkpointing: bool
    padding_free: bool
    group_by_length: bool
    world_size: int
    grad_accum: int
    distributed: str = "no"        # "fsdp", "deepspeed", "ddp" or "no": how the job was launched
    sync_each_batch: bool = False  # gradients reduced on every micro-batch (FSDP with accumulation)
    save_dtype: str = "fp32"       # dtype of the saved stage weights
    memory_estimate_gb: float | None = None  # per GPU without checkpointing (gradient_checkpointing: auto)


def launch_kind() -> str:
    """How accelerate (or torchrun) launched this process: fsdp, deepspeed, ddp or no."""
    def on(name: str) -> bool:
        return os.environ.get(name, "").lower() in ("1", "true", "yes")

    if on("ACCELERATE_USE_FSDP"):
        return "fsdp"
    if on("ACCELERATE_USE_DEEPSPEED"):
        return "deepspeed"
    return "ddp" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "no"


def resolve_runtime(config: TrainConfig) -> Runtime:
    from .models import auto_attention, auto_device

    device = auto_device(config.device)
    on_cuda = device.startswith("cuda")
    precision = config.precision
    if precision == "auto":
        import torch

        precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if on_cuda else "fp32"
    attn = auto_attention(device, config.attn)
    flash = attn.startswith("flash_attention")
    if config.padding_free and not flash:
        # Not for correctness: transformers 5.x keeps the flattened sequences apart with a
        # block-diagonal causal mask built from the restarting position_ids (tests/test_training.py
        # compares the losses). But that mask spans the whole flattened row, so attention costs
        # (sum of lengths)^2, and padding-free was not measured faster than length-grouped batches
        # with SDPA.
        raise MetaAlignerError(f"padding_free needs attn=flash_attention_2 (pip install flash-attn): with {attn} "
                               "the flattened sequences are kept apart by a mask over the whole flattened row "
                               "(attention over all its tokens), not measured faster than length-grouped batches")
    padding_free = flash if config.padding_free is None else config.padding_free
    kind = launch_kind()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    accum = config.grad_accum
    if config.effective_batch_size:
        per_step = config.batch_size * world
        accum = max(1, round(config.effective_batch_size / per_step))
        if accum * per_step != config.effective_batch_size:
            log.warning("effective batch %d is not a multiple of batch_size %d × %d processes; using %d",
                        config.effective_batch_size, config.batch_size, world, accum * per_step)
    sync = (kind == "fsdp" and accum > 1) if config.sync_each_batch is None else bool(config.sync_each_batch)
    estimate = None
    if config.gradient_checkpointing == "auto":
        checkpointing = False
        if on_cuda:
            estimate = memory_without_checkpointing(config, attn, precision, kind, world, sync)
            checkpointing = estimate * GB > device_memory_bytes(device)
    else:
        checkpointing = bool(config.gradient_checkpointing)
    grouped = (not padding_free) if config.group_by_length is None else config.group_by_length
    save_dtype = config.save_dtype if config.save_dtype != "auto" else (
        precision if precision in ("bf16", "fp16") else "fp32")
    return Runtime(device, precision, attn, checkpointing, padding_free, grouped, world, accum, kind, sync,
                   save_dtype, None if estimate is None else round(estimate, 1))


def device_memory_bytes(device: str) -> int:
    """Total memory of the CUDA device ``device`` (``cuda`` or ``cuda:N``)."""
    import torch

    index = int(device.split(":")[1]) if ":" in device else torch.cuda.current_device()
    return torch.cuda.get_device_properties(index).total_memory


def model_dims(spec: str) -> dict:
    """Parameters, hidden size, layers, heads and vocabulary of a model, from its config alone
    (the parameters are counted on a model built on the meta device: nothing is read or allocated)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from .models import resolve_pretrained

    name, extra = resolve_pretrained(spec)
    cfg = AutoConfig.from_pretrained(name, **extra)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(cfg)
    model.tie_weights()  # a tied output head is the embedding table, counted once
    text = cfg.get_text_config()
    return {"n_params": sum(p.numel() for p in model.parameters()), "hidden": text.hidden_size,
            "layers": text.num_hidden_layers, "heads": text.num_attention_heads, "vocab": text.vocab_size}


def memory_without_checkpointing(config: TrainConfig, attn: str, precision: str, kind: str, world: int,
                                 sync_each_batch: bool) -> float:
    """GB per GPU the run would need without gradient checkpointing, for full-length batches
    (:func:`metaaligner_core.hardware.train_memory_estimate`). LoRA is estimated as full
    fine-tuning (an upper bound: its gradients and optimizer states are tiny)."""
    dims = model_dims(config.base)
    est = train_memory_estimate(dims["n_params"], dims["hidden"], dims["layers"], dims["vocab"], config.batch_size,
                                config.max_length, strategy=kind, world=world, checkpointing=False,
                                sync_each_batch=sync_each_batch, heads=dims["heads"],
                                eager_attention=attn == "eager", act_bytes=4 if precision == "fp32" else 2)
    return est.total


def _sft_config(config: TrainConfig, rt: Runtime, output_dir: Path, n_rows: int):
    from trl import SFTConfig

    max_steps = -1
    if config.max_steps:
        per_epoch = math.ceil(math.ceil(n_rows / (config.batch_size * rt.world_size)) / rt.grad_accum)
        if config.max_steps < math.ceil(per_epoch * config.epochs):
            max_steps = config.max_steps
    return SFTConfig(
        output_dir=str(output_dir),
        num_train_epochs=config.epochs,
        max_steps=max_steps,
        learning_rate=config.lr,
        lr_scheduler_type=config.lr_scheduler,
        weight_decay=config.weight_decay,
        optim=config.optim,
        max_grad_norm=config.max_grad_norm,
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=rt.grad_accum,
        seed=config.seed,
        use_cpu=rt.device == "cpu",
        bf16=rt.precision == "bf16",
        fp16=rt.precision == "fp16",
        # Rows arrive tokenized and truncated by tokenize_example; TRL must not cut them again.
        max_length=None,
        packing=False,
        padding_free=rt.padding_free,
        completion_only_loss=True,
        **_renamed_args(SFTConfig, rt, config.warmup_ratio),
        include_num_input_tokens_seen="all" if rt.padding_free else "non_padding",
        logging_steps=config.logging_steps,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        report_to="none",
        disable_tqdm=config.disable_tqdm,
        dataloader_num_workers=config.dataloader_num_workers,
        dataloader_pin_memory=rt.device.startswith("cuda"),
        dataset_num_proc=config.dataset_num_proc,
        ddp_timeout=config.ddp_timeout,
        # FSDP: reduce-scatter every micro-batch, so no full unsharded gradients pile up between
        # them (accelerate's documented remedy; the Trainer passes these kwargs to its plugin).
        accelerator_config={"gradient_accumulation_kwargs": {"sync_each_batch": True}} if rt.sync_each_batch else None,
    )


def _renamed_args(config_cls, rt: Runtime, warmup_ratio: float) -> dict:
    """Arguments whose names changed within transformers 5.x, in the form this version takes."""
    names = {f.name for f in dataclasses.fields(config_cls)}
    on = rt.gradient_checkpointing
    prefix = "activation" if "activation_checkpointing" in names else "gradient"  # old name warns
    out = {f"{prefix}_checkpointing": on, f"{prefix}_checkpointing_kwargs": {"use_reentrant": False} if on else None}
    if "train_sampling_strategy" in names:
        out["train_sampling_strategy"] = "group_by_length" if rt.group_by_length else "random"
    else:
        out["group_by_length"] = rt.group_by_length
    if "warmup_ratio" in names:
        out["warmup_ratio"] = warmup_ratio
    else:
        out["warmup_steps"] = warmup_ratio  # a float below 1 is a ratio of the stage's steps
    return out


# --------------------------------------------------------------------------------------------
# Trainer

def _metrics_callback(metrics_path: Path, stage: str):
    from transformers import TrainerCallback

    class StageMetrics(TrainerCallback):
        """Append one ``{"stage", "step", "loss", ...}`` line per logged training step."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs or "loss" not in logs:
                return
            record = {"stage": stage, "step": state.global_step, "loss": logs["loss"]}
            record.update({k: v for k, v in logs.items() if k not in record})
            with open(metrics_path, "a", encoding="utf-8") as fh:
                fh.write(dumps(record) + "\n")

    return StageMetrics()


def _no_final_checkpoint_callback():
    from transformers import TrainerCallback

    class NoFinalCheckpoint(TrainerCallback):
        """Skip the checkpoint the trainer writes after the last step: the stage's weights are saved
        next anyway, and for a 7B model the optimizer states alone are ~80 GB."""

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= state.max_steps:
                control.should_save = False

    return NoFinalCheckpoint()


def _env_on(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


def rank0_loads_for_all() -> bool:
    """An FSDP launch with ``fsdp_cpu_ram_efficient_loading``: accelerate replaces the weights of
    every rank but rank 0 by rank 0's when it shards the model (``fsdp2_load_full_state_dict``
    broadcasts them; FSDP1's ``sync_module_states`` does the same), so only rank 0 needs to read
    them. transformers 5.x does not skip the read on the other ranks by itself (only under
    DeepSpeed ZeRO-3), so :func:`load_model` builds them from the config on the meta device."""
    return (_env_on("FSDP_CPU_RAM_EFFICIENT_LOADING") and int(os.environ.get("WORLD_SIZE", "1")) > 1
            and fsdp_in_effect())


def fsdp_in_effect() -> bool:
    """An FSDP launch that accelerate will run as FSDP: it does so only on an accelerator; on CPUs
    the launch runs as MULTI_CPU (plain data parallel), where nothing would replace empty weights
    or upcast bf16 ones to fp32 master weights."""
    if launch_kind() != "fsdp":
        return False
    from accelerate import PartialState

    return PartialState().distributed_type.value != "MULTI_CPU"


def load_dtype(config: TrainConfig, rt: Runtime):
    """The dtype the weights are read in.

    fp32 master weights for full fine-tuning in one process or DDP (the trainer keeps the model's
    dtype as master dtype there). Under FSDP with bf16/fp16 mixed precision accelerate upcasts the
    trainable parameters to fp32 itself when it shards them, so the weights are read in the
    training precision: half the bytes read and held on rank 0. LoRA keeps the frozen base in the
    training precision."""
    import torch

    low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(rt.precision)
    if low is not None and (config.lora or fsdp_in_effect()):
        return low
    return torch.float32


def load_model(spec: str | os.PathLike, config: TrainConfig, rt: Runtime):
    """The causal LM to train, on CPU (the trainer places it), in :func:`load_dtype`.

    Under an FSDP launch with ``fsdp_cpu_ram_efficient_loading`` (:func:`rank0_loads_for_all`),
    ranks other than 0 never open the weight files: they build the model from its config with
    its parameters on the meta device (buffers such as rotary frequencies are computed as usual,
    since FSDP does not broadcast non-persistent buffers), and receive rank 0's weights when
    accelerate shards the model."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from .models import resolve_pretrained

    name, extra = resolve_pretrained(str(spec))
    dtype = load_dtype(config, rt)
    try:
        if rank0_loads_for_all() and int(os.environ.get("RANK", "0")) != 0 and "gguf_file" not in extra:
            from accelerate import init_empty_weights

            model_config = AutoConfig.from_pretrained(name, **extra)
            with init_empty_weights(include_buffers=False):
                model = AutoModelForCausalLM.from_config(model_config, dtype=dtype, attn_implementation=rt.attn)
        else:
            model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, attn_implementation=rt.attn, **extra)
    except (OSError, ValueError) as e:
        raise MetaAlignerError(f'cannot load model "{spec}": {str(e).splitlines()[0]}') from None
    model.config.use_cache = False  # no KV cache in training (restored before the weights are saved)
    return model


def make_trainer(config: TrainConfig, rt: Runtime, model, tokenizer, dataset, output_dir: Path,
                 callbacks: Iterable = (), args=None, start_adapter: str | None = None):
    """The ``SFTTrainer`` for one stage (``args``: its ``SFTConfig``, built here when not given).

    ``start_adapter``: a PEFT LoRA adapter directory that the stage keeps training (its weights
    loaded trainable; see ``TrainConfig.lora_init``) instead of a new adapter."""
    from trl import SFTTrainer

    peft_config = None
    if config.lora and start_adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(start_adapter), is_trainable=True)
    elif config.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                                 target_modules=config.lora_target_modules, task_type="CAUSAL_LM")
    args = args or _sft_config(config, rt, output_dir, len(dataset))
    trainer_class = SFTTrainer if config.edit_weight == 1 else _edit_weighted_trainer(SFTTrainer, config.edit_weight)
    trainer = trainer_class(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                            peft_config=peft_config, callbacks=[_no_final_checkpoint_callback(), *callbacks])
    _fp32_gradient_reduction(trainer, rt)
    return trainer


def _edit_weighted_trainer(base, weight: float):
    """``base`` (TRL's ``SFTTrainer``) with a training loss that weights each completion token by
    :func:`edit_loss_weights` with ``weight`` (``TrainConfig.edit_weight``). It asks the model for per-token
    log-probabilities through TRL's fused LM head (``model(..., fused_lm_head=True)``, as
    ``SFTTrainer`` does itself) and divides the weighted sum by the same token count TRL uses
    (``num_items_in_batch``), so gradient accumulation and several processes work as they do
    there. TRL's entropy and token-accuracy metrics are not logged on this path."""
    import torch

    class EditWeightedSFTTrainer(base):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if return_outputs or not model.training:  # evaluation: TRL's own loss and outputs
                return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                            num_items_in_batch=num_items_in_batch)
            ids, labels = inputs["input_ids"], inputs["labels"]
            weights = torch.tensor([edit_loss_weights(i, lab, weight)
                                    for i, lab in zip(ids.tolist(), labels.tolist())], device=ids.device)
            inputs["use_cache"] = False
            outputs = model(**inputs, fused_lm_head=True)  # log_probs[:, t] scores labels[:, t + 1]
            count = outputs.label_mask.sum() if num_items_in_batch is None else num_items_in_batch
            loss = -(outputs.log_probs.float() * weights[:, 1:]).sum() / torch.as_tensor(count).clamp(min=1)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * (self.accelerator.num_processes // self.get_tp_size())
            return loss

    return EditWeightedSFTTrainer


def _fp32_gradient_reduction(trainer, rt: Runtime) -> None:
    """Under FSDP with bf16/fp16 mixed precision, reduce-scatter gradients in fp32.

    accelerate's FSDP plugin sets ``reduce_dtype`` to the compute dtype; with gradient
    accumulation over 32-64 micro-batches (each reduced when ``sync_each_batch`` is on) the sums
    then lose bits at every step. The policy is read when the trainer shards the model (at
    ``train()``), so setting it here takes effect."""
    import torch

    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(rt.precision)
    if plugin is None or low is None:
        return
    if getattr(plugin, "fsdp_version", 1) == 2:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        plugin.mixed_precision_policy = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32)
    else:
        from torch.distributed.fsdp import MixedPrecision

        buffers = getattr(plugin.mixed_precision_policy, "buffer_dtype", None) or low
        plugin.mixed_precision_policy = MixedPrecision(param_dtype=low, reduce_dtype=torch.float32,
                                                       buffer_dtype=buffers)


# --------------------------------------------------------------------------------------------
# The three stages

def is_main_process() -> bool:
    """Rank 0 (or a single process): the one that writes shared files and prints."""
    return int(os.environ.get("RANK", "0")) == 0


def _barrier() -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        PartialState().wait_for_everyone()


def init_distributed(timeout_s: int) -> None:
    """Create the process group now, with ``timeout_s`` for every collective.

    The timeout only takes effect when the group is created, and the first barrier (or the first
    TrainingArguments) creates it: later ``ddp_timeout`` values are ignored by a group that
    exists. A single process creates nothing."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    from datetime import timedelta

    import torch.distributed as dist
    from accelerate import PartialState

    if dist.is_available() and dist.is_initialized():
        log.warning("the process group already exists; its timeout is not changed to %d s", timeout_s)
        return
    PartialState(timeout=timedelta(seconds=int(timeout_s)))


_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _save_full_model(trainer, stage_dir: Path, tokenizer, save_dtype: str) -> None:
    """The stage's full weights in ``save_dtype`` (a plain model directory).

    Under FSDP the trainer would write the gathered fp32 master weights (52 GB for 13B); here
    the gathered state dict (all ranks take part; rank 0 receives it, on CPU) is cast before it
    is written. DeepSpeed ZeRO-3 gathers 16-bit weights itself (``zero3_save_16bit_model``).
    """
    import torch

    dtype = getattr(torch, _DTYPES[save_dtype])
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    fsdp = trainer.accelerator.distributed_type.value == "FSDP"
    if not fsdp and next(unwrapped.parameters()).dtype == dtype:
        trainer.save_model(str(stage_dir))  # already in the wanted dtype: the trainer's own path
        return
    state_dict = trainer.accelerator.get_state_dict(trainer.model_wrapped)
    if trainer.accelerator.is_main_process:
        state_dict = {k: (v.to(dtype) if torch.is_floating_point(v) else v) for k, v in state_dict.items()}
        unwrapped.save_pretrained(str(stage_dir), state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(str(stage_dir))
        _set_config_dtype(stage_dir, save_dtype)
    del state_dict


def _save_adapter(trainer, adapter_dir: Path) -> None:
    """The stage's LoRA adapter. Under FSDP with ``SHARDED_STATE_DICT`` the trainer's own
    ``save_model`` writes no weights (only its sharded checkpoints), so the full state dict is
    gathered (all ranks take part) and rank 0 writes the adapter from it."""
    if trainer.accelerator.distributed_type.value != "FSDP":
        trainer.save_model(str(adapter_dir))
        return
    state_dict = trainer.accelerator.get_state_dict(trainer.model_wrapped)
    if trainer.accelerator.is_main_process:
        trainer.accelerator.unwrap_model(trainer.model).save_pretrained(str(adapter_dir), state_dict=state_dict)
    del state_dict


def _set_config_dtype(model_dir: Path, save_dtype: str) -> None:
    """config.json names the dtype of the saved weights (save_pretrained writes the in-memory one)."""
    path = Path(model_dir) / "config.json"
    cfg = json.loads(path.read_text(encoding="utf-8"))
    cfg["dtype"] = _DTYPES[save_dtype]
    with atomic_write(path) as fh:
        json.dump(cfg, fh, indent=2, sort_keys=True)
        fh.write("\n")


def release_memory() -> None:
    """Free what a finished stage held before the next one loads its model: the trainer's
    accelerator has dropped its references (``free_memory``), the stage's objects are out of
    scope, and this collects the reference cycles among them (the trainer, its callbacks, the
    wrapped model) and returns cached CUDA blocks. Without it, three stages in one process hold
    the previous stages' weights, gradients and optimizer states; a DeepSpeed engine is only
    destroyed by ``free_memory``."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def stage_done(out: Path, stage: str) -> bool:
    return (out / stage / STAGE_MARKER).is_file()


def _check_resumable(out: Path, config: TrainConfig) -> None:
    """Refuse to resume into OUT with settings that would train something else."""
    path = out / "config.json"
    if not path.is_file():
        return
    try:
        old = json.loads(path.read_text(encoding="utf-8")).get("config", {})
    except (json.JSONDecodeError, AttributeError):
        raise MetaAlignerError(f"{path}: unreadable; use a new --out") from None
    new = config.to_dict()
    for key, value in new.items():
        if key not in RESUME_NEUTRAL and key in old and old[key] != value:
            raise MetaAlignerError(f"{out} holds a run with {key}={old[key]!r}, not {value!r}: "
                                   "rerun with the same settings to resume, or use a new --out")


def _drop_metrics_after(metrics_path: Path, stage: str, step: int) -> None:
    """Forget the lines an interrupted stage logged after its last checkpoint (they are redone)."""
    if not metrics_path.is_file():
        return
    lines = metrics_path.read_text(encoding="utf-8").splitlines()
    kept = [ln for ln in lines if ln.strip() and not _logged_after(ln, stage, step)]
    if len(kept) != len(lines):
        with atomic_write(metrics_path) as fh:
            fh.write("".join(ln + "\n" for ln in kept))


def _logged_after(line: str, stage: str, step: int) -> bool:
    try:
        rec = json.loads(line)
    except json.JSONDecodeError:  # a line cut short by the interruption: dropped, its step is redone
        return True
    return rec.get("stage") == stage and rec.get("step", 0) > step


def _link_or_copy(src, dst):
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _publish_final(out: Path, stage: str) -> Path:
    """OUT/final := OUT/<stage> (hard links where possible), replaced atomically."""
    final, tmp = out / "final", out / ".final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(out / stage, tmp, copy_function=_link_or_copy,
                    ignore=shutil.ignore_patterns(CHECKPOINTS, ADAPTER, STAGE_MARKER))
    old = out / ".final.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def _merge_lora(prev: str, adapter_dir: Path, stage_dir: Path, tokenizer, save_dtype: str = "fp32") -> None:
    """Fold the stage's adapter into the previous weights, so the stage directory is a plain model."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from .models import resolve_pretrained

    name, extra = resolve_pretrained(prev)
    base = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32, **extra)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.to(getattr(torch, _DTYPES[save_dtype])).save_pretrained(stage_dir)  # merged in fp32, saved as trained
    tokenizer.save_pretrained(stage_dir)


def _run_stage(stage: str, rows: list[dict], start_from: str, config: TrainConfig, rt: Runtime, tokenizer,
               out: Path, callbacks: Sequence) -> dict:
    """Train one stage, save it, and release everything it held (see :func:`release_memory`)."""
    try:
        return _train_stage(stage, rows, start_from, config, rt, tokenizer, out, callbacks)
    finally:
        release_memory()  # the stage's trainer and model are out of scope here


def _train_stage(stage: str, rows: list[dict], start_from: str, config: TrainConfig, rt: Runtime, tokenizer,
                 out: Path, callbacks: Sequence) -> dict:
    from transformers.trainer_utils import get_last_checkpoint

    stage_dir = out / stage
    ckpt_dir = stage_dir / CHECKPOINTS
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    resume = get_last_checkpoint(str(ckpt_dir))
    if is_main_process():
        done_steps = int(Path(resume).name.split("-")[-1]) if resume else 0
        _drop_metrics_after(out / "metrics.jsonl", stage, done_steps)
    if resume:
        log.info("%s: resuming from %s", stage, resume)
    _barrier()

    dataset = build_stage_dataset(rows, tokenizer, config.max_length, config.dataset_num_proc)
    n_cut = sum(1 for ids in dataset["input_ids"] if len(ids) >= config.max_length)
    if n_cut:
        log.info("%s: %d of %d rows at the %d-token limit (long rows are shortened)",
                 stage, n_cut, len(rows), config.max_length)
    # The training arguments first: creating them sets up the distributed state, which lets
    # from_pretrained load shard-aware (FSDP rank-0 loading, DeepSpeed ZeRO-3 init).
    args = _sft_config(config, rt, ckpt_dir, len(dataset))
    model = load_model(start_from, config, rt)
    trainer = make_trainer(config, rt, model, tokenizer, dataset, ckpt_dir,
                           [_metrics_callback(out / "metrics.jsonl", stage), *callbacks], args=args,
                           start_adapter=config.lora_init)
    result = trainer.train(resume_from_checkpoint=resume)

    trainer.accelerator.unwrap_model(trainer.model).config.use_cache = True  # saved for inference
    if config.lora:
        _save_adapter(trainer, stage_dir / ADAPTER)
        _barrier()
        if is_main_process():
            _merge_lora(start_from, stage_dir / ADAPTER, stage_dir, tokenizer, rt.save_dtype)
    else:
        _save_full_model(trainer, stage_dir, tokenizer, rt.save_dtype)
    summary = {"stage": stage, "rows": len(rows), "steps": trainer.state.global_step,
               "train_loss": result.training_loss, "started_from": str(start_from),
               "resumed_from": Path(resume).name if resume else None,
               **{k: v for k, v in result.metrics.items() if k != "train_loss"}}
    # accelerate asks for this between trainings: it drops the accelerator's references to the
    # model, optimizer, scheduler and dataloaders and destroys a DeepSpeed engine.
    trainer.accelerator.free_memory()
    trainer.model = trainer.model_wrapped = trainer.optimizer = trainer.lr_scheduler = None
    del model, trainer, result, dataset
    _barrier()
    if is_main_process():
        with atomic_write(stage_dir / STAGE_MARKER) as fh:
            json.dump(summary, fh, indent=2)
        if not config.keep_checkpoints:
            shutil.rmtree(ckpt_dir, ignore_errors=True)
        shutil.rmtree(stage_dir / ADAPTER, ignore_errors=True)
    _barrier()
    return summary


def train(config: TrainConfig, callbacks: Sequence = ()) -> Path:
    """Run the stages of ``config`` in order and return ``OUT/final``.

    Finished stages (``OUT/<stage>/stage.json``) are skipped; an unfinished stage resumes from its
    last checkpoint. An empty stage file is skipped with a warning. ``callbacks`` are extra
    ``transformers.TrainerCallback`` objects given to every stage's trainer.
    """
    from .models import load_tokenizer

    if not is_main_process():
        log.setLevel(logging.WARNING)  # one copy of the progress messages, from rank 0
    init_distributed(config.ddp_timeout)  # first: the timeout is fixed when the process group is made
    files = check_data_dir(config.data, config.stages)
    config = dataclasses.replace(config, data=str(Path(config.data).resolve()))
    if config.lora_init is not None:
        init = Path(config.lora_init).resolve()
        if not (init / "adapter_config.json").is_file():
            raise MetaAlignerError(f'lora_init: "{config.lora_init}" is not a PEFT adapter directory '
                                   "(no adapter_config.json)")
        config = dataclasses.replace(config, lora_init=str(init))
    out = Path(config.out)
    _check_resumable(out, config)
    tokenizer = load_tokenizer(config.base)  # also proves early that the base model exists
    rt = resolve_runtime(config)
    log.info("training on %s (%s, %s%s%s), %d process(es), grad_accum %d", rt.device, rt.precision, rt.attn,
             ", padding-free" if rt.padding_free else "", ", length-grouped" if rt.group_by_length else "",
             rt.world_size, rt.grad_accum)

    stage_rows = {}
    for stage, path in files.items():
        rows = read_stage_rows(path)
        if rows:
            stage_rows[stage] = rows
        else:
            log.warning("%s: empty; skipping the %s stage", path, stage)

    if is_main_process():
        out.mkdir(parents=True, exist_ok=True)
        import torch
        import transformers
        import trl

        init_adapter = {}
        if config.lora_init is not None:  # what the first stage trains, in place of lora_r & co.
            adapter = json.loads((Path(config.lora_init) / "adapter_config.json").read_text(encoding="utf-8"))
            init_adapter = {"lora_init_adapter": {k: adapter.get(k) for k in (
                "r", "lora_alpha", "lora_dropout", "target_modules", "layers_to_transform")}}
        with atomic_write(out / "config.json") as fh:
            json.dump({"config": config.to_dict(), **init_adapter, "runtime": dataclasses.asdict(rt),
                       "rows": {s: len(r) for s, r in stage_rows.items()},
                       "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                                    "trl": trl.__version__}}, fh, indent=2)
    _barrier()

    start_from, last = config.base, None
    first = next(iter(stage_rows), None)  # the first stage with rows: the one lora_init starts
    for stage, rows in stage_rows.items():
        if stage_done(out, stage):
            log.info("%s: already trained (%s); skipping", stage, out / stage / STAGE_MARKER)
        else:
            log.info("%s: %d rows, starting from %s", stage, len(rows), start_from)
            stage_config = config if stage == first else dataclasses.replace(config, lora_init=None)
            summary = _run_stage(stage, rows, start_from, stage_config, rt, tokenizer, out, callbacks)
            log.info("%s: done, %d steps, train loss %.4f", stage, summary["steps"], summary["train_loss"])
        start_from, last = str(out / stage), stage

    final = out / "final"
    if is_main_process():
        _publish_final(out, last)
    _barrier()
    log.info("aligner written to %s", final)
    return final

