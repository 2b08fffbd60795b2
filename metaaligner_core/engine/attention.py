"""Chunked decode attention on CPU: each decoding step attends in a few runs of rows of similar width.

Registered with transformers' public ``AttentionInterface`` as ``metaaligner_sdpa``; outside a
decoding step planned by the loop it is plain ``sdpa``.
"""
from __future__ import annotations

import logging
import threading

log = logging.getLogger(__name__)

# Rows of a batch use different numbers of cache columns (their prompts and outputs differ in
# length); one attention call over the padded buffer reads every row's keys and values at the
# widest row's length. On a CPU that read is the cost (decode attention is memory-bound), so the
# decoding loop keeps rows sorted by the columns they use, longest first, and splits the batch
# into a few chunks of similar width; each chunk attends only to its own columns.
PLAN = threading.local()  # the decoding loop's current chunk plan (per thread)
CHUNKED_ATTENTION = "metaaligner_sdpa"
CHUNK_COST = 128  # one more attention call costs about as much as reading this many row-columns


def _chunked_sdpa(module, query, key, value, attention_mask, **kwargs):
    """``sdpa`` attention; while decoding under a chunk plan, one call per chunk of rows."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    plan = getattr(PLAN, "chunks", None)
    if plan is None or query.shape[2] != 1 or attention_mask is None or attention_mask.dim() != 4:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    import torch

    n = key.shape[2]
    outs = []
    for a, b, w in plan:
        w = min(w, n)
        out, _ = sdpa_attention_forward(module, query[a:b], key[a:b, :, n - w:], value[a:b, :, n - w:],
                                        attention_mask[a:b, ..., n - w:], **kwargs)
        outs.append(out)
    return torch.cat(outs), None


def use_chunked_attention(model) -> bool:
    """Switch a CPU model on ``sdpa`` to :func:`_chunked_sdpa` (same numbers, fewer bytes read)."""
    impl = getattr(model.config, "_attn_implementation", None)
    if model.device.type != "cpu" or impl not in ("sdpa", CHUNKED_ATTENTION):
        return False
    if impl == CHUNKED_ATTENTION:
        return True
    try:
        from transformers import AttentionInterface, AttentionMaskInterface
        from transformers.masking_utils import sdpa_mask

        AttentionInterface.register(CHUNKED_ATTENTION, _chunked_sdpa)
        AttentionMaskInterface.register(CHUNKED_ATTENTION, sdpa_mask)
        model.set_attn_implementation(CHUNKED_ATTENTION)
    except Exception as e:  # an older transformers or a model that refuses it: plain sdpa
        log.debug("chunked attention unavailable: %s", e)
        return False
    return True


def chunk_plan(widths: list[int], max_chunks: int = 4, cost: int = CHUNK_COST) -> list[tuple[int, int, int]]:
    """Split rows with ``widths`` into at most ``max_chunks`` runs ``(start, end, width)``, width
    the run's widest row, minimising the columns read (rows x width) plus ``cost`` per run. Rows
    sorted by width, longest first, make the split worthwhile."""
    n = len(widths)
    if n == 0:
        return []
    frontier = {0: (0, [])}  # rows covered -> (cost, runs) with k runs
    result = None
    for _ in range(max_chunks):
        nxt: dict[int, tuple] = {}
        for start, (c0, runs) in frontier.items():
            w = 0
            for end in range(start + 1, n + 1):
                w = max(w, widths[end - 1])  # a run reads its widest row's columns (any order is correct)
                c = c0 + (end - start) * w + cost
                if end not in nxt or c < nxt[end][0]:
                    nxt[end] = (c, runs + [(start, end, w)])
        if n in nxt and (result is None or nxt[n][0] < result[0]):
            result = nxt[n]
        frontier = {k: v for k, v in nxt.items() if k < n}
    return result[1]
