"""Command line: `python -m runtime generate --model PATH --prompt "..." --out out.png [options]`.

txt2img by default; `--init-image` makes it img2img, `--init-image` with `--mask` inpainting.
With --num-images N the files are OUT, then OUT's stem with -1, -2, ... (out.png, out-1.png, out-2.png).
Every PNG carries the generation parameters as tEXt entries ("parameters" in A1111's format, plus one
entry per field). Files are written only after the whole run succeeded, each through a temp file in the
same folder, so a failed run leaves no partial output (an existing --out is replaced only on success).
Errors print one line to stderr and exit with status 2.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class CLIError(Exception):
    """A problem with the command line's inputs, reported as one line."""


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        raise CLIError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="python -m runtime", description="Stable Diffusion image generation")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_OneLineParser)
    gen = commands.add_parser("generate", help="txt2img, img2img (--init-image) or inpaint (--mask)")
    gen.add_argument("--model", required=True, help="diffusers folder or single-file .safetensors")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--out", required=True, help="output PNG path (more images: OUT-1.png, OUT-2.png, ...)")
    gen.add_argument("--negative-prompt", default=None)
    gen.add_argument("--steps", type=int, default=30)
    gen.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance; <= 1 turns it off")
    gen.add_argument("--seed", type=int, default=None, help="default: random (written into the PNG)")
    gen.add_argument("--width", type=int, default=None)
    gen.add_argument("--height", type=int, default=None)
    gen.add_argument("--scheduler", default=None,
                     help="ddim, pndm, euler, euler_a, dpmpp_2m, dpmpp_2m_karras or lcm (default: the model's)")
    gen.add_argument("--num-images", type=int, default=1)
    gen.add_argument("--backend", default="torch")
    gen.add_argument("--device", default="cpu")
    gen.add_argument("--dtype", default="fp32")
    gen.add_argument("--init-image", default=None, help="img2img / inpainting source image")
    gen.add_argument("--strength", type=float, default=None,
                     help="how much of the init image to repaint, in (0, 1] (default 0.75 img2img, 1.0 inpaint)")
    gen.add_argument("--mask", default=None, help="inpainting mask (white = repaint); needs --init-image")
    gen.add_argument("--no-progress", action="store_true", help="no progress bar")
    gen.add_argument("--refiner", default=None, help="SDXL refiner (folder or .safetensors) that finishes the image")
    gen.add_argument("--refiner-start", type=float, default=None,
                     help="fraction of the denoising the base does before the refiner (default 0.8)")
    gen.add_argument("--vae", default=None, help="a separate VAE (diffusers folder or .safetensors)")
    return parser


def output_paths(out: Path, count: int) -> list[Path]:
    """out.png, out-1.png, out-2.png, ... (`count` paths)."""
    return [out] + [out.with_name(f"{out.stem}-{index}{out.suffix}") for index in range(1, count)]


def _check_paths(args) -> None:
    """Input and output checks that need no model, so mistakes surface before minutes of loading."""
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise CLIError(f"--out must be a .png file, got {args.out!r}")
    if not out.parent.is_dir():
        raise CLIError(f"--out folder does not exist: {out.parent}")
    if not Path(args.model).exists():
        raise CLIError(f"--model path not found: {args.model}")
    if args.mask is not None and args.init_image is None:
        raise CLIError("--mask needs --init-image (the image to inpaint)")
    if args.strength is not None and args.init_image is None:
        raise CLIError("--strength needs --init-image (it is for img2img and inpainting)")
    if args.refiner_start is not None and args.refiner is None:
        raise CLIError("--refiner-start needs --refiner")
    if args.refiner is not None and args.init_image is not None:
        raise CLIError("--refiner finishes text-to-image runs; it does not combine with --init-image")
    for flag, value in (("--refiner", args.refiner), ("--vae", args.vae)):
        if value is not None and not Path(value).exists():
            raise CLIError(f"{flag} path not found: {value}")
    for flag, value in (("--init-image", args.init_image), ("--mask", args.mask)):
        if value is not None and not Path(value).is_file():
            raise CLIError(f"{flag} file not found: {value}")


def run_generate(args) -> list[Path]:
    import runtime
    from runtime import images as imageio

    _check_paths(args)
    init_image = imageio.load_image(args.init_image, "--init-image") if args.init_image else None
    mask = imageio.load_image(args.mask, "--mask") if args.mask else None
    pipe = runtime.load(args.model, backend=args.backend, device=args.device, dtype=args.dtype, vae=args.vae)
    refiner = None if args.refiner is None else runtime.load(args.refiner, backend=args.backend,
                                                             device=args.device, dtype=args.dtype, vae=args.vae)
    options = dict(negative_prompt=args.negative_prompt, steps=args.steps, guidance=args.guidance,
                   width=args.width, height=args.height, seed=args.seed, num_images=args.num_images,
                   scheduler=args.scheduler, progress=not args.no_progress)
    if mask is not None:
        strength = 1.0 if args.strength is None else args.strength
        results = pipe.inpaint(init_image, mask, args.prompt, strength=strength, **options)
    elif init_image is not None:
        strength = 0.75 if args.strength is None else args.strength
        results = pipe.img2img(init_image, args.prompt, strength=strength, **options)
    else:
        refined = {} if refiner is None else dict(refiner=refiner, refiner_start=args.refiner_start)
        results = pipe.generate(args.prompt, **options, **refined)
    paths = output_paths(Path(args.out), len(results))
    metadata = [{key: value for key, value in image.info.items() if isinstance(value, str)} for image in results]
    imageio.save_pngs(results, paths, metadata)
    for path, image in zip(paths, results):
        print(f"wrote {path} (seed {image.info.get('seed')})")
    return paths


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {message}", file=sys.stderr)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        with warnings.catch_warnings():  # restores the warning printer when main returns
            warnings.showwarning = _one_line_warning
            run_generate(args)
        return 0
    except KeyboardInterrupt:
        print("error: interrupted; no image was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except CLIError as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as err:  # the CLI's contract: one line, no traceback
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
