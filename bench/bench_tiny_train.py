"""Benchmark: training modes for the tiny aligner on this CPU — full fine-tuning vs LoRA on every
layer, fp32 vs bf16 autocast — through the real trainer of ``metaaligner train``.

    .venv/bin/python bench/bench_tiny_train.py --data RUN/data/dataset [--steps 4] [--rounds 2]

Each mode builds its ``SFTTrainer`` exactly as ``metaaligner train`` does (``load_model``,
``make_trainer``: the collator, the length-grouped sampler, accelerate's autocast for bf16, the
optimizer) on the same preference rows of the tiny aligner's data, and runs ``trainer.train()`` for
``skip + steps`` optimizer steps; a callback times the steps after ``skip`` and counts their real
(non-padding) tokens from the trainer's own count. Modes run in turn, ``--rounds`` times, so that
load from other processes hits every mode alike; the table gives each mode's median tokens/s and
its ratio to full fp32 from the same run.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from metaaligner_core.training import (TrainConfig, build_stage_dataset, load_model, make_trainer,  # noqa: E402
                                       read_stage_rows, release_memory, resolve_runtime)

MODES = {
    "full fp32": dict(lora=False, precision="fp32", lr=5e-5),
    "full bf16": dict(lora=False, precision="bf16", lr=5e-5),
    "lora-all r32 fp32": dict(lora=True, lora_r=32, lora_alpha=64, lora_target_modules="all-linear",
                              precision="fp32", lr=3e-4),
    "lora-all r32 bf16": dict(lora=True, lora_r=32, lora_alpha=64, lora_target_modules="all-linear",
                              precision="bf16", lr=3e-4),
}


def run_mode(name: str, rows: list[dict], tokenizer, args) -> float:
    from transformers import TrainerCallback

    with tempfile.TemporaryDirectory() as tmp:
        config = TrainConfig(data=args.data, base="default", out=tmp, batch_size=args.batch_size,
                             max_length=args.max_length, max_steps=args.skip + args.steps, epochs=1,
                             logging_steps=1000, save_steps=10**6, disable_tqdm=True, optim="adamw_torch",
                             **MODES[name])
        rt = resolve_runtime(config)
        dataset = build_stage_dataset(rows, tokenizer, config.max_length)
        model = load_model("default", config, rt)
        clock = {"t": 0.0, "spent": 0.0, "tokens0": 0, "tokens": 0}

        class Timer(TrainerCallback):
            def on_step_begin(self, a, state, control, **kw):
                clock["t"] = time.perf_counter()
                if state.global_step == args.skip:
                    clock["tokens0"] = state.num_input_tokens_seen

            def on_step_end(self, a, state, control, **kw):
                if state.global_step > args.skip:
                    clock["spent"] += time.perf_counter() - clock["t"]
                clock["tokens"] = state.num_input_tokens_seen

        trainer = make_trainer(config, rt, model, tokenizer, dataset, Path(tmp), [Timer()])
        trainer.train()
        del trainer, model
        release_memory()
    return (clock["tokens"] - clock["tokens0"]) / clock["spent"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="the tiny aligner's data folder (build_data.py OUT/dataset)")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per mode and round")
    ap.add_argument("--skip", type=int, default=1, help="untimed first steps per mode and round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=640)
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of: " + ", ".join(MODES))
    args = ap.parse_args(argv)

    import torch
    from transformers import AutoTokenizer

    from metaaligner_core.embedded import embedded_model_dir

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir())
    rows = read_stage_rows(Path(args.data) / "preference.jsonl")[:args.batch_size * 60]
    modes = [m.strip() for m in args.modes.split(",")]
    rates: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(args.rounds):
        for m in modes:
            rates[m].append(run_mode(m, rows, tokenizer, args))
            print(f"round {r + 1}: {m:<20} {rates[m][-1]:7.1f} real tokens/s", flush=True)
    base = statistics.median(rates[modes[0]])
    print(f"\n{'mode':<20}{'tokens/s (median)':>20}{'vs ' + modes[0]:>16}")
    for m in modes:
        med = statistics.median(rates[m])
        print(f"{m:<20}{med:>20.1f}{med / base:>15.2f}x")
    print(json.dumps({m: rates[m] for m in modes}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
