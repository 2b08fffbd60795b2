"""Three-stage training of the aligner: tokenization and masking, a full CPU run of the three
stages with an interruption and a resume, real learning on the identity (warm-up) task, bad input.

The model tests train the embedded SmolLM2-135M-Instruct for a few steps on short sequences.
"""
from __future__ import annotations

import json
import logging
import math
import random
from pathlib import Path

import pytest

from conftest import read_jsonl, run_cli, write_jsonl
from metaaligner_core.errors import MetaAlignerError
from metaaligner_core.templates import build_prompt
from metaaligner_core.training import STAGES, TrainConfig, check_data_dir

OBJECTIVE = "Honesty: the response should not tell lies"
WORDS = ("apple river stone green quiet horse lamp window seven cloud bread silver garden music paper winter"
         .split())


def row(draft: str, target: str | None = None, subset: str = "warmup", i: int = 0) -> dict:
    variant = "better" if subset == "preference" else "equal"
    prompt = build_prompt("ultrafeedback", "Describe it.", draft, [OBJECTIVE], variant)
    return {"prompt": prompt, "completion": draft if target is None else target, "objectives": ["honesty"],
            "subset": subset, "source_index": i}


def drafts(n: int, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    out: set[str] = set()
    while len(out) < n:
        out.add(" ".join(rng.sample(WORDS, rng.randint(3, 5))))
    result = sorted(out)
    rng.shuffle(result)
    return result


def make_data_dir(root: Path, n: int = 8, empty=()) -> Path:
    ds = drafts(3 * n, seed=7)
    for k, stage in enumerate(STAGES):
        rows = [] if stage in empty else [
            row(d, target=(d.upper() if stage == "preference" else d), subset=stage, i=i)
            for i, d in enumerate(ds[k * n:(k + 1) * n])]
        write_jsonl(root / f"{stage}.jsonl", rows)
    return root


@pytest.fixture(scope="module")
def tokenizer(embedded_dir):
    from metaaligner_core.models import load_tokenizer

    return load_tokenizer("default")


# ---------------------------------------------------------------------------------------------
# No model needed


def test_config_validates_and_orders_stages():
    cfg = TrainConfig(data="d", stages="preference,warmup")
    assert cfg.stages == ("warmup", "preference")
    with pytest.raises(MetaAlignerError, match="stages"):
        TrainConfig(data="d", stages="warmup,finetune")
    with pytest.raises(MetaAlignerError, match="max_length"):
        TrainConfig(data="d", max_length=4)


def test_recipe_files_load_and_unknown_keys_are_named(tmp_path):
    root = Path(__file__).resolve().parents[1] / "training" / "recipes"
    recipes = sorted(root.glob("metaaligner-*.yaml"))
    assert {p.stem for p in recipes} >= {"metaaligner-1.1b", "metaaligner-7b", "metaaligner-13b",
                                         "metaaligner-imhi-7b", "metaaligner-imhi-13b"}
    for path in recipes:
        cfg = TrainConfig.from_file(path, data="d", out="o")
        # Table 5: effective batch 512 (HH-RLHF, UltraFeedback), 128 (IMHI); the authors' weight decay 1e-5
        assert (cfg.lr, cfg.warmup_ratio, cfg.epochs, cfg.effective_batch_size, cfg.lr_scheduler, cfg.weight_decay) == \
            (1e-5, 0.05, 2, 128 if "imhi" in path.stem else 512, "cosine", 1e-5)
        assert cfg.max_length == (2048 if "1.1b" in path.stem else 4096)
        # the non-chat bases: paper §4.1 and Appendix C.2, and the authors' command (Llama-2-13b-hf);
        # Table 5's "LLaMA2-Chat" contradicts both
        assert "chat" not in cfg.base.lower()
        if "7b" in path.stem or "13b" in path.stem:
            assert cfg.base == f"meta-llama/Llama-2-{'13b' if '13b' in path.stem else '7b'}-hf"
    smoke = TrainConfig.from_file(root / "smoke-cpu.yaml", data="d", max_steps=2)
    assert (smoke.base, smoke.max_steps) == ("default", 2)  # flags override the recipe
    assert TrainConfig.from_file(root / "metaaligner-1.1b.yaml", data="d").base == \
        "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T"
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: 1e-5\nlearning_rate: 3\n")
    with pytest.raises(MetaAlignerError, match=r'bad.yaml: field "learning_rate": unknown setting'):
        TrainConfig.from_file(bad, data="d")
    ok = tmp_path / "ok.yaml"
    ok.write_text("base: default\nlr: 1e-5\nbatch_size: '4'\n")  # YAML reads 1e-5 as a string
    cfg = TrainConfig.from_file(ok, data="d")
    assert (cfg.lr, cfg.batch_size) == (1e-5, 4)
    bad.write_text("base: default\nbatch_size: lots\n")
    with pytest.raises(MetaAlignerError, match=r'bad.yaml: field "batch_size": expected a number'):
        TrainConfig.from_file(bad, data="d")
    bad.write_text("base: default\nlr: [1\n")
    with pytest.raises(MetaAlignerError, match=r"bad.yaml:\d+: not a valid recipe"):
        TrainConfig.from_file(bad, data="d")
    bad.write_text("lr: 1.0e-5\n")
    with pytest.raises(MetaAlignerError, match=r"bad.yaml: no base model \(give --base\)"):
        TrainConfig.from_file(bad, data="d")
    with pytest.raises(MetaAlignerError, match=r'device: "gpu"'):
        TrainConfig(data="d", base="default", device="gpu")


def test_accelerate_configs_load():
    from accelerate.commands.config.config_args import load_config_from_file

    root = Path(__file__).resolve().parents[1] / "training" / "accelerate"
    kinds = {}
    for path in root.glob("*.yaml"):
        cfg = load_config_from_file(str(path))
        assert cfg.mixed_precision == "bf16" and cfg.num_processes == 4 * cfg.num_machines
        kinds[path.stem] = str(cfg.distributed_type).rsplit(".", 1)[-1]
    assert kinds == {"fsdp_full_shard": "FSDP", "fsdp_full_shard_multinode": "FSDP", "multi_gpu": "MULTI_GPU",
                     "deepspeed_zero3": "DEEPSPEED", "deepspeed_zero3_multinode": "DEEPSPEED"}


def test_effective_batch_sets_grad_accum(monkeypatch):
    from metaaligner_core.training import resolve_runtime

    monkeypatch.setenv("WORLD_SIZE", "4")
    rt = resolve_runtime(TrainConfig(data="d", device="cpu", batch_size=8, effective_batch_size=512))
    assert (rt.grad_accum, rt.world_size) == (16, 4)
    assert (rt.precision, rt.attn, rt.padding_free, rt.group_by_length, rt.gradient_checkpointing) == \
        ("fp32", "sdpa", False, True, False)
    with pytest.raises(MetaAlignerError, match="padding_free needs attn=flash_attention_2.*kept apart by a mask"):
        resolve_runtime(TrainConfig(data="d", device="cpu", padding_free=True))


def test_data_dir_checks(tmp_path):
    with pytest.raises(MetaAlignerError, match="no such data directory"):
        check_data_dir(tmp_path / "nope", STAGES)
    make_data_dir(tmp_path, empty=STAGES)
    with pytest.raises(MetaAlignerError, match="nothing to train on"):
        check_data_dir(tmp_path, STAGES)
    (tmp_path / "equal.jsonl").unlink()
    with pytest.raises(MetaAlignerError, match="equal.jsonl: missing"):
        check_data_dir(tmp_path, STAGES)


# ---------------------------------------------------------------------------------------------
# Tokenization and masking (tokenizer / one batch of the real trainer)


def test_prompt_encoding_is_the_inference_encoding(tokenizer):
    from metaaligner_core.inference import encode_aligner_prompt
    from metaaligner_core.training import tokenize_example

    r = row("green horse lamp")
    ex = tokenize_example(tokenizer, r["prompt"], r["completion"])
    p = encode_aligner_prompt(tokenizer, r["prompt"])
    assert p[0] == tokenizer.bos_token_id and p.count(tokenizer.bos_token_id) == 1
    assert ex["input_ids"][:len(p)] == p
    assert ex["input_ids"][-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ex["input_ids"][len(p):-1]) == "green horse lamp"


def test_truncation_keeps_instruction_tail_and_part_of_completion(tokenizer):
    from metaaligner_core.training import PROMPT_TAIL_TOKENS, tokenize_example

    long_draft = " ".join(WORDS * 20)
    r = row(long_draft, target=" ".join(reversed(WORDS * 20)))
    full = tokenize_example(tokenizer, r["prompt"], r["completion"])
    n_prompt = sum(1 for x in full["labels"] if x == -100)
    ex = tokenize_example(tokenizer, r["prompt"], r["completion"], max_length=128)
    assert len(ex["input_ids"]) == len(ex["labels"]) == 128
    kept_completion = [x for x in ex["labels"] if x != -100]
    assert len(kept_completion) == 64  # half the budget; the prompt alone is longer than 128
    assert kept_completion == full["labels"][n_prompt:n_prompt + 64]
    prompt = ex["input_ids"][:64]
    assert prompt[:32] == full["input_ids"][:32]  # BOS and the instruction
    assert prompt[-PROMPT_TAIL_TOKENS:] == full["input_ids"][n_prompt - PROMPT_TAIL_TOKENS:n_prompt]
    assert tokenizer.decode(prompt[-4:]).endswith("Edit: ")
    short = tokenize_example(tokenizer, row("a b")["prompt"], "a b", max_length=128)
    assert len(short["input_ids"]) < 128 and short["input_ids"][-1] == tokenizer.eos_token_id


def test_edit_loss_weights_mark_the_completions_decisions():
    from metaaligner_core.training import edit_loss_weights

    # prompt: BOS, the draft 10..14, then "| Edit:" (99); completion: 10 11 13 14 50 EOS(2)
    ids = [1, 10, 11, 12, 13, 14, 99, 10, 11, 13, 14, 50, 2]
    labels = [-100] * 7 + ids[7:]
    w = edit_loss_weights(ids, labels, 3.0)
    #         first token  copy   skipped 12  copy  inserted  EOS
    assert w == [1.0] * 7 + [3.0, 1.0, 3.0, 1.0, 3.0, 3.0]
    copy = [1, 10, 11, 12, 99, 10, 11, 12, 2]  # the draft copied whole: its first token and EOS decide
    assert edit_loss_weights(copy, [-100] * 5 + copy[5:], 2.0) == [1.0] * 5 + [2.0, 1.0, 1.0, 2.0]
    with pytest.raises(MetaAlignerError, match="edit_weight"):
        TrainConfig(data="d", edit_weight=0)


@pytest.mark.slow
def test_edit_weighted_loss_is_the_weighted_token_mean(tmp_path, tokenizer):
    """The trainer's loss with ``edit_weight`` equals the weighted negative log-likelihood of the
    completion tokens over their count, computed here from the model's logits; the decision
    tokens are found here by searching the prompt's token pairs, not by the code under test."""
    import torch

    from metaaligner_core.training import build_stage_dataset, load_model, make_trainer, resolve_runtime, train

    rows = [row("green horse by the river", target="green horse by the river"),
            row("the lamp is bright and warm", target="the lamp is warm. Thank you!")]
    losses = {}
    for weight in (1.0, 4.0):
        cfg = TrainConfig(data=str(tmp_path), device="cpu", batch_size=2, max_length=256, disable_tqdm=True,
                          edit_weight=weight)
        rt = resolve_runtime(cfg)
        model = load_model("default", cfg, rt)
        trainer = make_trainer(cfg, rt, model, tokenizer, build_stage_dataset(rows, tokenizer, 256), tmp_path / "c")
        batch = {k: v.to("cpu") for k, v in next(iter(trainer.get_train_dataloader())).items()}
        trainer.model.train()
        with torch.no_grad():
            losses[weight] = trainer.compute_loss(trainer.model, dict(batch)).item()
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        labels = batch["labels"][:, 1:]
        logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        mask = labels != -100
        expected_w = torch.ones_like(logp)
        for b in range(len(rows)):
            seq = batch["input_ids"][b].tolist()
            n_prompt = int((batch["labels"][b] == -100).long().argmin())
            text = " " + " ".join(map(str, seq[:n_prompt])) + " "
            for t in range(n_prompt, int(batch["attention_mask"][b].sum())):
                if f" {seq[t - 1]} {seq[t]} " not in text:
                    expected_w[b, t - 1] = weight
        expected = -(logp * expected_w * mask).sum() / mask.sum()
        assert losses[weight] == pytest.approx(expected.item(), rel=1e-4)
    assert losses[4.0] > losses[1.0] * 1.5  # the decisions carry most of the loss of a copy
    # and a whole (short) stage trains with it, gradient accumulation included
    data = make_data_dir(tmp_path / "data", n=4)
    final = train(TrainConfig(data=str(data), out=str(tmp_path / "out"), stages="preference", edit_weight=5.0,
                              batch_size=2, grad_accum=2, max_steps=1, max_length=128, lr=1e-4, logging_steps=1,
                              disable_tqdm=True))
    assert (final / "model.safetensors").is_file()
    loss = [m["loss"] for m in read_jsonl(tmp_path / "out" / "metrics.jsonl") if "loss" in m]
    assert loss and all(math.isfinite(x) and x > 0 for x in loss)


@pytest.mark.slow
def test_labels_mask_exactly_prompt_and_padding(tmp_path, tokenizer):
    """One batch from the trainer used for training: loss only on completion tokens and EOS."""
    import torch

    from metaaligner_core.training import (build_stage_dataset, load_model, make_trainer, prompt_ids,
                                           resolve_runtime)

    rows = [row(d, target=t) for d, t in [("green horse", "A quiet green horse stands by the river."),
                                          ("lamp", "lamp"), ("seven cloud bread", "Seven clouds.")]]
    cfg = TrainConfig(data=str(tmp_path), device="cpu", batch_size=len(rows), max_length=128, disable_tqdm=True)
    rt = resolve_runtime(cfg)
    dataset = build_stage_dataset(rows, tokenizer, cfg.max_length)
    trainer = make_trainer(cfg, rt, load_model("default", cfg, rt), tokenizer, dataset, tmp_path / "ckpt")
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[0] == len(rows)
    lengths = batch["attention_mask"].sum(1).tolist()
    assert len(set(lengths)) == len(rows)  # different lengths, so there is padding to check
    seen = set()
    for ids, labels, n in zip(batch["input_ids"], batch["labels"], lengths):
        i = next(k for k, r in enumerate(rows)
                 if ids[:n].tolist() == prompt_ids(tokenizer, r["prompt"])
                 + tokenizer(r["completion"], add_special_tokens=False).input_ids + [tokenizer.eos_token_id])
        seen.add(i)
        n_prompt = len(prompt_ids(tokenizer, rows[i]["prompt"]))
        expected = torch.full_like(labels, -100)
        expected[n_prompt:n] = ids[n_prompt:n]
        assert torch.equal(labels, expected)
        assert labels[n - 1] == tokenizer.eos_token_id
    assert seen == set(range(len(rows)))


# ---------------------------------------------------------------------------------------------
# Training runs


class InterruptAt:
    """Stop a run like Ctrl-C would, after the given stage logged the given step."""

    def __new__(cls, stage: str, step: int):
        from transformers import TrainerCallback

        class _Interrupt(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kwargs):
                if f"/{stage}/" in args.output_dir + "/" and state.global_step == step:
                    raise KeyboardInterrupt

        return _Interrupt()


@pytest.mark.slow
def test_three_stages_interrupted_then_resumed_by_rerun(tmp_path, embedded_dir):
    from metaaligner_core.training import train

    data, out = make_data_dir(tmp_path / "data", n=6), tmp_path / "out"
    cfg = TrainConfig(data=str(data), out=str(out), base="default", lr=5e-5, batch_size=2, max_length=96,
                      max_steps=2, logging_steps=1, save_steps=1, disable_tqdm=True)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, callbacks=[InterruptAt("equal", 2)])  # logged step 2; its checkpoint never written
    assert (out / "warmup" / "stage.json").is_file() and not (out / "warmup" / "checkpoints").exists()
    assert not (out / "equal" / "stage.json").exists() and not (out / "final").exists()
    assert [p.name for p in (out / "equal" / "checkpoints").glob("checkpoint-*")] == ["checkpoint-1"]
    assert [(m["stage"], m["step"]) for m in read_jsonl(out / "metrics.jsonl")][-1] == ("equal", 2)
    warmup_marker = (out / "warmup" / "stage.json").stat().st_mtime_ns
    warmup_weights = (out / "warmup" / "model.safetensors").stat().st_mtime_ns

    # Other settings would train something else: refused before anything is touched.
    args = ["train", "--data", data, "--out", out, "--base", "default", "--lr", "5e-5", "--batch-size", 2,
            "--max-length", 96, "--max-steps", 2, "--logging-steps", 1, "--no-progress"]
    res = run_cli(*[a if a != "5e-5" else "1e-4" for a in args])
    assert res.returncode == 2 and "lr=5e-05, not 0.0001" in res.stderr

    # The same command again, from the CLI: warm-up is skipped, equal resumes from checkpoint-1.
    res = run_cli(*args, "--save-steps", 100)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().endswith(str(out / "final"))
    assert "warmup: already trained" in res.stderr
    assert (out / "warmup" / "stage.json").stat().st_mtime_ns == warmup_marker
    assert (out / "warmup" / "model.safetensors").stat().st_mtime_ns == warmup_weights
    equal = json.loads((out / "equal" / "stage.json").read_text())
    assert (equal["resumed_from"], equal["steps"]) == ("checkpoint-1", 2)
    assert equal["started_from"] == str(out / "warmup")
    assert json.loads((out / "preference" / "stage.json").read_text())["started_from"] == str(out / "equal")

    metrics = read_jsonl(out / "metrics.jsonl")
    assert [(m["stage"], m["step"]) for m in metrics] == [(s, k) for s in STAGES for k in (1, 2)]
    assert all(isinstance(m["loss"], float) and m["loss"] > 0 for m in metrics)
    config = json.loads((out / "config.json").read_text())
    assert config["config"]["stages"] == list(STAGES) and config["runtime"]["device"] == "cpu"
    assert not any((out / s / "checkpoints").exists() for s in STAGES)

    # final/ is a plain model directory: transformers loads it, and so does `metaaligner align`.
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert AutoTokenizer.from_pretrained(out / "final").eos_token_id is not None
    final_w, pref_w, base_w = (load_file(p / "model.safetensors") for p in (out / "final", out / "preference",
                                                                              embedded_dir))
    key = next(k for k in final_w if k.endswith("q_proj.weight"))
    assert torch.equal(final_w[key], pref_w[key]) and not torch.equal(final_w[key], base_w[key])
    assert model.num_parameters() > 100e6
    inp = write_jsonl(tmp_path / "in.jsonl", [{"query": "Describe it.", "draft": "green horse lamp"}])
    res = run_cli("align", "--input", inp, "--out", tmp_path / "aligned.jsonl", "--objectives", "honesty",
                  "--aligner", out / "final", "--max-new-tokens", 6, "--no-progress")
    assert res.returncode == 0, res.stderr[-3000:]
    from metaaligner_core.inference import Aligner

    expected = Aligner.load(str(out / "final")).align("Describe it.", "green horse lamp", "honesty", max_new_tokens=6)
    assert read_jsonl(tmp_path / "aligned.jsonl")[0]["aligned"] == expected


@pytest.mark.slow
def test_warmup_stage_learns_to_copy(tmp_path, embedded_dir, caplog):
    """The identity task of the warm-up subset: held-out copy loss falls, exact copies rise.
    (Its equal and preference files are empty: those stages are skipped with a warning.)"""
    import torch

    from metaaligner_core.models import load_causal_lm
    from metaaligner_core.training import prompt_ids, tokenize_example, train

    ds = drafts(48, seed=1)
    train_drafts, held_out = ds[:40], ds[40:]
    data = tmp_path / "data"
    write_jsonl(data / "warmup.jsonl", [row(d, i=i) for i, d in enumerate(train_drafts)])
    write_jsonl(data / "equal.jsonl", [])
    write_jsonl(data / "preference.jsonl", [])

    def copy_scores(spec):
        model, tok = load_causal_lm(spec, device="cpu")
        losses, exact = [], 0
        with torch.no_grad():
            for d in held_out:
                r = row(d)
                ex = tokenize_example(tok, r["prompt"], d)
                losses.append(model(input_ids=torch.tensor([ex["input_ids"]]),
                                    labels=torch.tensor([ex["labels"]])).loss.item())
                p = torch.tensor([prompt_ids(tok, r["prompt"])])
                gen = model.generate(p, attention_mask=torch.ones_like(p), max_new_tokens=10, do_sample=False,
                                     pad_token_id=tok.pad_token_id)
                exact += tok.decode(gen[0, p.shape[1]:], skip_special_tokens=True).strip() == d
        return sum(losses) / len(losses), exact / len(held_out)

    loss_before, exact_before = copy_scores("default")
    caplog.set_level(logging.WARNING, logger="metaaligner_core.training")
    final = train(TrainConfig(data=str(data), out=str(tmp_path / "out"), base="default", lr=2e-4, epochs=2,
                              batch_size=8, max_steps=5, warmup_ratio=0.1, max_length=128, logging_steps=1,
                              disable_tqdm=True))
    loss_after, exact_after = copy_scores(str(final))
    print(f"held-out copy loss {loss_before:.3f} -> {loss_after:.3f}, exact copies {exact_before:.2f} -> {exact_after:.2f}")
    assert loss_after < loss_before / 5
    assert exact_after >= exact_before + 0.5 and exact_after >= 0.75
    metrics = read_jsonl(tmp_path / "out" / "metrics.jsonl")
    assert {m["stage"] for m in metrics} == {"warmup"} and len(metrics) == 5
    assert "equal.jsonl: empty; skipping the equal stage" in caplog.text
    assert "preference.jsonl: empty; skipping the preference stage" in caplog.text
    assert not (tmp_path / "out" / "equal").exists()
    assert json.loads((tmp_path / "out" / "warmup" / "stage.json").read_text())["started_from"] == "default"
    assert min(m["loss"] for m in metrics[-2:]) < metrics[0]["loss"] / 5


@pytest.mark.slow
def test_lora_stage_is_merged_into_a_plain_model(tmp_path, embedded_dir):
    import torch
    from safetensors.torch import load_file

    from metaaligner_core.training import train

    data = make_data_dir(tmp_path / "data", n=2)
    final = train(TrainConfig(data=str(data), out=str(tmp_path / "out"), base="default", stages="preference",
                              lora=True, lr=1e-3, warmup_ratio=0, batch_size=2, max_steps=1, max_length=64,
                              disable_tqdm=True))
    assert not (tmp_path / "out" / "preference" / "adapter").exists()
    assert not list(final.glob("adapter_*"))
    trained, base = load_file(final / "model.safetensors"), load_file(embedded_dir / "model.safetensors")
    assert trained.keys() == base.keys()  # no lora_A/lora_B left: a plain model
    changed = [k for k in base if not torch.equal(trained[k], base[k])]
    assert changed and all(k.endswith("proj.weight") for k in changed)


@pytest.mark.slow
@pytest.mark.parametrize("stages", ["preference", "warmup,preference"], ids=["one-stage", "empty-first-stage"])
def test_lora_init_keeps_training_the_given_adapter(tmp_path, embedded_dir, stages):
    """``lora_init``: the stage trains the given adapter (its rank and modules, its weights as the
    start), so the result is the base plus one adapter of that rank, near the one it started from;
    a first stage with no rows is skipped and the adapter goes to the first stage that has rows."""
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from metaaligner_core.training import train

    torch.manual_seed(0)
    start = get_peft_model(AutoModelForCausalLM.from_pretrained(embedded_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                      init_lora_weights=False, task_type="CAUSAL_LM"))
    start.save_pretrained(tmp_path / "init")
    init = load_file(tmp_path / "init" / "adapter_model.safetensors")

    data = make_data_dir(tmp_path / "data", n=2, empty=("warmup",))
    final = train(TrainConfig(data=str(data), out=str(tmp_path / "out"), base="default", stages=stages,
                              lora=True, lora_r=16, lora_init=str(tmp_path / "init"), lr=1e-4, warmup_ratio=0,
                              batch_size=2, max_steps=1, max_length=64, save_dtype="fp32", disable_tqdm=True))
    trained, base = load_file(final / "model.safetensors"), load_file(embedded_dir / "model.safetensors")
    changed = sorted(k for k in base if not torch.equal(trained[k], base[k]))
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed)
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.29.self_attn.v_proj.weight"):
        key = "base_model.model." + name.replace(".weight", ".lora_{}.weight")
        started = 2.0 * init[key.format("B")].float() @ init[key.format("A")].float()  # alpha / r = 2
        delta = trained[name].float() - base[name].float()
        assert (delta - started).norm() < 0.05 * started.norm()  # one small step from the start
        sv = torch.linalg.svdvals(delta)
        assert sv[4] < 1e-4 * sv[0]  # rank 4, the start's, not lora_r
    recorded = json.loads((tmp_path / "out" / "config.json").read_text())["lora_init_adapter"]
    assert recorded["r"] == 4 and recorded["lora_alpha"] == 8 and sorted(recorded["target_modules"]) == ["q_proj", "v_proj"]


def test_lora_init_must_be_an_adapter(tmp_path):
    out = tmp_path / "out"
    make_data_dir(tmp_path / "data", n=2)
    res = run_cli("train", "--data", tmp_path / "data", "--base", "default", "--out", out, "--lora",
                  "--lora-init", tmp_path / "none")
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1
    assert f'lora_init: "{tmp_path / "none"}" is not a PEFT adapter directory' in res.stderr
    res = run_cli("train", "--data", tmp_path / "data", "--base", "default", "--out", out,
                  "--lora-init", tmp_path / "none")
    assert res.returncode == 2 and "lora_init needs lora: true" in res.stderr
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# Bad input through the CLI


def test_cli_bad_input_errors(tmp_path):
    out = tmp_path / "out"
    res = run_cli("train", "--data", tmp_path / "missing", "--base", "default", "--out", out)
    assert res.returncode == 2 and "missing: no such data directory" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1

    empty = make_data_dir(tmp_path / "empty", empty=STAGES)
    res = run_cli("train", "--data", empty, "--base", "default", "--out", out)
    assert res.returncode == 2 and "nothing to train on" in res.stderr

    data = make_data_dir(tmp_path / "data", n=2)
    res = run_cli("train", "--data", data, "--base", "no-such-org/no-such-model", "--out", out,
                  env={"HF_HUB_OFFLINE": "1"})
    assert res.returncode == 2 and 'no-such-org/no-such-model' in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    res = run_cli("train", "--data", data, "--base", tmp_path / "nowhere", "--out", out)
    assert res.returncode == 2 and "nowhere" in res.stderr

    (data / "equal.jsonl").write_text(json.dumps({"prompt": "p", "completion": 3}) + "\n")
    res = run_cli("train", "--data", data, "--base", "default", "--out", out)
    assert res.returncode == 2 and 'equal.jsonl:1: field "completion": missing or not a string' in res.stderr
    res = run_cli("train", "--data", data, "--out", out)
    assert res.returncode == 2 and "--base is required" in res.stderr
    assert not out.exists()




def test_resume_drops_a_metrics_line_cut_short_by_the_interruption(tmp_path):
    from metaaligner_core.training import _drop_metrics_after

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"stage": "warmup", "step": 1, "loss": 2.0}\n{"stage": "warmup", "step": 2, "loss": 1.5}\n'
                    '{"stage": "warmup", "step": 3, "lo')
    _drop_metrics_after(path, "warmup", 1)  # the last checkpoint was at step 1
    assert path.read_text() == '{"stage": "warmup", "step": 1, "loss": 2.0}\n'


# ---------------------------------------------------------------------------------------------
# Multi-process launches (issue: stages release memory, NCCL timeout, FSDP gradient sync)

LAUNCH = Path(__file__).resolve().parent / "launch" / "train_stages.py"
ROOT = Path(__file__).resolve().parents[1]


def tiny_llama_dir(path: Path) -> Path:
    """A randomly initialised two-layer LLaMA with a word-level tokenizer (BOS/EOS/PAD/UNK)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = sorted(set(WORDS) | set(build_prompt("ultrafeedback", "Describe it.", "x", [OBJECTIVE]).split()))
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "<pad>", *words])}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>", model_max_length=256)
    tok.save_pretrained(path)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def accelerate_launch(*args, config=None, port=29700, launch_args=()):
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:  # a free port: parallel test runs must not collide
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = [sys.executable, "-m", "accelerate.commands.launch"]
    # No CUDA here: --multi_gpu starts two processes through torchrun, which pick the gloo backend.
    how = ["--config_file", str(config), "--num_processes", "2"] if config else [
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([*launcher, *how, *launch_args, "--main_process_port", str(port), str(LAUNCH),
                           *map(str, args)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_two_process_three_stages_tear_down_each_stage_and_load(tmp_path):
    base = tiny_llama_dir(tmp_path / "base")
    data = make_data_dir(tmp_path / "data", n=8)
    report = tmp_path / "report.json"
    res = accelerate_launch("stages", data, base, tmp_path / "out", report)
    assert res.returncode == 0, res.stderr[-3000:]
    ranks = [json.loads(Path(f"{report}.{r}").read_text()) for r in (0, 1)]
    for rep in ranks:
        assert rep["world"] == 2
        assert len(rep["events"]) == 3  # warm-up, equal, preference
        # Each stage starts with nothing of the earlier stages alive (gc is off in the script:
        # only the training code's own teardown frees them), and nothing is left at the end.
        assert rep["alive_before_load"] == [[], [], []]
        assert [e["alive"] for e in rep["events"]] == [[], [], []]
        assert rep["alive_at_end"] == []
        assert rep["timeout_s"] == 1234  # set when the process group was created
    out = tmp_path / "out"
    assert all((out / s / "stage.json").is_file() for s in STAGES)
    metrics = read_jsonl(out / "metrics.jsonl")
    # 8 rows / (2 per process × 2 processes) / 2 accumulated = 1 step per stage, logged by rank 0 only
    assert [m["stage"] for m in metrics] == ["warmup", "equal", "preference"]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out / "final")
    tok = AutoTokenizer.from_pretrained(out / "final")
    assert model.config.use_cache and tok.eos_token == "</s>"
    before = AutoModelForCausalLM.from_pretrained(base)
    import torch

    assert not torch.equal(model.lm_head.weight, before.lm_head.weight)  # trained, then saved


@pytest.mark.slow
def test_training_args_under_an_fsdp_launch_sync_gradients_each_micro_batch(tmp_path):
    base = tiny_llama_dir(tmp_path / "base")
    report = tmp_path / "args.json"
    res = accelerate_launch("args", base, tmp_path / "out", report,
                            config=ROOT / "training" / "accelerate" / "fsdp_full_shard.yaml")
    assert res.returncode == 0, res.stderr[-3000:]
    for r in (0, 1):
        rep = json.loads(Path(f"{report}.{r}").read_text())
        # The launch is FSDP (training/accelerate/fsdp_full_shard.yaml); without a GPU accelerate runs
        # the processes as plain multi-CPU, so the FSDP wrapping itself is not exercised here.
        assert rep["launch"] == "fsdp"
        assert rep["args_kwargs"]["sync_each_batch"] is True  # (the Trainer adds num_steps=1 to the same dict)
        assert rep["plugin_kwargs"].get("sync_each_batch") is True  # what the trainer's accelerator uses


def _fsdp_launch(tmp_path, name, *args, launch_args=()):
    base, data = tmp_path / "base", tmp_path / "data"
    res = accelerate_launch("fsdp", data, base, tmp_path / name, tmp_path / f"{name}.json", *args,
                            config=ROOT / "training" / "accelerate" / "fsdp_full_shard.yaml", launch_args=launch_args)
    reports = [json.loads(Path(f"{tmp_path / name}.json.{r}").read_text()) for r in (0, 1)]
    return res, reports


@pytest.mark.slow
@pytest.mark.timeout(2400)  # four two-process launches: ~2 minutes on a quiet machine, 20 at load 25
def test_fsdp_only_rank0_reads_the_weights_sharded_checkpoints_resume_and_the_result_is_unchanged(tmp_path):
    """Two CPU processes under training/accelerate/fsdp_full_shard.yaml, FSDP2 over gloo, bf16.

    Every safetensors file a process opens is recorded (tests/launch/train_stages.py). With the
    yaml's ``fsdp_cpu_ram_efficient_loading`` rank 1 opens none, in any of the three stages; with
    it off (``--fsdp_cpu_ram_efficient_loading false``) rank 1 reads every stage's weights as
    transformers does by itself. The run with rank-0 loading is interrupted after the equal
    stage's step 2 and resumed from its sharded checkpoint-1; its final weights are bitwise those
    of the uninterrupted run in which every rank read the weights."""
    import torch
    from safetensors.torch import load_file

    base = tiny_llama_dir(tmp_path / "base")
    make_data_dir(tmp_path / "data", n=16)  # 16 rows / (2 per process × 2 processes) / 2 accumulated = 2 steps
    res, stopped = _fsdp_launch(tmp_path, "rank0", "full", "equal", 2)
    assert res.returncode == 0 and all(r.get("stopped") for r in stopped), res.stderr[-3000:]
    out, ref = tmp_path / "rank0", tmp_path / "all"
    weights = lambda d: str(d / "model.safetensors")  # noqa: E731
    assert stopped[0]["opened"] == [weights(base), weights(out / "warmup")] and stopped[1]["opened"] == []
    ckpt = tmp_path / "rank0" / "equal" / "checkpoints" / "checkpoint-1"
    # SHARDED_STATE_DICT: each rank wrote its shard of the weights and of the optimizer state
    assert sorted(p.name for p in (ckpt / "pytorch_model_fsdp_0").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert sorted(p.name for p in (ckpt / "optimizer_0").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert not list(ckpt.glob("*.safetensors"))
    res, resumed = _fsdp_launch(tmp_path, "rank0", "full")
    assert res.returncode == 0, res.stderr[-3000:]
    res, everyone = _fsdp_launch(tmp_path, "all", "full", launch_args=["--fsdp_cpu_ram_efficient_loading", "false"])
    assert res.returncode == 0, res.stderr[-3000:]

    assert resumed[0]["opened"] == [weights(out / "warmup"), weights(out / "equal")] and resumed[1]["opened"] == []
    assert everyone[1]["opened"] == [weights(base), weights(ref / "warmup"), weights(ref / "equal")]  # the hook sees reads
    for rep in (*stopped, *resumed, *everyone):
        expected = "meta" if rep["rank"] == 1 and rep in (*stopped, *resumed) else "cpu"
        assert {(x["device"], x["dtype"]) for x in rep["loaded"]} == {(expected, "torch.bfloat16")}  # read in bf16
        assert rep["seen"] == {"distributed_type": "DistributedType.FSDP", "state_dict_type":
                               "StateDictType.SHARDED_STATE_DICT", "param_dtype": "torch.bfloat16",
                               "reduce_dtype": "torch.float32", "sharded": "DTensor", "rank": rep["rank"]}
    equal = json.loads((out / "equal" / "stage.json").read_text())
    assert (equal["resumed_from"], equal["steps"]) == ("checkpoint-1", 2)
    metrics = read_jsonl(out / "metrics.jsonl")
    assert [(m["stage"], m["step"]) for m in metrics] == [(s, k) for s in STAGES for k in (1, 2)]
    assert [m["loss"] for m in metrics] == [m["loss"] for m in read_jsonl(ref / "metrics.jsonl")]

    final, reference, start = (load_file(weights(d)) for d in (out / "final", ref / "final", base))
    assert final.keys() == reference.keys() == start.keys()
    assert all(v.dtype == torch.bfloat16 for v in final.values())  # stage folders: full bf16 models
    assert json.loads((out / "final" / "config.json").read_text())["dtype"] == "bfloat16"
    assert all(torch.equal(final[k], reference[k]) for k in final)
    assert not torch.equal(final["lm_head.weight"], start["lm_head.weight"].bfloat16())  # it trained


@pytest.mark.slow
def test_fsdp_lora_rank0_reads_gathers_and_merges_the_adapter(tmp_path):
    """LoRA under the same CPU FSDP launch: rank 1 reads no weights; the adapter (the trainer
    writes none under SHARDED_STATE_DICT) is gathered and merged by rank 0 into each stage."""
    import torch
    from safetensors.torch import load_file

    base = tiny_llama_dir(tmp_path / "base")
    make_data_dir(tmp_path / "data", n=16)
    start = load_file(str(base / "model.safetensors"))
    weights = lambda d: str(d / "model.safetensors")  # noqa: E731
    res, lora = _fsdp_launch(tmp_path, "lora", "lora")
    assert res.returncode == 0, res.stderr[-3000:]
    assert lora[1]["opened"] == [] and {x["device"] for x in lora[1]["loaded"]} == {"meta"}
    merged = load_file(weights(tmp_path / "lora" / "final"))
    assert merged.keys() == start.keys()
    assert not torch.equal(merged["model.layers.0.self_attn.q_proj.weight"],
                           start["model.layers.0.self_attn.q_proj.weight"].bfloat16())


def test_sync_each_batch_only_under_fsdp_with_accumulation(monkeypatch):
    from metaaligner_core.training import resolve_runtime

    cfg = TrainConfig(data="d", base="default", device="cpu", grad_accum=4)
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert not resolve_runtime(cfg).sync_each_batch  # DDP/single: full gradients anyway, no extra traffic
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert resolve_runtime(cfg).sync_each_batch
    assert not resolve_runtime(TrainConfig(data="d", base="default", device="cpu", grad_accum=1)).sync_each_batch
    assert not resolve_runtime(TrainConfig(data="d", base="default", device="cpu", grad_accum=4,
                                           sync_each_batch=False)).sync_each_batch
    assert resolve_runtime(TrainConfig(data="d", base="default", device="cpu", precision="bf16")).save_dtype == "bf16"
    assert resolve_runtime(cfg).save_dtype == "fp32"


# ---------------------------------------------------------------------------------------------
# GPU helpers without a GPU: flash-attn detection (simulated), FLOPs per token, peak by name

def _fake_flash(root: Path, version: str, interface: str = "") -> None:
    pkg = root / "flash_attn"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text(f'__version__ = "{version}"\n')
    (pkg / "flash_attn_interface.py").write_text(interface)


@pytest.fixture
def clean_flash(monkeypatch):
    import sys

    for name in [m for m in sys.modules if m.startswith("flash_attn")]:
        monkeypatch.delitem(sys.modules, name)
    yield
    for name in [m for m in sys.modules if m.startswith("flash_attn")]:
        del sys.modules[name]


def test_flash_attention_detection_absent_broken_old_and_usable(tmp_path, monkeypatch, clean_flash):
    import importlib.util
    import sys

    from metaaligner_core.hardware import flash_attention_status

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "flash_attn" else real_find_spec(name, *a))
    st = flash_attention_status((9, 0))
    assert not st.usable and "not installed" in st.reason
    monkeypatch.setattr(importlib.util, "find_spec", real_find_spec)

    # built against another torch: the package is found, its CUDA extension does not load
    broken = tmp_path / "broken"
    _fake_flash(broken, "2.6.3", 'raise ImportError("flash_attn_2_cuda.so: undefined symbol: _ZN3c104cuda9SetDevice")\n')
    monkeypatch.syspath_prepend(str(broken))
    st = flash_attention_status((9, 0))
    assert not st.usable and "does not load" in st.reason and "undefined symbol" in st.reason

    for name in [m for m in sys.modules if m.startswith("flash_attn")]:
        del sys.modules[name]
    sys.path.remove(str(broken))
    good = tmp_path / "good"
    _fake_flash(good, "2.6.3")
    monkeypatch.syspath_prepend(str(good))
    st = flash_attention_status((7, 5))  # a T4 / V100-class GPU
    assert not st.usable and "compute capability 7.5 is below 8.0" in st.reason
    st = flash_attention_status((8, 0))  # Ampere
    assert st.usable and st.reason == "flash-attn 2.6.3"

    for name in [m for m in sys.modules if m.startswith("flash_attn")]:
        del sys.modules[name]
    (good / "flash_attn" / "__init__.py").write_text('__version__ = "2.0.4"\n')
    st = flash_attention_status((9, 0))
    assert not st.usable and "too old" in st.reason


def test_training_auto_attention_uses_the_detection(monkeypatch):
    from metaaligner_core import hardware
    from metaaligner_core.models import auto_attention

    monkeypatch.setattr(hardware, "flash_attention_status", lambda *a: hardware.FlashStatus(False, "broken"))
    assert auto_attention("cuda") == "sdpa"
    monkeypatch.setattr(hardware, "flash_attention_status", lambda *a: hardware.FlashStatus(True, "ok"))
    assert auto_attention("cuda") == "flash_attention_2" and auto_attention("cpu") == "sdpa"


@pytest.mark.parametrize("tied", [False, True])
def test_flops_per_token_against_a_hand_count(tied):
    from transformers import LlamaConfig, LlamaForCausalLM

    from metaaligner_core.hardware import attention_dims, non_embedding_params, train_flops_per_token

    model = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied))
    # by hand, per layer: q 64·64 + k 64·32 + v 64·32 + o 64·64 (4 heads of 16, 2 KV heads)
    # + MLP 3·64·128 + two RMSNorms 2·64; then the final norm 64 and the output head 100·64
    # (a tied head multiplies by the embedding table too); the input embedding (a lookup) is out.
    per_layer = 64 * 64 + 64 * 32 + 64 * 32 + 64 * 64 + 3 * 64 * 128 + 2 * 64
    n = 2 * per_layer + 64 + 100 * 64
    assert n == 80448
    assert non_embedding_params(model) == n
    layers, d_attn = attention_dims(model.config)
    assert (layers, d_attn) == (2, 64)
    # 6N + 12·L·d_attn·T at T = 256
    assert train_flops_per_token(n, layers, d_attn, 256) == 6 * 80448 + 12 * 2 * 64 * 256 == 875904


def test_peak_flops_from_the_device_name():
    from metaaligner_core.hardware import bf16_peak_tflops

    assert bf16_peak_tflops("NVIDIA A100-SXM4-80GB") == 312
    assert bf16_peak_tflops("NVIDIA H100 80GB HBM3") == 989
    assert bf16_peak_tflops("NVIDIA H100 PCIe") == 756
    assert bf16_peak_tflops("NVIDIA H200") == 989
    assert bf16_peak_tflops("NVIDIA L40S") == 362 and bf16_peak_tflops("NVIDIA L40") == 181
    assert bf16_peak_tflops("Tesla T4") is None  # unknown: the benchmark asks for --peak-tflops


# ---------------------------------------------------------------------------------------------
# Memory estimate (docs/training.md's table) and gradient_checkpointing: auto

def _doc_memory_table() -> dict:
    import re

    text = (ROOT / "docs" / "training.md").read_text(encoding="utf-8")
    table = {}
    for line in text.splitlines():
        m = re.match(r"\| (1\.1B|7B|13B) \| (.*) \|$", line)
        if m and "**" in line:
            table[m.group(1)] = [[float(x) for x in re.findall(r"\d+\.\d", cell)] for cell in m.group(2).split(" | ")]
    return table


def test_memory_estimate_is_the_docs_table():
    from metaaligner_core.hardware import train_memory_estimate

    table = _doc_memory_table()
    assert set(table) == {"1.1B", "7B", "13B"}
    # the recipes: N, h, L, per-GPU batch, max length; 4 GPUs; vocabulary 32,000
    recipes = {"1.1B": (1.10e9, 2048, 22, 8, 2048), "7B": (6.74e9, 4096, 32, 4, 4096), "13B": (13.0e9, 5120, 40, 2, 4096)}
    columns = [("fsdp", True, True), ("fsdp", False, True), ("deepspeed", True, True), ("ddp", True, True),
               ("fsdp", True, False)]
    for model, (n, h, layers, batch, seq) in recipes.items():
        for cell, (strategy, sync, ckpt) in zip(table[model], columns, strict=True):
            est = train_memory_estimate(n, h, layers, 32000, batch, seq, strategy=strategy, world=4,
                                        sync_each_batch=sync, checkpointing=ckpt)
            parts = [x for x in (est.state, est.unsharded, est.transient, est.activations, est.context) if x]
            assert cell == [round(x, 1) for x in parts] + [round(est.total, 1)], (model, strategy, sync, ckpt)
    # the terms by hand, 1.1B under FSDP on 4 GPUs with checkpointing (bytes, then GB)
    est = train_memory_estimate(1.10e9, 2048, 22, 32000, 8, 2048, strategy="fsdp", world=4)
    tokens = 8 * 2048
    assert est.state == pytest.approx(16 * 1.10e9 / 4 / 1e9)
    assert est.transient == pytest.approx(2 * 1.10e9 / 22 * 3 / 1e9)
    assert est.activations == pytest.approx((tokens * 2048 * 2 * 22 + 34 * tokens * 2048 + tokens * 32000 * 10) / 1e9)
    no_ckpt = train_memory_estimate(1.10e9, 2048, 22, 32000, 8, 2048, strategy="fsdp", world=4, checkpointing=False)
    assert no_ckpt.activations == pytest.approx((34 * tokens * 2048 * 22 + tokens * 32000 * 10) / 1e9)
    eager = train_memory_estimate(1.10e9, 2048, 22, 32000, 8, 2048, strategy="fsdp", world=4, checkpointing=False,
                                  heads=32, eager_attention=True)
    assert eager.activations - no_ckpt.activations == pytest.approx(5 * 32 * 2048 * 2048 * 8 * 22 / 1e9)


def test_gradient_checkpointing_auto_follows_the_estimate_and_explicit_values_win(monkeypatch, embedded_dir):
    from metaaligner_core import training
    from metaaligner_core.hardware import train_memory_estimate

    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "1")
    dims = training.model_dims("default")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(embedded_dir)
    assert dims["n_params"] == sum(p.numel() for p in model.parameters())  # counted on the meta device
    needed = train_memory_estimate(dims["n_params"], model.config.hidden_size, model.config.num_hidden_layers,
                                   model.config.vocab_size, 8, 2048, strategy="no", checkpointing=False).total
    cfg = dict(data="d", base="default", device="cuda", precision="bf16", attn="sdpa", batch_size=8, max_length=2048)
    for gpu_gb, expected in ((needed * 1.05, False), (needed * 0.95, True)):
        monkeypatch.setattr(training, "device_memory_bytes", lambda device, gb=gpu_gb: int(gb * 1e9))
        rt = training.resolve_runtime(TrainConfig(**cfg))
        assert rt.gradient_checkpointing is expected and rt.memory_estimate_gb == round(needed, 1)
        assert training.resolve_runtime(TrainConfig(**cfg, gradient_checkpointing=not expected)).gradient_checkpointing \
            is (not expected)
    assert TrainConfig(data="d", gradient_checkpointing=None).gradient_checkpointing == "auto"  # CLI: no flag
    assert training.resolve_runtime(TrainConfig(data="d", device="cpu")).gradient_checkpointing is False
    with pytest.raises(MetaAlignerError, match="gradient_checkpointing"):
        TrainConfig(data="d", gradient_checkpointing="sometimes")


# ---------------------------------------------------------------------------------------------
# Padding-free batches with SDPA

@pytest.mark.slow
def test_padding_free_batch_with_sdpa_has_the_padded_batch_loss(tmp_path):
    """The trainer's own collators: one padded batch and the same rows flattened into one
    unpadded row with ``position_ids`` (TRL's padding-free collator). transformers builds a
    block-diagonal causal mask from the restarting positions for SDPA, so the loss (mean over the
    same completion tokens) is the same; with the positions of one long sequence instead, the
    rows would attend to each other and the loss differs."""
    import dataclasses

    import torch

    from metaaligner_core.models import load_tokenizer
    from metaaligner_core.training import build_stage_dataset, load_model, make_trainer, resolve_runtime

    base = tiny_llama_dir(tmp_path / "base")
    tok = load_tokenizer(str(base))
    rows = [row(d, target=t) for d, t in [("green horse", "green quiet horse stands by the river"), ("lamp", "lamp"),
                                          ("seven cloud bread", "seven cloud"), ("apple", "apple stone")]]
    cfg = TrainConfig(data=".", base=str(base), device="cpu", batch_size=len(rows), max_length=128, disable_tqdm=True,
                      group_by_length=False)
    rt = resolve_runtime(cfg)
    assert rt.attn == "sdpa"
    dataset = build_stage_dataset(rows, tok, cfg.max_length)
    model = load_model(str(base), cfg, rt).eval()
    batches = {}
    for free in (False, True):
        trainer = make_trainer(cfg, dataclasses.replace(rt, padding_free=free), model, tok, dataset, tmp_path / str(free))
        batches[free] = next(iter(trainer.get_train_dataloader()))
    padded, flat = batches[False], batches[True]
    assert padded["input_ids"].shape[0] == len(rows) and (padded["attention_mask"] == 0).any()  # really padded
    assert flat["input_ids"].shape[0] == 1 and "attention_mask" not in flat
    assert flat["input_ids"].shape[1] == int(padded["attention_mask"].sum())  # no padding at all
    assert (flat["position_ids"][0] == 0).sum() == len(rows)
    assert int((flat["labels"] != -100).sum()) == int((padded["labels"] != -100).sum())
    with torch.no_grad():
        loss_padded = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"],
                            labels=padded["labels"]).loss
        loss_flat = model(input_ids=flat["input_ids"], position_ids=flat["position_ids"], labels=flat["labels"]).loss
        n = flat["input_ids"].shape[1]
        loss_mixed = model(input_ids=flat["input_ids"], position_ids=torch.arange(n)[None], labels=flat["labels"]).loss
    print(f"loss padded {loss_padded.item():.7f}, flattened {loss_flat.item():.7f}, one sequence {loss_mixed.item():.7f}")
    assert abs(loss_flat.item() - loss_padded.item()) < 1e-6
    assert abs(loss_mixed.item() - loss_padded.item()) > 1e-4  # one long sequence: the rows see each other


def test_fsdp_gradients_are_reduced_in_fp32(monkeypatch):
    """The FSDP plugin the trainer's accelerator holds gets bf16 compute and fp32 reduce-scatter
    (accelerate's own default reduces in bf16); nothing changes without FSDP or mixed precision."""
    import types

    import torch
    from accelerate.utils import FullyShardedDataParallelPlugin

    from metaaligner_core.training import _fp32_gradient_reduction, resolve_runtime

    for version in (2, 1):
        plugin = FullyShardedDataParallelPlugin(fsdp_version=version)
        plugin.set_mixed_precision("bf16")  # what accelerate does for a bf16 launch
        assert plugin.mixed_precision_policy.reduce_dtype == torch.bfloat16
        trainer = types.SimpleNamespace(accelerator=types.SimpleNamespace(state=types.SimpleNamespace(fsdp_plugin=plugin)))
        rt = resolve_runtime(TrainConfig(data="d", device="cpu", precision="bf16"))
        _fp32_gradient_reduction(trainer, rt)
        policy = plugin.mixed_precision_policy
        assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32), version
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
    trainer = types.SimpleNamespace(accelerator=types.SimpleNamespace(state=types.SimpleNamespace(fsdp_plugin=plugin)))
    _fp32_gradient_reduction(trainer, resolve_runtime(TrainConfig(data="d", device="cpu")))  # fp32 training
    assert plugin.mixed_precision_policy is None
