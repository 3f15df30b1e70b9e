"""Several layers' Parameters as row blocks of one tensor, so one GEMM can run them all.

`stack_rows(params, stacked)` concatenates the Parameters (weights [out, in], or biases [out]) row-wise
and re-points each Parameter to its row block of the result: the stack is not a second copy, so in-place
edits of any Parameter (a LoRA, load_state_dict) reach it. Whatever gives a Parameter storage of its own
(`.to()`, `load_state_dict(assign=True)`, a deepcopy) breaks that sharing; `stack_rows` checks it on every
call and stacks again where it is broken, so a GEMM on the stack never reads stale weights.
Used by cross_kv.py (the cross-attention K/V) and time_projection.py (every resnet's time projection).
"""

from __future__ import annotations

import torch


def shares(params: list[torch.Tensor], stacked: torch.Tensor | None) -> bool:
    """Whether every tensor of `params` is still its row block of `stacked`, in order."""
    if stacked is None:
        return False
    row = 0
    for p in params:
        if (
            p.device != stacked.device
            or p.dtype != stacked.dtype
            or p.stride() != stacked.stride()
            or row + p.shape[0] > stacked.shape[0]
            or p.data_ptr() != stacked[row].data_ptr()
        ):
            return False
        row += p.shape[0]
    return row == stacked.shape[0]


def stack_rows(params: list[torch.nn.Parameter], stacked: torch.Tensor | None) -> torch.Tensor:
    """`stacked` if every Parameter still lives in it, else a new row-wise stack of their current values,
    with the Parameters re-pointed into it."""
    if shares(params, stacked):
        return stacked
    # Outside inference mode: the Parameters become views of this tensor, and a later in-place edit
    # outside inference mode (a LoRA under no_grad) must be allowed on them.
    with torch.inference_mode(False), torch.no_grad():
        stacked = torch.cat([p.detach() for p in params])
        row = 0
        for p in params:
            rows = p.shape[0]
            p.data = stacked[row : row + rows]
            row += rows
    return stacked
