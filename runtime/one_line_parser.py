"""An argparse parser whose usage mistakes are one line on stderr and exit status 2: no usage block, no
traceback. Shared by `python -m runtime.bench` and `python -m export`."""

from __future__ import annotations

import argparse
import sys

EXIT_USAGE = 2


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        print(f"error: {' '.join(message.split())}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
