"""Where a network's weights live, so a CUDA-graph cache can tell when its graphs went stale.

A graph reads every weight by the address it had at capture. Writes into the same memory (a LoRA merge
`copy_`, `load_state_dict`) keep the graphs valid and are seen by the next replay; anything that puts a
weight in new memory leaves them reading freed memory: `.to()` / `.half()` (every Parameter's `.data`
is replaced, and the fused q/k/v and stacked cross-attention K/V weights are concatenated again), an
assigned `.data`, an upcast VAE put back. Comparing the addresses before each replay catches all of
these, wherever they come from, instead of a list of call sites that must each remember to drop graphs.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class WeightsWatch:
    """The addresses of every parameter, buffer and plain tensor attribute (a fused weight kept beside
    its Parameters) of `modules` and their submodules; `moved()` says whether any changed since the
    last call. The module tree is walked once, here (a walk costs milliseconds; a look, the addresses
    only): the backends substitute modules at load time, before a pipeline builds its graph runners."""

    def __init__(self, modules: Iterable[torch.nn.Module]):
        # The non-empty _parameters / _buffers dicts, live (a buffer replaced by .to() is a new tensor there),
        # and (a submodule's __dict__, name) of each plain tensor attribute. A fused weight first set after
        # this walk is not watched, but setting it re-points Parameters into it, which are.
        self._tables = []
        self._attributes = []
        for module in modules:
            for sub in module.modules():
                self._tables += [table for table in (sub._parameters, sub._buffers) if table]
                state = vars(sub)
                self._attributes += [(state, k) for k, v in state.items() if isinstance(v, torch.Tensor)]
        self._last = self.addresses()

    def addresses(self) -> tuple[int, ...]:
        """Host-side only: no device sync."""
        found = [t.data_ptr() for table in self._tables for t in table.values() if t is not None]
        found += [getattr(state.get(name), "data_ptr", int)() for state, name in self._attributes]
        return tuple(found)

    def moved(self) -> bool:
        now = self.addresses()
        moved, self._last = now != self._last, now
        return moved


def torch_modules(*networks) -> list[torch.nn.Module]:
    """The networks that are torch modules (an exported backend's stand-ins hold their weights elsewhere)."""
    return [n for n in networks if isinstance(n, torch.nn.Module)]
