"""Write the trained tiny aligner as one LoRA adapter over the embedded base model.

    python training/tiny/export_adapter.py --model OUT/final --out training/tiny/adapter
    python training/tiny/export_adapter.py --model OUT/preference/checkpoints/checkpoint-N \\
        --on OUT/equal --out training/tiny/adapter          # a run stopped inside a stage

``metaaligner train --lora`` merges each stage's adapter into the weights before the next stage,
so its output is a plain model. Each stage adds a rank-r update to the same weight matrices, so
the trained weights minus the base weights have rank at most 3r in each matrix: a truncated SVD
of that difference, at rank ``--rank`` (default 3r, exact up to rounding), is an ordinary PEFT
LoRA adapter. It is stored in float16 (a few MB) and reproduces the trained model when merged
into the base (the printed figure is the largest relative error over all matrices).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def _load(path: str, on: str | None):
    import torch
    from transformers import AutoModelForCausalLM

    if on is None:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(on, dtype=torch.float32)
    return PeftModel.from_pretrained(base, path).merge_and_unload()


def export(model: str, out: str, on: str | None = None, rank: int | None = None) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from metaaligner_core.embedded import embedded_model_dir

    recipe = json.loads((Path(model).parent / "config.json").read_text()) if (Path(model).parent / "config.json").is_file() else None
    trained = _load(model, on)
    base = AutoModelForCausalLM.from_pretrained(embedded_model_dir(), dtype=torch.float32)
    tw = dict(trained.named_parameters())
    deltas = {}
    for name, p in base.named_parameters():
        d = tw[name].detach() - p.detach()
        if d.abs().max() > 0:
            if not name.endswith(".weight") or d.dim() != 2:
                raise SystemExit(f"{name}: changed but is not a linear weight; cannot be a LoRA adapter")
            deltas[name[:-len(".weight")]] = d
    if not deltas:
        raise SystemExit(f"{model}: identical to the base model")
    modules = sorted(deltas)
    r = rank or _stage_rank(model, recipe)
    short = sorted({m.split(".")[-1] for m in modules})
    layers = sorted({int(m.split(".")[2]) for m in modules})
    # Module paths in PEFT form: the adapter targets exactly the matrices that changed.
    config = LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                        target_modules=short, layers_to_transform=layers)
    peft_model = get_peft_model(base, config)
    worst = 0.0
    with torch.no_grad():
        for name in modules:
            u, s, vh = torch.linalg.svd(deltas[name], full_matrices=False)
            b = (u[:, :r] * s[:r]).to(torch.float16)
            a = vh[:r].to(torch.float16)
            mod = peft_model.get_submodule("base_model.model." + name)
            mod.lora_A["default"].weight.copy_(a.float())
            mod.lora_B["default"].weight.copy_(b.float())
            approx = b.float() @ a.float()
            err = float((approx - deltas[name]).norm() / deltas[name].norm())
            worst = max(worst, err)
    peft_model.half()  # the adapter file in float16; PEFT casts it back to float32 on load
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(out_dir, safe_serialization=True)
    # The base is the embedded model wherever it is cached: record its public name, not this
    # machine's cache path, and drop PEFT's template model card (training/tiny/README.md is the card).
    cfg_path = out_dir / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = "HuggingFaceTB/SmolLM2-135M-Instruct"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    (out_dir / "README.md").unlink(missing_ok=True)
    info = {"rank": r, "matrices": len(modules), "layers": layers, "modules": short,
            "max_relative_error": round(worst, 6),
            "bytes": (out_dir / "adapter_model.safetensors").stat().st_size}
    return info


def _stage_rank(model: str, recipe) -> int:
    """3 × lora_r of the run (one rank-r update per stage), read from the run's config.json."""
    for parent in [Path(model), *Path(model).parents][:4]:
        cfg = parent / "config.json"
        if cfg.is_file():
            data = json.loads(cfg.read_text())
            if "config" in data and "lora_r" in data["config"]:
                return 3 * int(data["config"]["lora_r"])
    return 24


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="the trained model directory (or a LoRA checkpoint with --on)")
    ap.add_argument("--on", help="the model a LoRA checkpoint given as --model applies to")
    ap.add_argument("--out", required=True, help="adapter directory to write")
    ap.add_argument("--rank", type=int, help="adapter rank (default: 3 × the run's lora_r)")
    args = ap.parse_args(argv)
    print(json.dumps(export(args.model, args.out, args.on, args.rank), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
