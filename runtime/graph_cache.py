"""What every CUDA-graph runner shares: a bounded LRU of captured entries over one memory pool, dropped
whole when the weights its graphs read move (runtime/graph_weights.py) or when a capture runs out of memory.

CudaGraphDenoiser (runtime/graphs.py) and CudaGraphCall (runtime/graph_calls.py) build on it; each keeps its
own key, entry and capture.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable, Sequence

import torch

from runtime.graph_weights import WeightsWatch

log = logging.getLogger(__name__)


class GraphCache:
    """Entries by key, least recently used first; the caller holds `_lock` around every use."""

    def __init__(self, max_entries: int, graph_api, weights: Sequence[torch.nn.Module]):
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {max_entries}")
        self._weights = WeightsWatch(weights)
        self._cuda = torch.cuda if graph_api is None else graph_api
        self._entries: collections.OrderedDict = collections.OrderedDict()
        self.max_entries = max_entries
        self._lock = threading.Lock()
        # One memory pool for every entry. Safe because replays never overlap (the lock, one stream)
        # and no graph reads pool memory written by another entry's graphs.
        self._pool = None

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> list:
        """The cached keys, least recently used first."""
        with self._lock:
            return list(self._entries)

    def clear(self) -> None:
        """Release every graph and the memory pool."""
        with self._lock:
            self._release()

    def _release(self) -> None:
        self._entries.clear()
        self._pool = None
        self._cuda.empty_cache()

    def _graph_pool(self):
        if self._pool is None:
            self._pool = self._cuda.graph_pool_handle()
        return self._pool

    def _drop_if_weights_moved(self, message: str) -> None:
        """Release everything if a weight moved; `message` is logged with the number of entries dropped."""
        if self._weights.moved() and self._entries:
            log.info(message, len(self._entries))
            self._release()

    def _capture_new(self, key, capture: Callable[[], object], out_of_memory: str):
        """Make room, `capture()` the entry for `key` and keep it. Out of memory releases the cache and
        raises a RuntimeError: `out_of_memory`, then how to go on."""
        while len(self._entries) >= self.max_entries:
            self._entries.popitem(last=False)
        try:
            entry = capture()
        except torch.cuda.OutOfMemoryError as err:
            self._release()
            raise RuntimeError(f"{out_of_memory}. Try a smaller batch or size.") from err
        self._entries[key] = entry
        return entry
