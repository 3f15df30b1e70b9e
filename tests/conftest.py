"""Suite-wide set-up.

Triton decides at decoration time whether a kernel is compiled or interpreted, so the interpreter
switch must be set before anything imports `kernels`: on a machine without CUDA every Triton kernel
runs under TRITON_INTERPRET=1 (numpy on the CPU).
"""

import os

import pytest
import torch

from tests import seeding

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failing test's report names the seeds it derived (tests/seeding.py), so the failure reproduces."""
    outcome = yield
    report = outcome.get_result()
    if call.when != "call":
        return
    seeds = seeding.used_by(item.nodeid)
    if report.failed and seeds:
        report.sections.append(("derived seeds", "\n".join(seeds)))
