"""Run under ``accelerate launch`` by tests/test_training.py (not a test module itself).

``stages DATA BASE OUT REPORT``: the three-stage training, recording which earlier stages' models
and optimizers (seen by a callback) are still alive when each stage loads its model and starts. Automatic garbage
collection is off, so only the training code's own teardown can free them.
``args BASE OUT REPORT``: build one stage's training arguments and trainer as ``train`` does and
report the gradient-synchronisation setting the trainer's accelerator received.
``fsdp DATA BASE OUT REPORT [full|lora [STAGE STEP]]``: the three stages in bf16 under an FSDP launch, on CPU
(see :func:`fsdp_on_cpu`), recording every weight file each rank opens and what the trainer's
accelerator used; with STAGE STEP, stop like Ctrl-C once that stage has logged that step.
"""
import gc
import json
import os
import sys
import weakref

gc.disable()

OPENED = []  # every safetensors file this process opened, in order


def count_weight_reads():
    """Record each weight file opened through safetensors (transformers reads weights with
    ``safetensors.safe_open``, bound when ``transformers.modeling_utils`` is imported, so this
    runs before transformers is imported)."""
    import safetensors
    import safetensors.torch

    real_open, real_load = safetensors.safe_open, safetensors.torch.load_file

    def safe_open(filename, *args, **kwargs):
        OPENED.append(os.path.realpath(filename))
        return real_open(filename, *args, **kwargs)

    def load_file(filename, *args, **kwargs):
        OPENED.append(os.path.realpath(filename))
        return real_load(filename, *args, **kwargs)

    safetensors.safe_open = safe_open
    safetensors.torch.load_file = load_file


count_weight_reads()

import torch.distributed as dist  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from metaaligner_core.training import (TrainConfig, load_model, make_trainer, resolve_runtime,  # noqa: E402
                                       _sft_config, train)


def timeout_seconds():
    if not (dist.is_available() and dist.is_initialized()):
        return None
    import torch

    backend = dist.distributed_c10d._get_default_group()._get_backend(torch.device("cpu"))
    return backend.options._timeout.total_seconds()


def stages(data, base, out, report):
    import metaaligner_core.training as training

    refs, events, before_load = [], [], []
    load_model = training.load_model

    def watched_load_model(*args, **kwargs):
        # The moment a stage loads its model: everything of the earlier stages must be gone by now.
        before_load.append([name for name, r in refs if r() is not None])
        return load_model(*args, **kwargs)

    training.load_model = watched_load_model

    class Watch(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
            events.append({"alive": [name for name, r in refs if r() is not None]})
            n = len(events)
            refs.append((f"model of stage {n}", weakref.ref(model)))
            if optimizer is not None:
                refs.append((f"optimizer of stage {n}", weakref.ref(optimizer)))

    cfg = TrainConfig(data=data, base=base, out=out, device="cpu", max_steps=2, batch_size=2, grad_accum=2,
                      max_length=64, logging_steps=1, save_steps=100, ddp_timeout=1234, disable_tqdm=True,
                      epochs=1, lr=1e-3, warmup_ratio=0.0)  # one step per stage: no warm-up, or lr is 0
    final = train(cfg, callbacks=[Watch()])
    result = {"rank": int(os.environ.get("RANK", 0)), "world": int(os.environ.get("WORLD_SIZE", 1)),
              "events": events, "alive_before_load": before_load, "alive_at_end": [name for name, r in refs if r() is not None],
              "timeout_s": timeout_seconds(), "final": str(final)}
    with open(f"{report}.{result['rank']}", "w") as fh:
        json.dump(result, fh)


def args_only(base, out, report):
    import datasets

    cfg = TrainConfig(data=".", base=base, out=out, device="cpu", batch_size=1, grad_accum=4, max_length=64,
                      disable_tqdm=True)
    rt = resolve_runtime(cfg)
    args = _sft_config(cfg, rt, __import__("pathlib").Path(out), 8)
    from metaaligner_core.models import load_tokenizer

    tok = load_tokenizer(base)
    ds = datasets.Dataset.from_list([{"input_ids": [1, 5, 6, 2], "labels": [-100, 5, 6, 2]}] * 8)
    trainer = make_trainer(cfg, rt, load_model(base, cfg, rt), tok, ds, __import__("pathlib").Path(out), args=args)
    result = {"rank": int(os.environ.get("RANK", 0)), "launch": rt.distributed, "sync_each_batch": rt.sync_each_batch,
              "args_kwargs": args.accelerator_config.gradient_accumulation_kwargs,
              "plugin_kwargs": dict(trainer.accelerator.gradient_state.plugin_kwargs),
              "distributed_type": str(trainer.accelerator.distributed_type)}
    with open(f"{report}.{result['rank']}", "w") as fh:
        json.dump(result, fh)


def fsdp_on_cpu():
    """Let accelerate run FSDP on these CPU processes.

    Without a GPU accelerate makes a CPU launch MULTI_CPU and ignores the FSDP plugin
    (``AcceleratorState`` turns only accelerator launches into FSDP; ``load_model`` builds empty
    models on ranks > 0 only when the state is not MULTI_CPU). PyTorch's FSDP2 itself runs
    on CPU over gloo, so this gives the state the FSDP type and plugin, as it would on GPUs; the
    rest (wrapping, rank-0 loading, mixed precision, sharded checkpoints) is accelerate's own code."""
    import accelerate.state as state
    from accelerate.utils import DistributedType

    partial_init, init = state.PartialState.__init__, state.AcceleratorState.__init__

    def partial_patched(self, *args, **kwargs):
        partial_init(self, *args, **kwargs)
        if self.distributed_type == DistributedType.MULTI_CPU:  # as on GPUs: not MULTI_CPU
            self.distributed_type = DistributedType.FSDP

    def patched(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type in (DistributedType.MULTI_CPU, DistributedType.FSDP):
            self.distributed_type = DistributedType.FSDP
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin
            state.PartialState._shared_state["distributed_type"] = self.distributed_type  # as accelerate does

    state.PartialState.__init__ = partial_patched
    state.AcceleratorState.__init__ = patched


def fsdp(data, base, out, report, lora="full", stop_stage=None, stop_step=None):
    from metaaligner_core import training

    fsdp_on_cpu()
    seen = {}

    class Seen(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            from accelerate import PartialState
            from accelerate.state import AcceleratorState

            acc = AcceleratorState()
            policy = acc.fsdp_plugin.mixed_precision_policy if acc.fsdp_plugin else None
            seen.update(distributed_type=str(acc.distributed_type), state_dict_type=str(
                acc.fsdp_plugin.state_dict_type) if acc.fsdp_plugin else None,
                param_dtype=str(getattr(policy, "param_dtype", None)),
                reduce_dtype=str(getattr(policy, "reduce_dtype", None)),
                sharded=type(next(model.parameters())).__name__, rank=PartialState().process_index)

    loaded = []
    load_model = training.load_model

    def watched_load_model(*args, **kwargs):
        model = load_model(*args, **kwargs)
        p = next(model.parameters())
        loaded.append({"device": str(p.device), "dtype": str(p.dtype)})
        return model

    training.load_model = watched_load_model

    class Stop(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if stop_stage and f"/{stop_stage}/" in args.output_dir + "/" and state.global_step == int(stop_step):
                raise KeyboardInterrupt

    rank = int(os.environ.get("RANK", 0))
    cfg = TrainConfig(data=data, base=base, out=out, device="cpu", precision="bf16", max_steps=2, batch_size=2,
                      grad_accum=2, max_length=64, logging_steps=1, save_steps=1, disable_tqdm=True, epochs=1,
                      lr=1e-3, warmup_ratio=0.0, lora=lora == "lora", lora_r=4, lora_alpha=8)
    result = {"rank": rank, "opened": OPENED, "loaded": loaded, "seen": seen}
    try:
        result["final"] = str(train(cfg, callbacks=[Seen(), Stop()]))
    except KeyboardInterrupt:
        result["stopped"] = True
    with open(f"{report}.{rank}", "w") as fh:
        json.dump(result, fh)


if __name__ == "__main__":
    {"stages": stages, "args": args_only, "fsdp": fsdp}[sys.argv[1]](*sys.argv[2:])
