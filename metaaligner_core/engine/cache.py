"""The KV cache of the decoding loop: one buffer per batch instead of a concatenation per step.

transformers' ``DynamicCache`` concatenates every layer's keys and values on every step, which
was 70 % of a batch-16 decoding step on two CPU cores. :func:`new_cache` returns a
``DynamicCache`` whose full-attention layers write into a buffer allocated once per batch; rows
can be written one at a time, and finished rows leave by compacting the buffer in place.
"""
from __future__ import annotations

def _buffered_layer_class():
    from transformers.cache_utils import DynamicLayer

    class _BufferedLayer(DynamicLayer):
        """A ``DynamicLayer`` over one buffer allocated per batch, instead of ``torch.cat`` per step.

        ``keys``/``values`` are views ``[rows, heads, length, dim]`` of the buffer, so the rest
        of transformers (mask sizes, sequence length) works unchanged. Rows can be written one
        at a time (``write``), and dropping finished rows compacts the buffer in place.
        """

        def __init__(self, reserve: int = 0):
            super().__init__()
            self.reserve = reserve
            self._k = self._v = None
            self._rows = self._len = 0

        def allocate(self, like_k, like_v, rows: int, capacity: int) -> None:
            self.lazy_initialization(like_k, like_v)
            # Zeros, not empty: masked (padding) positions must hold finite numbers.
            self._k = like_k.new_zeros((rows, like_k.shape[1], capacity, like_k.shape[-1]))
            self._v = like_v.new_zeros((rows, like_v.shape[1], capacity, like_v.shape[-1]))
            self._rows, self._len = rows, 0
            self._view()

        def _view(self) -> None:
            self.keys = self._k[:self._rows, :, :self._len]
            self.values = self._v[:self._rows, :, :self._len]

        def write(self, rows, start: int, keys, values) -> None:
            """Copy ``keys``/``values`` into buffer rows ``rows`` from column ``start`` on."""
            end = start + keys.shape[-2]
            self._k[rows, :, start:end] = keys
            self._v[rows, :, start:end] = values

        def set_length(self, n: int) -> None:
            self._len = n
            self._view()

        def update(self, key_states, value_states, *args, **kwargs):
            if self._k is None:
                self.allocate(key_states, value_states, key_states.shape[0], key_states.shape[-2] + self.reserve)
            n, m = self._len, self._len + key_states.shape[-2]
            if m > self._k.shape[-2]:  # more tokens than reserved: grow once, with the reserve again
                k, v = self._k, self._v
                self.allocate(key_states, value_states, k.shape[0], m + self.reserve)
                self._k[:, :, :n], self._v[:, :, :n] = k[:, :, :n], v[:, :, :n]
                self._rows = key_states.shape[0]
            self._k[:self._rows, :, n:m] = key_states
            self._v[:self._rows, :, n:m] = value_states
            self.set_length(m)
            return self.keys, self.values

        def move_columns(self, src: int, end: int, dst: int) -> None:
            """Move columns ``[src, end)`` of the live rows to start at ``dst`` (growing if needed)."""
            width = end - src
            if dst + width + self.reserve > self._k.shape[-2]:
                k, v, rows, n = self._k, self._v, self._rows, self._len
                self.allocate(k, v, k.shape[0], dst + width + self.reserve)
                self._k[:, :, :n], self._v[:, :, :n] = k[:, :, :n], v[:, :, :n]
                self._rows, self._len = rows, n
            self._k[:self._rows, :, dst:dst + width] = self._k[:self._rows, :, src:end].clone()
            self._v[:self._rows, :, dst:dst + width] = self._v[:self._rows, :, src:end].clone()

        def set_rows(self, rows: int) -> None:
            self._rows = rows
            self._view()

        def batch_select_indices(self, indices) -> None:
            k = len(indices)
            self._k[:k, :, :self._len] = self._k[indices, :, :self._len]
            self._v[:k, :, :self._len] = self._v[indices, :, :self._len]
            self._rows = k
            self._view()

    return _BufferedLayer


_LAYER_CLASS = None


def new_cache(config, reserve: int = 0):
    """A ``DynamicCache`` whose full-attention layers are :class:`_BufferedLayer` s."""
    global _LAYER_CLASS
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    if _LAYER_CLASS is None:
        _LAYER_CLASS = _buffered_layer_class()
    cache = DynamicCache(config=config)
    cache.layers = [_LAYER_CLASS(reserve) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def all_buffered(cache) -> bool:
    return all(isinstance(layer, _LAYER_CLASS) for layer in cache.layers)
