"""Reward-model labels for preference pairs (the paper's HH-RLHF labelling, Table 5).

The paper labels every HH-RLHF pair on Harmlessness, Helpfulness and Humour with three open
reward models; the authors' pipeline (``prepare_dataset_with_rewards.py`` with RiC's
``multi_reward_models.py`` and ``utils.get_rewards``; summarised in
``../shared/reference/official-prompts.md``) scores each response like this, and so does
:class:`RewardScorer`:

* a model whose name contains ``humor`` scores the **response alone** and its reward is the
  logit at **index 1** (the "humorous" class of a two-class classifier); every other model scores
  the **(query, response) pair**, encoded by its own tokenizer as a text pair, and its reward is
  its single logit (index 0);
* inputs are truncated to ``min(tokenizer.model_max_length, 1024)`` tokens (the tokenizer's
  ``longest_first`` pair truncation);
* the HH-RLHF query is the conversation up to the last ``\\n\\nAssistant:``, joined back and
  ending in ``' \\n\\nAssistant:'``; the response is the final assistant turn, stripped (this is
  what :func:`metaaligner_core.dataset.make_hh_rlhf` builds);
* raw rewards are rounded to one decimal (``np.round(r, 1)``) and compared: ``>``, ``<``, or
  ``=`` when they round equal — which is where the paper's HH-RLHF *equal* rows come from. The
  authors then normalise the rounded scores by their mean and standard deviation, an increasing
  affine map that changes no comparison, so it is left out here. ``tie_margin`` widens the tie:
  ``=`` when the rounded rewards differ by at most the margin.

Differences, by design: rows are scored in length-sorted, right-padded batches instead of one
at a time (the same logits up to floating-point rounding in the padded matrix products;
``bench/bench_reward.py`` measures the speed-up and the agreement); on CPU the models run in
fp32 (the authors load them in bf16 on GPUs, as this module does on CUDA); the authors also drop
records whose full transcript is shorter than 8 or longer than ``model_max_length`` tokens, this
module keeps them (truncated).

Raw rewards are cached in a JSON Lines file (``reward_scores.jsonl`` beside the dataset), keyed by
the model, the scoring mode and the text, so a rebuild scores only what is new.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from .errors import MetaAlignerError

log = logging.getLogger(__name__)

# The paper's three HH-RLHF reward models (Table 5), keyed by the objective each one labels.
HH_RLHF_REWARD_MODELS = {
    "harmlessness": "Ray2333/gpt2-large-harmless-reward_model",
    "helpfulness": "Ray2333/gpt2-large-helpful-reward_model",
    "humour": "mohameddhiab/humor-no-humor",
}
# `--reward-models hh-rlhf` names that set.
PRESETS = {"hh-rlhf": HH_RLHF_REWARD_MODELS}
MAX_LENGTH = 1024  # the authors' cap on reward-model inputs
CACHE_FILE = "reward_scores.jsonl"


@dataclass(frozen=True)
class RewardModelSpec:
    """One reward model and how it scores: the objective key it labels, the model (Hugging Face
    id or local directory), whether it reads the response alone, and which logit is the reward."""

    key: str
    model: str
    response_only: bool
    logit_index: int

    @classmethod
    def authors(cls, key: str, model: str) -> "RewardModelSpec":
        """The authors' rule: ``humor`` models read the response alone and give logit 1."""
        humor = "humor" in model.lower()
        return cls(key, model, response_only=humor, logit_index=1 if humor else 0)

    @property
    def mode(self) -> str:
        return "response" if self.response_only else "pair"


def parse_reward_models(spec: str, resolve_key=None) -> list[RewardModelSpec]:
    """``KEY=MODEL[,KEY=MODEL...]`` or a preset name (``hh-rlhf``) into specs.

    ``MODEL`` may end in ``#response`` / ``#pair`` and ``#logit=N`` to override the authors' rule
    for models they did not use. ``resolve_key`` maps each KEY to an objective key (raising on an
    unknown one).
    """
    spec = (spec or "").strip()
    if not spec:
        raise MetaAlignerError("--reward-models: empty (expected KEY=MODEL[,KEY=MODEL...] or hh-rlhf)")
    if spec.lower() in PRESETS:
        items = list(PRESETS[spec.lower()].items())
    else:
        items = []
        for part in spec.split(","):
            key, eq, model = part.partition("=")
            if not eq or not key.strip() or not model.strip():
                raise MetaAlignerError(f'--reward-models: "{part.strip()}" is not KEY=MODEL '
                                       f'(e.g. harmlessness={HH_RLHF_REWARD_MODELS["harmlessness"]}, '
                                       f'or the preset: hh-rlhf)')
            items.append((key.strip(), model.strip()))
    out, seen = [], set()
    for key, model in items:
        name, *opts = model.split("#")
        rm = RewardModelSpec.authors(key, name.strip())
        for opt in (o.strip().lower() for o in opts):
            if opt in ("response", "pair"):
                rm = RewardModelSpec(rm.key, rm.model, opt == "response", rm.logit_index)
            elif opt.startswith("logit="):
                try:
                    rm = RewardModelSpec(rm.key, rm.model, rm.response_only, int(opt[6:]))
                except ValueError:
                    raise MetaAlignerError(f'--reward-models: "{model}": logit=N needs a whole number') from None
            else:
                raise MetaAlignerError(f'--reward-models: "{model}": unknown option #{opt} '
                                       "(valid: #response, #pair, #logit=N)")
        k = resolve_key(rm.key) if resolve_key else rm.key
        if k in seen:
            raise MetaAlignerError(f'--reward-models: objective "{key}" is given twice')
        seen.add(k)
        out.append(RewardModelSpec(k, rm.model, rm.response_only, rm.logit_index))
    return out


def round_reward(x: float) -> float:
    """The authors' rounding (``np.round(r, 1)``: round half to even after scaling by 10)."""
    import numpy as np

    return float(np.round(x, 1))


def reward_label(r1: float, r2: float, tie_margin: float = 0.0) -> str:
    """``>``, ``<`` or ``=`` for two raw rewards: rounded to one decimal, then compared; a gap of at
    most ``tie_margin`` between the rounded rewards is a tie."""
    a, b = round_reward(r1), round_reward(r2)
    # round() absorbs binary noise in the difference of two one-decimal numbers (0.3 - 0.2).
    if round(abs(a - b), 6) <= tie_margin:
        return "="
    return ">" if a > b else "<"


def cache_key(rm: RewardModelSpec, max_length: int, query: str, response: str) -> str:
    text = json.dumps([rm.model, rm.mode, rm.logit_index, max_length, "" if rm.response_only else query, response],
                      ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


class RewardCache:
    """Raw rewards on disk, one ``{"key", "reward"}`` line each; appended as batches finish, so an
    interrupted scoring run keeps what it scored."""

    def __init__(self, path: str | os.PathLike | None):
        self.path = Path(path) if path else None
        self.values: dict[str, float] = {}
        if self.path and self.path.is_file():
            with open(self.path, encoding="utf-8") as fh:
                for line in fh:
                    try:
                        rec = json.loads(line)
                        self.values[rec["key"]] = float(rec["reward"])
                    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                        continue  # a line cut short by an interruption: scored again

    def add(self, items: Iterable[tuple[str, float]]) -> None:
        items = list(items)
        self.values.update(items)
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write("".join(json.dumps({"key": k, "reward": v}) + "\n" for k, v in items))


def _auto_device(device: str | None) -> str:
    if device and device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class RewardScorer:
    """One loaded reward model; :meth:`score` gives raw rewards for (query, response) rows."""

    def __init__(self, rm: RewardModelSpec, device: str | None = None, batch_size: int | None = None,
                 dtype: str | None = None, max_batch_tokens: int | None = None):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from .models import resolve_pretrained

        self.rm = rm
        self.device = _auto_device(device)
        # A GPU wants big batches; on a CPU large padded activations fall out of cache and the
        # element-wise layers become memory-bound, so CPU batches stay small (bench_reward.py).
        # On this project's 2-core CPU a 6-layer model scored one row at a time beat batches of 16
        # (0.4-0.6x), a 2-layer one did not (1.9x): compute-bound CPUs default to one row.
        gpu = self.device.startswith("cuda")
        self.batch_size = max(1, int(batch_size)) if batch_size else (16 if gpu else 1)
        if max_batch_tokens is None:
            max_batch_tokens = 8192 if gpu else 1024
        self.max_batch_tokens = max(1, int(max_batch_tokens))
        # The authors load reward models in bf16 (on GPUs); a CPU runs fp32.
        dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}.get(
            dtype or ("bf16" if self.device.startswith("cuda") else "fp32"))
        try:
            name, extra = resolve_pretrained(rm.model)
        except MetaAlignerError as e:
            raise MetaAlignerError(f'cannot load reward model "{rm.model}" ({rm.key}): {e}') from None
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(name, **extra)
            self.model = AutoModelForSequenceClassification.from_pretrained(name, dtype=dt, **extra)
        except (OSError, ValueError) as e:
            raise MetaAlignerError(f'cannot load reward model "{rm.model}" ({rm.key}): '
                                   f"{str(e).splitlines()[0]}") from None
        n_labels = self.model.config.num_labels
        if not 0 <= rm.logit_index < n_labels:
            raise MetaAlignerError(f'reward model "{rm.model}" has {n_labels} logit(s); index {rm.logit_index} '
                                   "does not exist (choose one with #logit=N)")
        # Batches are right-padded; GPT-2-style models have no pad token and the classification
        # head pools the last non-pad token, so the pad id must be known to the model.
        self.tokenizer.padding_side = "right"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.max_length = min(int(self.tokenizer.model_max_length), MAX_LENGTH)
        # A decoder's classification head ("score", pooling the last non-pad token) reads only
        # causal attention: with right padding no real token can see a pad, so the attention mask
        # can be left out. That keeps PyTorch on its fused causal kernel (a padding mask sends
        # it to a slower general path). Encoders (BERT-style "classifier" heads) keep the mask.
        self.causal_head = hasattr(self.model, "score") and not self.model.config.is_encoder_decoder
        self.model.to(self.device).eval()

    def _encode(self, queries: Sequence[str], responses: Sequence[str], padding: bool, tensors: bool = True):
        pt = "pt" if tensors else None
        if self.rm.response_only:
            return self.tokenizer(list(responses), truncation=True, max_length=self.max_length,
                                  padding=padding, return_tensors=pt)
        return self.tokenizer(list(queries), list(responses), truncation=True, max_length=self.max_length,
                              padding=padding, return_tensors=pt)

    def score_one(self, query: str, response: str) -> float:
        """One row as the authors score it: one encoding, one forward pass, no padding."""
        import torch

        with torch.no_grad():
            inputs = self._encode([query], [response], padding=False).to(self.device)
            return float(self.model(**inputs).logits[0][self.rm.logit_index].float())

    def score(self, queries: Sequence[str], responses: Sequence[str], progress: bool = False) -> list[float]:
        """Raw rewards, in input order.

        Every row is encoded once, exactly as :meth:`score_one` encodes it; rows are sorted by
        token count and cut into batches of at most ``batch_size`` rows, ``max_batch_tokens``
        padded tokens and 10% padding, so long rows do not drag a large padded batch through
        attention and short rows share one forward pass. Right padding, so positions are those of
        the unpadded row.
        """
        import torch

        if len(queries) != len(responses):
            raise ValueError("queries and responses differ in length")
        enc = self._encode(queries, responses, padding=False, tensors=False)
        ids = enc["input_ids"]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out: list[float] = [0.0] * len(ids)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(order), desc=f"reward {self.rm.key}", unit=" resp", mininterval=1.0)
        start = 0
        with torch.no_grad():
            while start < len(order):
                end = start + 1
                # sorted ascending: the batch's last row is its longest, so padded size = rows x that length
                real = len(ids[order[start]])
                while end < len(order) and end - start < self.batch_size:
                    width, rows = len(ids[order[end]]), end - start + 1
                    # stop at the token budget, or where padding would exceed a tenth of the batch
                    if rows * width > self.max_batch_tokens or rows * width > 1.1 * (real + width):
                        break
                    real += width
                    end += 1
                idx = order[start:end]
                batch = self.tokenizer.pad({k: [enc[k][i] for i in idx] for k in enc}, padding=True,
                                           return_tensors="pt").to(self.device)
                if self.causal_head:
                    batch.pop("attention_mask", None)
                logits = self.model(**batch).logits[:, self.rm.logit_index].float().cpu().tolist()
                for i, v in zip(idx, logits):
                    out[i] = v
                if bar is not None:
                    bar.update(len(idx))
                start = end
        if bar is not None:
            bar.close()
        return out

    def close(self) -> None:
        """Release the model (and its GPU memory) before the next one loads."""
        import gc

        import torch

        del self.model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def label_records(records: list, specs: Sequence[RewardModelSpec], *, cache_path=None, tie_margin: float = 0.0,
                  device: str | None = None, batch_size: int | None = None, progress: bool = False,
                  stats: dict | None = None) -> None:
    """Score both responses of every record with every reward model (cached) and set
    ``record.labels[spec.key]`` from the rounded rewards. ``stats`` receives per-key counts."""
    if tie_margin < 0:
        raise MetaAlignerError("--tie-margin: expected a number >= 0")
    cache = RewardCache(cache_path)
    for rm in specs:
        rows = [(r.query, r.response_1) for r in records] + [(r.query, r.response_2) for r in records]
        todo: dict[str, tuple[str, str]] = {}
        # The cache key holds the truncation length, known once the tokenizer is loaded; the cache
        # remembers it per model, so a fully cached rebuild loads no model at all.
        max_len = _cached_max_length(cache, rm)
        keys = [cache_key(rm, max_len, q, resp) for q, resp in rows] if max_len else None
        if keys is None or any(k not in cache.values for k in keys):
            scorer = RewardScorer(rm, device=device, batch_size=batch_size)
            max_len = scorer.max_length
            keys = [cache_key(rm, max_len, q, resp) for q, resp in rows]
            for k, row in zip(keys, rows):
                if k not in cache.values:
                    todo.setdefault(k, row)
            log.info("%s: scoring %d responses with %s (%d cached)", rm.key, len(todo), rm.model,
                     len(set(keys)) - len(todo))
            pending = list(todo.items())
            step = max(1, 64 * scorer.batch_size)  # cache every few batches: an interruption loses little
            bar = None
            if progress:
                from tqdm import tqdm

                bar = tqdm(total=len(pending), desc=f"reward {rm.key}", unit=" resp", mininterval=1.0)
            for start in range(0, len(pending), step):
                chunk = pending[start:start + step]
                values = scorer.score([q for _, (q, _) in chunk], [r for _, (_, r) in chunk])
                cache.add((k, v) for (k, _), v in zip(chunk, values))
                if bar is not None:
                    bar.update(len(chunk))
            if bar is not None:
                bar.close()
            _remember_max_length(cache, rm, max_len)
            scorer.close()
        else:
            log.info("%s: all %d responses cached", rm.key, len(keys))
        n = len(records)
        counts = {">": 0, "<": 0, "=": 0}
        for i, rec in enumerate(records):
            label = reward_label(cache.values[keys[i]], cache.values[keys[n + i]], tie_margin)
            rec.labels[rm.key] = label
            counts[label] += 1
        if stats is not None:
            stats[rm.key] = {"model": rm.model, "scores": rm.mode, "logit": rm.logit_index,
                             "max_length": max_len, "labels": counts}


def _meta_key(rm: RewardModelSpec) -> str:
    return "max_length:" + hashlib.sha256(json.dumps([rm.model, rm.mode, rm.logit_index]).encode()).hexdigest()[:24]


def _cached_max_length(cache: RewardCache, rm: RewardModelSpec) -> int | None:
    v = cache.values.get(_meta_key(rm))
    return int(v) if v else None


def _remember_max_length(cache: RewardCache, rm: RewardModelSpec, max_len: int) -> None:
    if cache.values.get(_meta_key(rm)) != float(max_len):
        cache.add([(_meta_key(rm), float(max_len))])
