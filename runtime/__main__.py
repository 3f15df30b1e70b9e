"""Command line: `python -m runtime generate -m PATH -p "..." [-o out.png] [options]`.

txt2img by default; `--init-image` makes it img2img, `--init-image` with `--mask` inpainting.
With --num-images N the files are OUT, then OUT's stem with -1, -2, ... (out.png, out-1.png, out-2.png).
Without --out the images go to outputs/ (in the working folder) as the next free numbers: outputs/00001.png,
00002.png, ...; an existing file is never replaced. Short flags as stable-diffusion.cpp's: -m model,
-p prompt, -n negative prompt, -o output, -W width, -H height.
LoRAs: `--lora PATH[:SCALE]` (repeatable), and A1111's `<lora:NAME:0.8>` in the prompt, NAME.safetensors
in --lora-dir. Textual-inversion embeddings: `--embeddings-dir`, used as `<name>` or the bare name.
Every PNG carries the generation parameters as tEXt entries ("parameters" in A1111's format, plus one
entry per field). Files are written only after the whole run succeeded, each through a temp file in the
same folder, so a failed run leaves no partial output (an existing --out is replaced only on success).
Every value is checked before any weights load. Errors print one line to stderr and exit with status 2.

`python -m runtime make-model --preset tiny OUT` writes a diffusers folder with random weights (the
architectures the benchmark uses), a model to try everything on without a download.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

from runtime import cli_choices
from runtime.serve import cli as serve_cli

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
RANDOM_SEED = -1  # as A1111 and stable-diffusion.cpp: draw one (printed and written into the PNG)
DEFAULT_OUTPUT_DIR = "outputs"
_NUMBER_DIGITS = 5  # outputs/00001.png

# The random-weight presets live with the benchmark; this is the one place the CLI names their module.
_PRESETS_MODULE = "runtime.bench.presets"


class CLIError(Exception):
    """A problem with the command line's inputs, reported as one line."""


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        raise CLIError(message)


class _HelpFormatter(argparse.HelpFormatter):
    """Shows each option's default, except where there is none to show."""

    def _get_help_string(self, action):
        text = action.help or ""
        shown = not any(action.default is value for value in (None, False, argparse.SUPPRESS))
        if "%(default)" not in text and action.option_strings and shown:
            text += " (default: %(default)s)"
        return text


def _one_of(names) -> str:
    return ", ".join(names)


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="python -m runtime", description="Stable Diffusion image generation", formatter_class=_HelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_OneLineParser)
    gen = commands.add_parser(
        "generate", help="txt2img, img2img (--init-image) or inpaint (--mask)", formatter_class=_HelpFormatter
    )
    gen.add_argument(
        "-m",
        "--model",
        required=True,
        help="diffusers folder or single-file .safetensors "
        "(no model yet? `python -m runtime make-model --preset tiny OUT`)",
    )
    gen.add_argument(
        "-p",
        "--prompt",
        required=True,
        help="A1111 syntax: (word:1.3), ((word)), [word], BREAK, <lora:NAME:0.8>, embedding names",
    )
    gen.add_argument(
        "-o",
        "--out",
        default=None,
        help="output PNG path (more images: OUT-1.png, OUT-2.png, ...); default: the next free "
        f"{DEFAULT_OUTPUT_DIR}/NNNNN.png",
    )
    gen.add_argument("-n", "--negative-prompt", default=None)
    gen.add_argument("--steps", type=int, default=30, help="denoising steps")
    gen.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance; <= 1 turns it off")
    gen.add_argument(
        "--seed", type=int, default=RANDOM_SEED, help=f"{RANDOM_SEED}: random (printed and written into the PNG)"
    )
    gen.add_argument("-W", "--width", type=int, default=None, help="default: the model's native size")
    gen.add_argument("-H", "--height", type=int, default=None, help="default: the model's native size")
    gen.add_argument(
        "--scheduler", default=None, help=f"one of {_one_of(cli_choices.schedulers())} (default: the model's own)"
    )
    gen.add_argument("--num-images", type=int, default=1, help="images per prompt, one seed")
    gen.add_argument(
        "--max-pixels",
        type=int,
        default=None,
        help="refuse images larger than this many pixels (default 2048*2048; raise it to run "
        "larger sizes, which need much memory and time)",
    )
    gen.add_argument(
        "--backend",
        default="torch",
        help=f"one of {_one_of(cli_choices.backends())}; {_one_of(cli_choices.exported_backends())} need --engine-dir",
    )
    gen.add_argument(
        "--engine-dir",
        default=None,
        help="folder of the exported graphs / engines for the "
        f"{_one_of(cli_choices.exported_backends())} backends (filled on first use)",
    )
    gen.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    gen.add_argument("--dtype", default="fp32", help=f"one of {_one_of(cli_choices.dtypes())}")
    gen.add_argument(
        "--variant", default=None, help="weight-file variant of a diffusers folder, e.g. fp16 (*.fp16.safetensors)"
    )
    gen.add_argument(
        "--allow-pickle",
        action="store_true",
        help="allow .ckpt/.bin/.pt checkpoints (read weights-only); only for files you trust",
    )
    gen.add_argument("--init-image", default=None, help="img2img / inpainting source image")
    gen.add_argument(
        "--strength",
        type=float,
        default=None,
        help="how much of the init image to repaint, in (0, 1] (default 0.75 img2img, 1.0 inpaint)",
    )
    gen.add_argument("--mask", default=None, help="inpainting mask (white = repaint); needs --init-image")
    gen.add_argument(
        "--prompt-syntax",
        default="a1111",
        choices=cli_choices.prompt_syntaxes(),
        help="a1111: (word:1.3), ((word)), [word], BREAK, prompts past 75 tokens in chunks; "
        "plain: the text as is, cut at 77 tokens with a warning (default: %(default)s)",
    )
    gen.add_argument("--no-progress", action="store_true", help="no progress bar")
    gen.add_argument("--refiner", default=None, help="SDXL refiner (folder or .safetensors) that finishes the image")
    gen.add_argument(
        "--refiner-start",
        type=float,
        default=None,
        help="fraction of the denoising the base does before the refiner (default 0.8)",
    )
    gen.add_argument("--vae", default=None, help="a separate VAE (diffusers folder or .safetensors)")
    gen.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="PATH[:SCALE]",
        help="apply a LoRA .safetensors at SCALE (default 1.0); repeat for several",
    )
    gen.add_argument("--lora-dir", default=None, help="folder where <lora:NAME:W> in the prompt finds NAME.safetensors")
    gen.add_argument(
        "--embeddings-dir",
        default=None,
        help="folder of textual-inversion embeddings (NAME.safetensors), used in prompts as <NAME> or NAME",
    )
    make = commands.add_parser(
        "make-model",
        help="write a diffusers folder with random weights, to try things on",
        formatter_class=_HelpFormatter,
    )
    make.add_argument("out", help="the folder to create (must not exist, or be empty)")
    make.add_argument(
        "--preset",
        default="tiny",
        help=f"architecture: one of {_one_of(cli_choices.table_names(_PRESETS_MODULE, '_KINDS'))} "
        "(tiny: seconds on a CPU)",
    )
    make.add_argument("--seed", type=int, default=0, help="the random weights' seed")
    serve_cli.add_parser(commands, _HelpFormatter)
    return parser


def output_paths(out: Path, count: int) -> list[Path]:
    """out.png, out-1.png, out-2.png, ... (`count` paths)."""
    return [out] + [out.with_name(f"{out.stem}-{index}{out.suffix}") for index in range(1, count)]


def numbered_paths(folder: Path, count: int) -> list[Path]:
    """The next `count` numbers after the highest NNNNN*.png in `folder`: none of them exists, and a
    gap left by a deleted file is never reused (so a number names one image)."""
    highest = 0
    if folder.is_dir():
        for path in folder.iterdir():
            match = re.fullmatch(r"(\d+)(\D.*)?\.png", path.name, re.IGNORECASE)
            if match:
                highest = max(highest, int(match.group(1)))
    return [folder / f"{number:0{_NUMBER_DIGITS}d}.png" for number in range(highest + 1, highest + 1 + count)]


def parse_lora_flag(text: str) -> tuple[str, float]:
    """--lora PATH[:SCALE] -> (PATH, SCALE). Only a final `:number` is a scale, so a Windows path's
    drive colon (C:\\loras\\ink.safetensors) stays part of the path."""
    path, colon, tail = text.rpartition(":")
    if colon:
        try:
            scale = float(tail)
        except ValueError:
            return text, 1.0
        if not math.isfinite(scale):
            raise CLIError(f"--lora {text}: the scale {tail!r} is not a finite number")
        if not path:
            raise CLIError(f"--lora {text}: no path before the scale")
        return path, scale
    return text, 1.0


def _check_extras(args) -> None:
    """LoRA and embedding inputs, checked (tags resolved) before any weights load."""
    from runtime import prompt_loras

    args.lora = [parse_lora_flag(text) for text in args.lora]
    for path, _ in args.lora:
        if not Path(path).is_file():
            raise CLIError(f"--lora file not found: {path}")
    for flag, value in (("--lora-dir", args.lora_dir), ("--embeddings-dir", args.embeddings_dir)):
        if value is not None and not Path(value).is_dir():
            raise CLIError(f"{flag} is not a folder: {value}")
    try:
        prompt_loras.call_loras([args.prompt], args.lora_dir)
    except prompt_loras.PromptLoraError as err:
        raise CLIError(str(err).replace("pass lora_dir= to runtime.load, set pipe.lora_dir, or ", "pass ")) from None


def _check_paths(args) -> None:
    """Input and output checks that need no model, so mistakes surface before minutes of loading."""
    if args.out is not None:
        out = Path(args.out)
        if out.suffix.lower() != ".png":
            raise CLIError(f"--out must be a .png file, got {args.out!r}")
        if not out.parent.is_dir():
            raise CLIError(f"--out folder does not exist: {out.parent}")
    elif Path(DEFAULT_OUTPUT_DIR).exists() and not Path(DEFAULT_OUTPUT_DIR).is_dir():
        raise CLIError(f"no --out given and ./{DEFAULT_OUTPUT_DIR} is not a folder; pass --out FILE.png")
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
    if args.max_pixels is not None and args.max_pixels < 1:
        raise CLIError(f"--max-pixels must be a positive integer, got {args.max_pixels}")
    _check_extras(args)
    if args.out is not None:
        _check_targets(output_paths(out, max(args.num_images, 1)))


def _check_targets(paths: list[Path]) -> None:
    """Every output must be replaceable before the run starts: a directory (or other non-file) in the
    way of one of them would otherwise fail after the others were written."""
    for path in paths:
        if path.is_symlink() and not path.exists():
            raise CLIError(f"output {path} is a dangling symlink; remove it or choose another --out")
        if path.exists() and not path.is_file():
            raise CLIError(f"output {path} exists and is not a file (a directory?); choose another --out")


def _check_values(args) -> None:
    """Every option value that needs no model, checked before minutes of loading weights."""
    backends, schedulers, dtypes = cli_choices.backends(), cli_choices.schedulers(), cli_choices.dtypes()
    exported = cli_choices.exported_backends()
    if args.backend not in backends:
        raise CLIError(f"unknown backend {args.backend!r}; choose one of {_one_of(backends)}")
    if args.scheduler is not None and args.scheduler not in schedulers:
        raise CLIError(f"unknown scheduler {args.scheduler!r}; choose one of {_one_of(schedulers)}")
    if args.dtype.lower().removeprefix("torch.") not in dtypes:
        raise CLIError(f"unknown dtype {args.dtype!r}; valid names: {_one_of(dtypes)}")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", args.device):
        raise CLIError(f"--device must be cpu, cuda or cuda:N, got {args.device!r}")
    if args.steps < 1:
        raise CLIError(f"steps must be an integer >= 1, got {args.steps}")
    if args.num_images < 1:
        raise CLIError(f"num_images must be an integer >= 1, got {args.num_images}")
    if not 0 <= args.guidance < float("inf"):
        raise CLIError(f"guidance must be a finite number >= 0 (<= 1 turns guidance off), got {args.guidance}")
    if args.seed != RANDOM_SEED and not 0 <= args.seed < 2**32:
        raise CLIError(f"--seed must be {RANDOM_SEED} (random) or an integer in [0, 2**32), got {args.seed}")
    if args.strength is not None and not 0 < args.strength <= 1:
        raise CLIError(f"strength must be in (0, 1], got {args.strength}")
    if args.backend in exported and args.engine_dir is None:
        raise CLIError(f"--backend {args.backend} runs exported graphs: pass --engine-dir DIR (filled on first use)")
    if args.engine_dir is not None:
        if args.backend not in exported:
            raise CLIError(f"--engine-dir is for the {_one_of(exported)} backends, not --backend {args.backend}")
        if Path(args.engine_dir).exists() and not Path(args.engine_dir).is_dir():
            raise CLIError(f"--engine-dir {args.engine_dir} exists and is not a folder")
    on_cpu = args.device == "cpu"
    if args.backend == "tensorrt" and on_cpu:
        raise CLIError("--backend tensorrt runs on CUDA: pass --device cuda")
    if args.backend == "triton" and on_cpu and os.environ.get("TRITON_INTERPRET") != "1":
        raise CLIError(
            "--backend triton on --device cpu needs the Triton interpreter: set TRITON_INTERPRET=1 "
            "(slow; for testing) or use --device cuda"
        )


def run_generate(args) -> list[Path]:
    _check_values(args)
    _check_paths(args)
    import runtime
    from runtime import images as imageio

    init_image = imageio.load_image(args.init_image, "--init-image") if args.init_image else None
    mask = imageio.load_image(args.mask, "--mask") if args.mask else None
    backend_options = {} if args.engine_dir is None else {"engine_dir": args.engine_dir}
    load_options = dict(
        backend=args.backend,
        device=args.device,
        dtype=args.dtype,
        variant=args.variant,
        allow_pickle=args.allow_pickle,
        vae=args.vae,
        **backend_options,
    )
    # Only when given, so a loader (or a test's stand-in) without them still works.
    folders = {"lora_dir": args.lora_dir, "embeddings_dir": args.embeddings_dir}
    load_options.update({key: value for key, value in folders.items() if value is not None})
    pipe = runtime.load(args.model, **load_options)
    refiner = None if args.refiner is None else runtime.load(args.refiner, **load_options)
    loaded = []
    try:
        for path, scale in args.lora:
            loaded.append(pipe.load_lora(path, scale=scale, allow_pickle=args.allow_pickle))
        return _generate_and_save(args, pipe, refiner, init_image, mask)
    finally:  # a pipeline the caller keeps (tests, an embedding app) gets its base weights back
        for name in reversed(loaded):
            pipe.unload_lora(name)


def _generate_and_save(args, pipe, refiner, init_image, mask) -> list[Path]:
    from runtime import images as imageio

    for loaded in (pipe, refiner):
        if loaded is not None:
            loaded.prompt_syntax = args.prompt_syntax
            if args.max_pixels is not None:
                loaded.max_pixels = args.max_pixels
    seed = None if args.seed == RANDOM_SEED else args.seed
    options = dict(
        negative_prompt=args.negative_prompt,
        steps=args.steps,
        guidance=args.guidance,
        width=args.width,
        height=args.height,
        seed=seed,
        num_images=args.num_images,
        scheduler=args.scheduler,
        progress=not args.no_progress,
    )
    if mask is not None:
        strength = 1.0 if args.strength is None else args.strength
        results = pipe.inpaint(init_image, mask, args.prompt, strength=strength, **options)
    elif init_image is not None:
        strength = 0.75 if args.strength is None else args.strength
        results = pipe.img2img(init_image, args.prompt, strength=strength, **options)
    else:
        refined = {} if refiner is None else dict(refiner=refiner, refiner_start=args.refiner_start)
        results = pipe.generate(args.prompt, **options, **refined)
    if args.out is None:
        Path(DEFAULT_OUTPUT_DIR).mkdir(exist_ok=True)
        paths = numbered_paths(Path(DEFAULT_OUTPUT_DIR), len(results))  # chosen last: the fewest races
    else:
        paths = output_paths(Path(args.out), len(results))
    metadata = [{key: value for key, value in image.info.items() if isinstance(value, str)} for image in results]
    imageio.save_pngs(results, paths, metadata)
    for path, image in zip(paths, results):
        print(f"wrote {path} (seed {image.info.get('seed')})")
    return paths


def run_make_model(args) -> Path:
    """Write the preset into a temp folder beside OUT, then move it into place: no half-written model."""
    import importlib

    out = Path(args.out)
    presets = cli_choices.table_names(_PRESETS_MODULE, "_KINDS")
    if args.preset not in presets:
        raise CLIError(f"unknown preset {args.preset!r}; choose one of {_one_of(presets)}")
    if not 0 <= args.seed < 2**63:
        raise CLIError(f"--seed must be an integer in [0, 2**63), got {args.seed}")
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise CLIError(f"{out} already exists and is not an empty folder; choose a new path")
    if not out.parent.is_dir():
        raise CLIError(f"the folder {out.parent} does not exist")
    write_random_model = importlib.import_module(_PRESETS_MODULE).write_random_model
    temp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        write_random_model(args.preset, temp, seed=args.seed)
        os.replace(temp, out)  # onto a missing path or an empty folder
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    print(f"wrote {out} ({args.preset} preset, random weights, seed {args.seed})")
    return out


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {message}", file=sys.stderr)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if not argv:
        print(parser.format_help(), end="")
        return EXIT_USAGE
    try:
        args = parser.parse_args(argv)
        with warnings.catch_warnings():  # restores the warning printer when main returns
            warnings.showwarning = _one_line_warning
            if args.command == "make-model":
                run_make_model(args)
            elif args.command == "serve":
                serve_cli.run(args)
            else:
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
