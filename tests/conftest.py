"""Suite-wide set-up.

Triton decides at decoration time whether a kernel is compiled or interpreted, so the interpreter
switch must be set before anything imports `kernels`: on a machine without CUDA every Triton kernel
runs under TRITON_INTERPRET=1 (numpy on the CPU).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
