"""python -m export --model PATH --out DIR --format onnx|tensorrt|triton-repo [--dtype ...] [--min/--opt/--max BxHxW]

Writes DIR/text_encoder.onnx, unet.onnx, vae_decoder.onnx, vae_encoder.onnx (and <network>.plan
engines with --format tensorrt) plus DIR/manifest.json; --format triton-repo writes a Triton Inference
Server model repository instead (export/triton_repo.py). Running again with the same inputs reuses
what is there; changed weights or options rebuild only what they affect.
"""

from __future__ import annotations

import argparse
import logging
import sys

# Only the standard library at import time: torch's import takes seconds, and an interrupt during it
# must end in one line, not a traceback (main() catches it). The rest is imported inside main().
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130
_MESSAGE_LIMIT = 600  # characters of an error shown on its one line


def _shape(text: str):
    from export.specs import ImageShape

    try:
        return ImageShape.parse(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def parse_args(argv=None) -> argparse.Namespace:
    from export.specs import NETWORKS, ShapeProfile
    from export.tensorrt import PRECISIONS
    from runtime.one_line_parser import OneLineParser

    defaults = ShapeProfile()
    parser = OneLineParser(
        prog="python -m export",
        description=__doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="diffusers folder or single-file .safetensors")
    parser.add_argument("--out", required=True, help="export directory (empty, new, or one of ours)")
    parser.add_argument("--format", choices=("onnx", "tensorrt", "triton-repo"), default="onnx")
    parser.add_argument(
        "--dtype",
        choices=PRECISIONS,
        default=None,
        help="onnx: the graphs' dtype, fp32 (default) or fp16. tensorrt: the engine "
        "precision, fp16 (default), bf16 or fp32, built from fp32 graphs",
    )
    for bound in ("min", "opt", "max"):
        parser.add_argument(
            f"--{bound}",
            type=_shape,
            default=getattr(defaults, bound),
            metavar="BxHxW",
            help=f"{bound} image batch x height x width (default {getattr(defaults, bound)})",
        )
    parser.add_argument(
        "--networks",
        nargs="+",
        choices=NETWORKS,
        default=None,
        help="export only these (default: all the model has: four, five for an SDXL base)",
    )
    parser.add_argument("--device", default="cpu", help="where to run the model while exporting")
    parser.add_argument("--refittable", action="store_true", help="tensorrt: build refittable engines")
    parser.add_argument(
        "--workspace-gb", type=float, default=None, help="tensorrt: cap on the builder's scratch memory"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (the log remains)")
    return parser.parse_args(argv)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= _MESSAGE_LIMIT else text[:_MESSAGE_LIMIT] + " ..."


def main(argv=None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print(
            "error: interrupted; finished artifacts are kept and listed in manifest.json, the one in "
            "progress was not written",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED


def _main(argv) -> int:
    from export.manifest import ArtifactError
    from export.specs import ShapeProfile
    from export.tensorrt import TensorRTUnavailable

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        profile = ShapeProfile(args.min, args.opt, args.max)
        profile.check_multiple_of(8)  # every Stable Diffusion VAE downsamples by 8
        if args.format == "triton-repo":
            from export.triton_repo import write_triton_repo

            if args.dtype not in (None, "fp32", "fp16"):
                raise ValueError("--format triton-repo writes ONNX graphs: --dtype fp32 or fp16")
            paths = write_triton_repo(
                args.out,
                args.model,
                dtype=args.dtype or "fp32",
                profile=profile,
                device=args.device,
                progress=not args.no_progress,
            )
        elif args.format == "onnx":
            from export.onnx import ensure_onnx

            if args.dtype == "bf16":
                raise ValueError("--dtype bf16 applies to --format tensorrt; ONNX export is fp32 or fp16")
            paths = ensure_onnx(
                args.out,
                args.model,
                dtype=args.dtype or "fp32",
                profile=profile,
                device=args.device,
                networks=args.networks,
                progress=not args.no_progress,
            )
        else:
            from export.tensorrt import EngineOptions, ensure_engines

            workspace = int(args.workspace_gb * (1 << 30)) if args.workspace_gb else None
            options = EngineOptions(
                precision=args.dtype or "fp16", refittable=args.refittable, workspace_bytes=workspace
            )
            paths = ensure_engines(
                args.out,
                args.model,
                profile=profile,
                options=options,
                networks=args.networks,
                device=args.device,
                progress=not args.no_progress,
            )
    except (ArtifactError, ValueError, FileNotFoundError, TensorRTUnavailable) as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as err:  # disk full, permissions, ...: files are moved in only once complete
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return EXIT_ERROR
    except RuntimeError as err:  # torch's exporter and onnx raise these for graphs they cannot handle
        print(f"error: exporting failed: {type(err).__name__}: {_one_line(err)}", file=sys.stderr)
        return EXIT_ERROR
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
