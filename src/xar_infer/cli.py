"""Command-line tools: ``xar-generate`` (class labels in, PNG files out) and ``xar-convert``.

Both report every expected failure as one line ``<prog>: error: <message>`` on stderr and exit 2.
Everything that can be checked without the model (arguments, device, output files) is checked
before the weights are loaded, so a typo costs seconds, not a model load.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from . import __version__
from .backends import BACKENDS, resolve_backend
from .checkpoint_io import state_dict_sha256
from .config import PRESETS, find_preset
from .engine.engine import MAX_SEED
from .errors import InvalidArgumentError, XARError, first_line
from .imagenet import IMAGENET_NUM_CLASSES, class_name, resolve_class_label
from .hub import convert_checkpoint
from .loading import VARIANTS
from .memory import require_memory
from .output_files import require_parent_folder, write_file, write_file_by_path
from .pipeline import XARPipeline, to_uint8
from .sample_sets import (SampleSetJob, WorkFolder, claim, fid_labels, fid_labels_spread, process_group,
                          read_labels_file, write_sample_set)
from .settings import GUIDANCE_SCHEDULES, SAMPLERS, SamplingSettings
from .vae import load_vae
from .vae_tiling import DEFAULT_TILE_OVERLAP

GENERATE_PROG = "xar-generate"
CONVERT_PROG = "xar-convert"
DEFAULT_MODEL = "xar-b"
DEFAULT_IMAGENET_CLASS = "207"  # golden retriever
DEFAULT_OUTPUT = "out"
LATENTS_FILE = "latents.safetensors"
OVERWRITE_HINT = "pass --overwrite to replace it"
# Host memory a planned output file costs before anything is generated: its path and class id
# (measured: about 300 bytes with an ImageNet name) and the path's text once it is checked.
PLANNED_FILE_BYTES = 400
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

VAE_HINT = (
    "decoding images needs MAR's KL-16 VAE: pass --vae path/to/kl16.ckpt (from the MAR project, "
    "https://github.com/LTH14/mar, or its Hugging Face mirror jadechoghari/mar), "
    "or pass --latents-only to save the latents without decoding"
)

# Failures a user can cause: our own error types (bad input, files, settings, memory) and the
# operating system's errors of file access; torch's out-of-memory error, which a smaller batch fixes.
# Anything else is a bug and keeps its traceback.
USER_ERRORS = (XARError, OSError, torch.OutOfMemoryError)

_INT = re.compile(r"\s*[+-]?[0-9]+\s*")


# --------------------------------------------------------------------------------------------------
# Shared plumbing
# --------------------------------------------------------------------------------------------------

def _one_line(exc: BaseException) -> str:
    """The first line of an exception's message, with a hint for running out of GPU memory."""
    message = first_line(exc)
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        message += " (try a smaller --batch-size or --dtype bf16)"
    return message


def run_command(prog: str, action: Callable[[], None]) -> int:
    """Run a command's ``action``; turn user errors into one stderr line and exit status 2 (every
    xar_infer command line runs this way)."""
    def show_warning(message, category, filename, lineno, file=None, line=None):
        print(f"{prog}: warning: {first_line(message)}", file=sys.stderr)

    try:
        with warnings.catch_warnings():
            warnings.showwarning = show_warning
            action()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as exc:
        print(f"{prog}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    return 0


class OneLineErrorParser(argparse.ArgumentParser):
    """Usage errors as one line too (argparse prints the whole usage block first)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def check_targets(paths: Sequence[Path], overwrite: bool) -> None:
    """Refuse to replace existing entries (files, folders, symlinks, even dangling ones) unless
    ``overwrite``; never replace a folder. The writes check again when they happen."""
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            raise IsADirectoryError(f"{path} is a directory; it cannot be replaced by an output file")
        if os.path.lexists(path) and not overwrite:
            raise FileExistsError(f"{path} already exists; {OVERWRITE_HINT}")


def ensure_writable_dir(directory: Path) -> None:
    """Create ``directory`` if needed and prove a file can be created in it."""
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"output directory {directory} exists and is not a directory")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".xar-write-test-"):
            pass
    except OSError as exc:
        raise OSError(f"cannot write to output directory {directory}: {exc.strerror or exc}") from None


def prepare_outputs(paths: Sequence[Path], overwrite: bool) -> None:
    check_targets(paths, overwrite)
    for directory in dict.fromkeys(path.parent for path in paths):
        ensure_writable_dir(directory)


def same_file_name(a: Path, b: Path) -> bool:
    """Whether two paths name the same directory entry (through symlinked folders too), existing or not."""
    return Path(os.path.realpath(a.parent)) / a.name == Path(os.path.realpath(b.parent)) / b.name


# --------------------------------------------------------------------------------------------------
# xar-generate
# --------------------------------------------------------------------------------------------------

def add_model_options(parser: argparse.ArgumentParser, default_model: str) -> argparse._ArgumentGroup:
    """The "model" options of every command that loads one (xar-generate, xar-serve): which weights, VAE,
    device, dtype, backend and CUDA graphs. Returns the group, for a command's own additions."""
    model = parser.add_argument_group("model")
    source = model.add_mutually_exclusive_group()
    hub_presets = ", ".join(name for name, preset in PRESETS.items() if preset.bundled_dir is None)
    bundled = ", ".join(name for name, preset in PRESETS.items() if preset.bundled_dir is not None)
    source.add_argument("--model", help=f"released model: {hub_presets} (downloaded from the Hugging Face Hub), or "
                                        f"{bundled} (bundled with the package: runs offline); default: {default_model}")
    source.add_argument("--checkpoint", metavar="PATH",
                        help="local weights: a released .pth, a .safetensors file or an xar-convert directory")
    model.add_argument("--revision", help="Hub revision of the --model weights")
    model.add_argument("--cache-dir", metavar="DIR", help="Hugging Face cache directory for --model")
    model.add_argument("--local-files-only", action="store_true", help="do not download; use the Hub cache only")
    model.add_argument("--sha256", metavar="HEX", help="expected SHA-256 of the transformer's weights file (checked before loading)")
    model.add_argument("--vae", metavar="PATH", help="MAR's KL-16 VAE (kl16.ckpt), needed to decode images")
    model.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                       help="torch device (default: cuda if available, else cpu)")
    model.add_argument("--dtype", choices=DTYPES, default="fp32",
                       help="transformer precision (default: fp32, the exact one); bf16 is the fast one on GPUs and on "
                            "CPUs with bfloat16 instructions; fp16 is very slow on most CPUs")
    model.add_argument("--backend", choices=BACKENDS, default="auto",
                       help="kernels: triton (fused, CUDA), torch, or auto (triton on CUDA if installed; default)")
    model.add_argument("--cuda-graphs", action="store_true",
                       help="replay the transformer's calls from CUDA graphs (same images; faster at small "
                            "batches, after capturing once per batch size)")
    return model


def build_generate_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog=GENERATE_PROG,
        description="Generate ImageNet class-conditional images with an xAR model.",
        epilog=f"example: {GENERATE_PROG} --vae kl16.ckpt --class 'golden retriever' --class 88 "
               "--num-images 8 --output out --grid grid.png",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")

    what = parser.add_argument_group("what to generate")
    what.add_argument("--class", dest="classes", action="append", metavar="CLASS",
                      help="class id, or ImageNet class name; repeat for several (images cycle through them). "
                           f"Default: {DEFAULT_IMAGENET_CLASS} (golden retriever) for ImageNet models, 0 for others")
    what.add_argument("--num-images", type=int, metavar="N",
                      help="number of images (default: one per --class)")
    what.add_argument("--seed", type=int, default=0,
                      help="image i uses seed SEED+i, whatever the batch size (default: 0)")

    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--steps", type=step_counts, metavar="N[,N,...]",
                          help="sampling steps per cell (default: the model's official setting); a comma list "
                               "gives each cell its own count, e.g. 40,30,21,12 (faster, changes the images)")
    sampling.add_argument("--cfg", type=float,
                          help="classifier-free guidance scale, >= 1 (default: the model's official setting)")
    sampling.add_argument("--sampler", choices=SAMPLERS, default="sde", help="default: sde (the released sampler)")
    sampling.add_argument("--guidance-schedule", choices=GUIDANCE_SCHEDULES, default="linear",
                          help="default: linear (the released schedule)")
    sampling.add_argument("--guidance-interval", type=time_interval, metavar="LO,HI",
                          help="guide only at flow times LO <= t <= HI (t=1 is noise); faster, changes the images")
    sampling.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default: 8)")

    model = add_model_options(parser, DEFAULT_MODEL)
    model.add_argument("--vae-tiling", type=tiling, metavar="TILE[,OVERLAP]",
                       help="decode in windows of TILE latent cells with OVERLAP cells of halo "
                            f"(default {DEFAULT_TILE_OVERLAP}): bounds the decoder's memory, at a small cost in fidelity")

    output = parser.add_argument_group("output")
    output.add_argument("--output", metavar="DIR",
                        help=f"folder for the images, created if needed (default: {DEFAULT_OUTPUT})")
    output.add_argument("--grid", metavar="FILE", help="also save all images as one grid .png (its folder must exist)")
    output.add_argument("--latents-only", action="store_true",
                        help=f"skip the VAE; save the latents to DIR/{LATENTS_FILE} instead of images")
    output.add_argument("--upscale", type=int, default=1, metavar="K",
                        help="save images K times larger, nearest neighbour (e.g. 8 for the 8x8 digits)")
    output.add_argument("--overwrite", action="store_true", help="replace existing output files")

    fid = parser.add_argument_group("FID sample sets (resumable; split over processes under torchrun)")
    fid.add_argument("--npz", metavar="FILE",
                     help="write all images into one .npz (arr_0: uint8 [N, H, W, C]) instead of PNG files (its "
                          "folder must exist); rerun the same command to resume an interrupted run")
    fid_labels_group = fid.add_mutually_exclusive_group()
    fid_labels_group.add_argument("--fid-labels", action="store_true",
                                  help="the released evaluation labels: each class NUM_IMAGES / classes times, in "
                                       "class order (default --num-images: 50 per class)")
    fid_labels_group.add_argument("--labels-file", metavar="FILE", help="class ids, from a .npy array or a text file")
    output.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    return parser


def step_counts(text: str) -> int | list[int]:
    """``--steps``: one count, or a comma list with one per cell."""
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number or a comma list of them, got {text!r}") from None
    return counts[0] if len(counts) == 1 else counts


def tiling(text: str) -> tuple[int, int]:
    """``--vae-tiling TILE[,OVERLAP]``."""
    try:
        parts = [int(p) for p in text.split(",")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2) or parts[0] < 1 or (len(parts) == 2 and parts[1] < 0):
        raise argparse.ArgumentTypeError(f"expected TILE or TILE,OVERLAP (latent cells, TILE >= 1), got {text!r}")
    return parts[0], parts[1] if len(parts) == 2 else DEFAULT_TILE_OVERLAP


def time_interval(text: str) -> tuple[float, float]:
    """``--guidance-interval LO,HI`` with 0 <= LO <= HI <= 1."""
    try:
        lo, hi = (float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO,HI, two flow times in [0, 1], got {text!r}") from None
    try:
        SamplingSettings.build(None, 1, 1.0, guidance_interval=(lo, hi), names=CLI_NAMES)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return lo, hi


def validate_generate_args(args: argparse.Namespace) -> None:
    """Fill in the defaults that depend on other options; check what needs neither the model nor
    more of the file system than whether the input files and output folders exist."""
    check_sample_set_args(args)
    if args.output is None:
        args.output = DEFAULT_OUTPUT
    args.num_images_given = args.num_images is not None
    if args.num_images is None:
        args.num_images = len(args.classes) if args.classes else 1
    if args.num_images < 1:
        raise InvalidArgumentError(f"--num-images must be at least 1, got {args.num_images}")
    if args.batch_size < 1:
        raise InvalidArgumentError(f"--batch-size must be at least 1, got {args.batch_size}")
    check_settings(args, None)
    if args.sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", args.sha256):
        raise InvalidArgumentError(f"--sha256 must be 64 hexadecimal digits, got {args.sha256!r}")
    if args.seed < 0 or args.seed + args.num_images - 1 > MAX_SEED:
        raise InvalidArgumentError(f"--seed must be between 0 and {MAX_SEED - args.num_images + 1} for "
                                   f"{args.num_images} image(s), got {args.seed}")

    if args.checkpoint is not None:
        if args.revision or args.cache_dir or args.local_files_only:
            raise InvalidArgumentError("--revision, --cache-dir and --local-files-only apply to --model only; "
                                       "--checkpoint is read from disk as it is")
        if not Path(args.checkpoint).exists():
            raise FileNotFoundError(f"checkpoint not found: {args.checkpoint}")
    elif find_preset(args.model or DEFAULT_MODEL) is None:
        raise InvalidArgumentError(f"unknown model {args.model!r}: choose one of {', '.join(PRESETS)}, "
                                   "or pass --checkpoint PATH for local weights")

    if args.latents_only and args.grid is not None:
        raise InvalidArgumentError("--grid needs decoded images; it cannot be combined with --latents-only")
    if args.grid is not None:
        if Path(args.grid).suffix.lower() != ".png":
            raise InvalidArgumentError(f"--grid must name a .png file, got {args.grid}")
        require_parent_folder(args.grid, "--grid")
    if args.upscale < 1:
        raise InvalidArgumentError(f"--upscale must be at least 1, got {args.upscale}")
    if args.vae is not None and not Path(args.vae).is_file():
        raise FileNotFoundError(f"VAE checkpoint not found: {args.vae}")
    if args.checkpoint is None:  # a preset: what it needs is known before loading
        config = find_preset(args.model or DEFAULT_MODEL).config
        check_vae_choice(args, config.pixel_space)
        check_settings(args, config.num_cells)


# How SamplingSettings names the options in its errors.
CLI_NAMES = {"num_inference_steps": "--steps", "guidance_scale": "--cfg", "sampler": "--sampler",
             "guidance_schedule": "--guidance-schedule", "guidance_interval": "--guidance-interval"}


def check_settings(args: argparse.Namespace, num_cells: int | None) -> None:
    """The sampling options, checked by the one object that checks them (a per-cell --steps list
    against the model's cells once ``num_cells`` is known); defaults stand in for options not given."""
    SamplingSettings.build(num_cells, 1 if args.steps is None else args.steps, 1.0 if args.cfg is None else args.cfg,
                           args.sampler, args.guidance_schedule, args.guidance_interval, names=CLI_NAMES)


def check_vae_choice(args: argparse.Namespace, pixel_space: bool) -> None:
    """Latent models need --vae to write images; pixel models take none."""
    if pixel_space and args.vae is not None:
        raise InvalidArgumentError("this model generates pixels directly; leave out --vae")
    if not pixel_space and args.vae is None and not args.latents_only:
        raise InvalidArgumentError(VAE_HINT)


def check_device(text: str) -> torch.device:
    """The torch device named ``text``, if this machine has it (torch itself fails late and obscurely)."""
    try:
        device = torch.device(text)
    except RuntimeError as exc:
        raise InvalidArgumentError(f"--device {text!r} is not a torch device ({_one_line(exc)})") from None
    if device.type == "cpu":
        return device
    device_module = getattr(torch, device.type, None)
    if device_module is None or not hasattr(device_module, "is_available"):
        raise InvalidArgumentError(f"--device {text!r}: {device.type} devices cannot run generation; use cpu or cuda")
    if not device_module.is_available():
        raise InvalidArgumentError(f"--device {text!r}: no {device.type} device is available on this machine "
                         f"(torch {torch.__version__}); use --device cpu")
    count = device_module.device_count() if hasattr(device_module, "device_count") else 1
    if device.index is not None and device.index >= count:
        raise InvalidArgumentError(f"--device {text!r}: this machine has {count} {device.type} device(s), "
                         f"numbered from 0")
    return device


def check_device_options(args: argparse.Namespace, device: torch.device) -> None:
    """--backend and --cuda-graphs against the device, before anything is loaded."""
    resolve_backend(args.backend, device)
    if args.cuda_graphs and device.type != "cuda":
        raise InvalidArgumentError(f"--cuda-graphs needs a CUDA device, not --device {args.device}; leave it out")


def resolve_classes(values: Sequence[str], num_classes: int | None) -> list[int]:
    """The --class values as ids. With ``num_classes`` None (a checkpoint not read yet) names are
    looked up in ImageNet-1k and ids are only checked to be non-negative; call again once it is known."""
    if num_classes is not None:
        return [resolve_class_label(value, num_classes) for value in values]
    ids = []
    for value in values:
        if not _INT.fullmatch(value):
            ids.append(resolve_class_label(value, IMAGENET_NUM_CLASSES))
        elif len(value.strip().lstrip("+-").lstrip("0")) > 19 or int(value) >= 2**63:  # int() refuses 4300+ digits
            shown = value.strip() if len(value.strip()) <= 24 else value.strip()[:20] + "..."
            raise InvalidArgumentError(f"class id {shown} is beyond the range of any model's class ids")
        elif int(value) < 0:
            raise InvalidArgumentError(f"class id {value!r} is negative; class ids start at 0")
        else:
            ids.append(int(value))
    return ids


def image_file_name(index: int, class_id: int, num_classes: int | None) -> str:
    """``00003_207_golden_retriever.png`` for ImageNet models, ``00003_207.png`` otherwise."""
    if num_classes != IMAGENET_NUM_CLASSES:
        return f"{index:05d}_{class_id}.png"
    short = class_name(class_id).replace(" ", "_").replace("'", "")
    return f"{index:05d}_{class_id}_{short}.png"


def default_classes(num_classes: int | None) -> list[str]:
    """The class of a run without --class: a golden retriever for ImageNet models (and a checkpoint not
    read yet), class 0 for others."""
    return [DEFAULT_IMAGENET_CLASS] if num_classes in (None, IMAGENET_NUM_CLASSES) else ["0"]


def plan_outputs(args: argparse.Namespace, num_classes: int | None) -> tuple[list[int], list[Path]]:
    """The class id of every image and every file the run will write (images or the latents file,
    then the grid), for a model with ``num_classes`` classes (None: a checkpoint not read yet)."""
    require_memory(args.num_images * PLANNED_FILE_BYTES, "cpu", f"planning --num-images {args.num_images}",
                   "make fewer images per run")
    classes = resolve_classes(args.classes or default_classes(num_classes), num_classes)
    image_ids = [classes[i % len(classes)] for i in range(args.num_images)]
    out = Path(args.output)
    if args.latents_only:
        return image_ids, [out / LATENTS_FILE]
    if num_classes is None and max(image_ids) < IMAGENET_NUM_CLASSES:
        # Name files as for ImageNet, like every released model; re-planned once the checkpoint is read.
        num_classes = IMAGENET_NUM_CLASSES
    paths = [out / image_file_name(i, c, num_classes) for i, c in enumerate(image_ids)]
    if args.grid is None:
        return image_ids, paths
    grid = Path(args.grid)
    clash = next((path for path in paths if same_file_name(path, grid)), None)
    if clash is not None:
        raise InvalidArgumentError(f"--grid {args.grid} names one of this run's images ({clash}); choose another name")
    return image_ids, paths + [grid]


def check_host_memory(args: argparse.Namespace, pipe: XARPipeline) -> None:
    """What the run keeps on the host at once: one batch of upscaled images, and every image (for the
    grid) or every latent (--latents-only) until the end."""
    n, batch = args.num_images, min(args.batch_size, args.num_images)
    if args.latents_only:
        config = pipe.transformer.config
        per_image = config.token_channels * config.seq_len * 4
        kept, what = 2 * n * per_image, f"keeping the latents of --num-images {n}"  # the list and their concatenation
    else:
        height, width, channels = pipe.image_shape
        per_image = height * width * channels * args.upscale**2
        kept = (2 * n * per_image if args.grid is not None else 0) + batch * per_image  # the images and the grid
        what = f"--num-images {n} with --upscale {args.upscale}" + (" and --grid" if args.grid is not None else "")
    require_memory(kept, "cpu", what, "make fewer or smaller images per run")


def check_device_memory(args: argparse.Namespace, pipe: XARPipeline, cfg: float) -> None:
    """One batch's working set on the device, checked before the first batch allocates it."""
    tile_size, tile_overlap = args.vae_tiling or (None, DEFAULT_TILE_OVERLAP)
    batch = min(args.batch_size, args.num_images)
    needed = pipe.memory_needed(batch, "latent" if args.latents_only else "pt", cfg > 1, tile_size, tile_overlap)
    fix = "choose a smaller --batch-size" + ("" if args.latents_only or pipe.transformer.config.pixel_space
                                            else ", or decode in tiles (--vae-tiling)")
    require_memory(needed, pipe.device, f"--batch-size {batch}", fix)


def load_pipeline(args: argparse.Namespace, device: torch.device) -> XARPipeline:
    vae = None
    if args.vae is not None and not args.latents_only:
        # Loaded first: it is small, so a wrong --vae fails before the transformer is read.
        vae = load_vae(args.vae, device=device)
    if args.checkpoint is not None:
        # Absolute, so that a relative path spelled like a preset or a Hub repo id stays a local path.
        pipe = XARPipeline.from_pretrained(Path(args.checkpoint).absolute(), vae=vae, dtype=DTYPES[args.dtype],
                                           device=device, backend=args.backend, sha256=args.sha256)
    else:
        pipe = XARPipeline.from_pretrained(args.model or DEFAULT_MODEL, vae=vae, dtype=DTYPES[args.dtype], device=device,
                                           backend=args.backend, sha256=args.sha256, revision=args.revision,
                                           cache_dir=args.cache_dir, local_files_only=args.local_files_only)
    if args.cuda_graphs:
        pipe.enable_cuda_graphs()
    return pipe


def make_grid(images: Sequence[Image.Image]) -> Image.Image:
    """Images in rows of ceil(sqrt(n)), left to right, top to bottom; empty cells black."""
    columns = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    width, height = images[0].size
    grid = Image.new(images[0].mode, (columns * width, rows * height))
    for k, image in enumerate(images):
        grid.paste(image, ((k % columns) * width, (k // columns) * height))
    return grid


def generate(args: argparse.Namespace) -> None:
    """The whole xar-generate run, after argument parsing."""
    validate_generate_args(args)
    if args.npz is not None:
        return generate_sample_set(args)
    device = check_device(args.device)
    check_device_options(args, device)
    preset = None if args.checkpoint is not None else find_preset(args.model or DEFAULT_MODEL)
    known_classes = preset.config.num_classes if preset is not None else None
    image_ids, targets = plan_outputs(args, known_classes)
    prepare_outputs(targets, args.overwrite)

    started = time.perf_counter()
    pipe = load_pipeline(args, device)
    config = pipe.transformer.config
    check_vae_choice(args, config.pixel_space)
    check_settings(args, config.num_cells)
    if config.num_classes != known_classes:
        image_ids, targets = plan_outputs(args, config.num_classes)
        prepare_outputs(targets, args.overwrite)

    steps = args.steps if args.steps is not None else pipe.default_num_inference_steps
    cfg = args.cfg if args.cfg is not None else pipe.default_guidance_scale
    check_host_memory(args, pipe)
    check_device_memory(args, pipe, cfg)
    results = run_batches(pipe, args, image_ids, steps, cfg, targets)
    if args.latents_only:
        save_latents(targets[0], results, image_ids, pipe, args, steps, cfg)
    elif args.grid is not None:
        grid = make_grid(results)
        write_file(targets[-1], lambda f: grid.save(f, format="PNG"), overwrite=args.overwrite,
                   exists_hint=OVERWRITE_HINT)

    if not args.quiet:
        what = f"the latents of {args.num_images} image(s) to {targets[0]}" if args.latents_only \
            else f"{args.num_images} image(s) to {Path(args.output)}/"
        grid = f" and a grid to {args.grid}" if args.grid is not None else ""
        print(f"wrote {what}{grid} ({steps} steps, cfg {cfg:g}, {args.sampler} sampler; "
              f"{time.perf_counter() - started:.1f} s)")


def check_sample_set_args(args: argparse.Namespace) -> None:
    if args.npz is None:
        if args.fid_labels or args.labels_file:
            raise InvalidArgumentError("--fid-labels and --labels-file choose the labels of an --npz sample set; "
                                       "add --npz FILE")
        return
    if args.output is not None:
        raise InvalidArgumentError("--npz writes one file instead of a folder of images; leave out --output")
    if args.latents_only or args.grid is not None or args.upscale != 1:
        raise InvalidArgumentError("--npz writes the images themselves; it cannot be combined with --latents-only, "
                                   "--grid or --upscale")
    if args.classes and (args.fid_labels or args.labels_file):
        raise InvalidArgumentError("--class cannot be combined with --fid-labels or --labels-file")
    WorkFolder(args.npz).check_target(args.overwrite)


def sample_set_labels(args: argparse.Namespace, num_classes: int) -> np.ndarray:
    if args.labels_file is not None:
        labels = read_labels_file(args.labels_file, num_classes)
        if args.num_images_given and args.num_images != len(labels):
            raise InvalidArgumentError(f"--num-images {args.num_images} does not match the {len(labels)} labels of "
                                       f"{args.labels_file}")
        return labels
    count = args.num_images if args.num_images_given or not args.fid_labels else 50 * num_classes
    # The labels, which images are done and the batches, before any of them is allocated.
    require_memory(count * 32, "cpu", f"a sample set of {count} images", "make fewer images per run")
    if args.fid_labels:
        spread = fid_labels_spread(count, num_classes)
        if spread is not None:
            warnings.warn(f"--fid-labels: {spread}", stacklevel=2)
        return fid_labels(count, num_classes)
    classes = resolve_classes(args.classes or default_classes(num_classes), num_classes)
    return np.array([classes[i % len(classes)] for i in range(count)], dtype=np.int64)


def generate_sample_set(args: argparse.Namespace) -> None:
    """``--npz``: every image into one .npz, through resumable shards (``sample_sets``); under torchrun
    each process takes every world_size-th batch and process 0 owns the work folder."""
    with process_group(check_device(args.device)) as group, claim(args.npz, args.overwrite, group) as folder:
        check_device_options(args, group.device)
        pipe = load_pipeline(args, group.device)
        config = pipe.transformer.config
        check_vae_choice(args, config.pixel_space)
        check_settings(args, config.num_cells)
        labels = sample_set_labels(args, config.num_classes)
        steps = args.steps if args.steps is not None else pipe.default_num_inference_steps
        cfg = args.cfg if args.cfg is not None else pipe.default_guidance_scale
        args.num_images = len(labels)
        check_device_memory(args, pipe, cfg)
        options = sampling_options(args, steps, cfg)
        identity = {
            # What decides the images: the weights (whatever file they came from) and every setting.
            "transformer_sha256": state_dict_sha256(pipe.transformer),
            "vae_sha256": state_dict_sha256(pipe.vae) if pipe.vae is not None else None,
            "dtype": args.dtype, "num_inference_steps": steps, "guidance_scale": cfg, "sampler": args.sampler,
            "guidance_schedule": args.guidance_schedule, "guidance_interval": args.guidance_interval,
            "vae_tiling": args.vae_tiling,
        }

        def make_images(batch_labels: list[int], generators: list[torch.Generator]) -> np.ndarray:
            return to_uint8(pipe(batch_labels, generator=generators, output_type="pt", **options).images)

        def progress(number: int, total: int) -> None:
            pipe.set_progress_bar_config(disable=args.quiet, desc=f"[{group.rank}] batch {number}/{total}", leave=False)

        job = SampleSetJob(labels, args.seed, args.batch_size, pipe.image_shape, identity, make_images)
        write_sample_set(folder, job, group, overwrite=args.overwrite, progress=progress,
                         report=(lambda message: None) if args.quiet else print)
        if group.rank == 0 and not args.quiet:
            print(f"wrote {len(labels)} images to {args.npz}")


def sampling_options(args: argparse.Namespace, steps, cfg: float) -> dict:
    """The pipeline arguments every xar-generate batch shares."""
    tile_size, tile_overlap = args.vae_tiling or (None, DEFAULT_TILE_OVERLAP)
    return dict(num_inference_steps=steps, guidance_scale=cfg, sampler=args.sampler,
                guidance_schedule=args.guidance_schedule, guidance_interval=args.guidance_interval,
                vae_tile_size=tile_size, vae_tile_overlap=tile_overlap)


def run_batches(pipe: XARPipeline, args: argparse.Namespace, image_ids: Sequence[int], steps: int, cfg: float,
                targets: Sequence[Path]) -> list:
    """Generate in batches, saving each image as soon as it exists. Returns the images kept for a
    grid, or the latents (one [1, C, h, w] CPU tensor per image) with --latents-only."""
    n, size = len(image_ids), args.batch_size
    batches = [range(start, min(start + size, n)) for start in range(0, n, size)]
    kept = []
    for number, batch in enumerate(batches, 1):
        pipe.set_progress_bar_config(disable=args.quiet, desc=f"batch {number}/{len(batches)}", leave=False)
        # One generator per image: image i depends on seed + i only, not on the batch it lands in.
        generators = [torch.Generator(device="cpu").manual_seed(args.seed + i) for i in batch]
        images = pipe([image_ids[i] for i in batch], generator=generators,
                      output_type="latent" if args.latents_only else "pil", **sampling_options(args, steps, cfg)).images
        if args.latents_only:
            kept.extend(images.float().cpu().split(1))
            continue
        if args.upscale > 1:
            images = [im.resize((im.width * args.upscale, im.height * args.upscale), Image.NEAREST) for im in images]
        for i, image in zip(batch, images):
            write_file(targets[i], lambda f: image.save(f, format="PNG"), overwrite=args.overwrite,
                       exists_hint=OVERWRITE_HINT)
        if args.grid is not None:
            kept.extend(images)
    return kept


def save_latents(path: Path, latents: Sequence[torch.Tensor], image_ids: Sequence[int], pipe: XARPipeline,
                 args: argparse.Namespace, steps: int, cfg: float) -> None:
    """``latents`` [N, C, h, w] in model scale (divide by ``latent_scale`` before the VAE) and ``labels`` [N]."""
    tensors = {"latents": torch.cat(list(latents)).contiguous(),
               "labels": torch.tensor(list(image_ids), dtype=torch.int64)}
    metadata = {
        "latent_scale": str(pipe.transformer.config.latent_scale),
        "seed": str(args.seed),
        "num_inference_steps": str(steps),
        "guidance_scale": str(cfg),
        "sampler": args.sampler,
        "guidance_schedule": args.guidance_schedule,
    }
    write_file_by_path(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata), overwrite=args.overwrite,
                       exists_hint=OVERWRITE_HINT)


def generate_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``xar-generate``; returns the exit status."""
    args = build_generate_parser().parse_args(argv)
    return run_command(GENERATE_PROG, lambda: generate(args))


# --------------------------------------------------------------------------------------------------
# xar-convert
# --------------------------------------------------------------------------------------------------

def build_convert_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog=CONVERT_PROG,
        description="Write the model folder that XARPipeline.save_pretrained writes (model.safetensors, config.json, "
                    "a README.md model card, and the VAE in vae/) from a released xAR .pth checkpoint, a preset or "
                    "another model folder. XARPipeline.from_pretrained(DIR) and xar-generate --checkpoint DIR load it; "
                    "upload it with `hf upload` or pipe.push_to_hub.",
        epilog=f"example: {CONVERT_PROG} xAR-B.pth xar-b-hub/ --vae kl16.ckpt --variant bf16",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("checkpoint", help="a released checkpoint (.pth), a .safetensors file, a model folder, or a "
                                           f"preset ({', '.join(PRESETS)})")
    parser.add_argument("output_dir", help="folder to write (made if missing)")
    parser.add_argument("--vae", metavar="PATH", help="the VAE to include, e.g. MAR's kl16.ckpt (default: the one saved "
                                                      "with CHECKPOINT, if any)")
    parser.add_argument("--variant", choices=tuple(VARIANTS),
                        help="write the weights in this precision as model.<variant>.safetensors (bf16: half the size)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a different save in OUTPUT_DIR (identical files are always kept as they are)")
    return parser


def convert(args: argparse.Namespace) -> None:
    source: str | Path = args.checkpoint
    if Path(source).exists():
        source = Path(source).absolute()  # a relative path spelled like a preset stays a local path
    elif find_preset(source) is None:
        raise FileNotFoundError(f"checkpoint not found: {args.checkpoint} (a file, a model folder or a preset: "
                                f"{', '.join(PRESETS)})")
    if args.vae is not None and not Path(args.vae).is_file():
        raise FileNotFoundError(f"VAE not found: {args.vae}")
    out = Path(args.output_dir)
    ensure_writable_dir(out)  # before the checkpoint is read
    convert_checkpoint(source, out, vae=args.vae, variant=args.variant, overwrite=args.overwrite)
    print(f"wrote the model folder {out} (from_pretrained and xar-generate --checkpoint load it)")


def convert_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``xar-convert``; returns the exit status."""
    args = build_convert_parser().parse_args(argv)
    return run_command(CONVERT_PROG, lambda: convert(args))


if __name__ == "__main__":
    sys.exit(generate_main())
