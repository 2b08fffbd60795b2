"""``metaaligner train``: three-stage fine-tuning of the aligner on a build-dataset directory."""
from __future__ import annotations

import argparse
import dataclasses


def register(sub) -> None:
    p = sub.add_parser(
        "train", help="fine-tune an aligner: warm-up, equal, preference stages",
        description="Fine-tune an aligner in three stages (warm-up → equal → preference), each starting from "
                    "the previous stage's weights. Rerunning the same command resumes an interrupted run. "
                    "Multi-GPU: accelerate launch --config_file training/accelerate/... -m metaaligner_core train ...")
    p.add_argument("--data", required=True, metavar="DIR", help="a build-dataset output directory")
    p.add_argument("--base", metavar="MODEL",
                   help='model to start from: HF id, local dir, .gguf file or "default" (required unless --config sets it)')
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (OUT/final is the trained aligner)")
    add_train_options(p)
    p.set_defaults(func=run)


def add_train_options(p) -> None:
    """The options of ``train`` besides --data/--base/--out (``annotate train`` takes them too)."""
    p.add_argument("--config", metavar="FILE", help="a recipe (YAML/JSON of TrainConfig fields, e.g. training/recipes/"
                   "metaaligner-1.1b.yaml); the flags below override it")
    p.add_argument("--stages", help="comma list of warmup,equal,preference (default: all three)")
    p.add_argument("--lora", action=argparse.BooleanOptionalAction, default=None,
                   help="train LoRA adapters (merged after each stage) instead of all weights")
    p.add_argument("--epochs", type=float, help="epochs per stage (default 2)")
    p.add_argument("--lr", type=float, help="peak learning rate (default 1e-5)")
    p.add_argument("--max-length", type=int, metavar="N", help="tokens per sequence (default 2048)")
    p.add_argument("--batch-size", type=int, metavar="N", help="sequences per device per step (default 4)")
    p.add_argument("--grad-accum", type=int, metavar="N", help="gradient accumulation steps (default 1)")
    p.add_argument("--max-steps", type=int, metavar="N", help="cap on optimizer steps per stage")
    p.add_argument("--seed", type=int, metavar="N", help="random seed (default 42)")

    g = p.add_argument_group("more settings (all TrainConfig fields; see docs/training.md)")
    g.add_argument("--effective-batch-size", type=int, metavar="N",
                   help="sequences per optimizer step over all GPUs; sets --grad-accum")
    g.add_argument("--warmup-ratio", type=float, metavar="X", help="default 0.05")
    g.add_argument("--lr-scheduler", metavar="NAME", help="default cosine")
    g.add_argument("--weight-decay", type=float, metavar="X", help="default 0")
    g.add_argument("--optim", metavar="NAME", help="default adamw_torch_fused")
    g.add_argument("--edit-weight", type=float, metavar="X",
                   help="loss weight of the completion tokens that do not continue a copy of the draft "
                        "(its edits and where it stops; default 1: every token the same)")
    g.add_argument("--lora-r", type=int, metavar="N")
    g.add_argument("--lora-alpha", type=int, metavar="N")
    g.add_argument("--lora-dropout", type=float, metavar="X")
    g.add_argument("--lora-init", metavar="DIR",
                   help="a PEFT LoRA adapter trained on --base: the first stage keeps training it")
    g.add_argument("--device", help="auto (default), cuda, cpu, mps")
    g.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"])
    g.add_argument("--attn", metavar="IMPL", help="auto (default), flash_attention_2, sdpa, eager")
    g.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute activations (default auto: on a GPU, only when the memory estimate needs it)")
    g.add_argument("--padding-free", action=argparse.BooleanOptionalAction, default=None,
                   help="unpadded batches (needs flash_attention_2; default: on with it)")
    g.add_argument("--group-by-length", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--logging-steps", type=int, metavar="N", help="default 10")
    g.add_argument("--save-steps", type=int, metavar="N", help="checkpoint interval (default 500)")
    g.add_argument("--save-total-limit", type=int, metavar="N")
    g.add_argument("--keep-checkpoints", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--dataset-num-proc", type=int, metavar="N")
    g.add_argument("--no-progress", dest="disable_tqdm", action="store_const", const=True, default=None)


def train_option_argv(args, parser) -> list[str]:
    """The ``train`` options set in ``args`` as command-line words, in the parser's order (the
    exact command ``annotate train`` records and runs)."""
    words: list[str] = []
    for action in parser._actions:  # argparse has no public API to walk a parser's options
        if action.dest not in TRAIN_DESTS or not action.option_strings:
            continue
        value = getattr(args, action.dest, None)
        if value is None:
            continue
        flag = action.option_strings[0]
        if isinstance(action, argparse.BooleanOptionalAction):
            words.append(flag if value else "--no-" + flag[2:])
        elif isinstance(action, argparse._StoreConstAction):
            if value == action.const:
                words.append(flag)
        else:
            words += [flag, str(value)]
    return words


def _train_dests() -> frozenset[str]:
    probe = argparse.ArgumentParser(add_help=False)
    add_train_options(probe)
    return frozenset(a.dest for a in probe._actions)


def config_from_args(args):
    from ..errors import MetaAlignerError
    from ..training import TrainConfig

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {k: v for k, v in vars(args).items() if k in names and v is not None}
    if args.config:
        return TrainConfig.from_file(args.config, **given)
    if "base" not in given:
        raise MetaAlignerError('--base is required (a model id, a directory, a .gguf file or "default")')
    return TrainConfig(**given)


def run(args) -> int:
    from ..training import is_main_process, train

    final = train(config_from_args(args))
    if is_main_process():  # under accelerate/torchrun every process runs this
        print(final)
    return 0


TRAIN_DESTS = _train_dests()
