"""The one seed policy for randomized tests: a seed is derived from the test's node id (which holds its
parameters) and whatever else the caller names (a shape, a dtype), never drawn from the clock and never
set globally; every seed a test used is printed when it fails (conftest.py's report hook).

    gen = seeding.generator("x", shape, dtype)      # a CPU torch.Generator for this test and these parts
    seed = seeding.derived_seed("weights")          # the int itself, for numpy or a model factory
    with seeding.global_rng(seed): module = Net()   # code that only draws from torch's global RNG

The same test with the same parameters gets the same numbers on every run and in any order, so a
failure reproduces with `pytest <node id>`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os

import torch

SEED_RANGE = 2**31
USED_SEEDS = "derived seeds"  # the user_properties name the report hook reads


def _current_test() -> str:
    # pytest sets this for the running test ("path::name[params] (call)"); outside pytest, no test.
    return os.environ.get("PYTEST_CURRENT_TEST", "no test").rsplit(" ", 1)[0]


def derived_seed(*parts) -> int:
    """A seed in [0, 2**31) from the running test's node id and `parts`; recorded for the failure report."""
    test = _current_test()
    key = "::".join([test, *(repr(part) for part in parts)])
    seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") % SEED_RANGE
    _record(test, parts, seed)
    return seed


def generator(*parts) -> torch.Generator:
    """A CPU generator seeded with derived_seed(*parts)."""
    return torch.Generator("cpu").manual_seed(derived_seed(*parts))


@contextlib.contextmanager
def global_rng(seed: int):
    """torch's global RNG seeded inside the block and restored after it (torch.random.fork_rng), for code
    that takes no generator (module construction); nothing leaks to later tests."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


_used: dict[str, list[str]] = {}


def _record(test: str, parts, seed: int) -> None:
    line = f"{seed} from {parts!r}" if parts else str(seed)
    if line not in _used.setdefault(test, []):
        _used[test].append(line)


def used_by(nodeid: str) -> list[str]:
    """The seeds the test `nodeid` derived (for the report hook), forgotten once read."""
    return _used.pop(nodeid, [])
