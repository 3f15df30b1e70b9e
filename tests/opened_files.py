"""Which files a block of code opens, from Python's `open` audit event (builtins.open, os.open, io).

The hook is installed once per process (audit hooks cannot be removed) and records only while a
`recording()` block is active on any thread.
"""

import contextlib
import os
import sys
import threading

_lock = threading.Lock()
_active: list[list[str]] = []
_installed = False


def _hook(event, args):
    if event == "open" and _active and isinstance(args[0], (str, bytes, os.PathLike)):
        path = os.fsdecode(args[0])
        with _lock:
            for record in _active:
                record.append(path)


@contextlib.contextmanager
def recording():
    """Yields a list that fills with every path opened inside the block."""
    global _installed
    if not _installed:
        sys.addaudithook(_hook)
        _installed = True
    record: list[str] = []
    with _lock:
        _active.append(record)
    try:
        yield record
    finally:
        with _lock:
            _active.remove(record)


def outside(paths, folder) -> list[str]:
    """The paths that resolve outside `folder`."""
    root = os.path.realpath(folder)
    return [p for p in paths if os.path.commonpath([os.path.realpath(p), root]) != root]
