"""The benchmark's one home: `python -m runtime.bench` (cli), what it measures and how (measure, rounds),
the models it runs (models, presets: random weights at real architectures), the diffusers baseline
(baselines), and the result file every benchmark writes (results, provenance; benchmarks/ uses them too).

Importing the package stays light (presets and provenance are imported by tests and kernel benchmarks).
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    """python -m runtime.bench [args]; returns the exit status."""
    from runtime.bench.cli import main as cli_main

    return cli_main(argv)
