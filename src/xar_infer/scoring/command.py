"""``xar-fid SAMPLES.npz --ref REF.npz``: FID and Inception Score the way the paper measured them.

Every check that needs no Inception (the files, the options, the output) runs first; a refusal is
one line on stderr, exit status 2, and nothing is written.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Sequence

import torch

from .. import __version__
from ..cli import OVERWRITE_HINT, OneLineErrorParser, check_device, run_command, same_file_name
from ..errors import InvalidArgumentError
from ..output_files import require_parent_folder, write_file
from . import inception
from .npz_inputs import open_images, open_reference
from .scores import plan, score

PROG = "xar-fid"


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog=PROG,
        description="FID and Inception Score of a sample set (.npz, arr_0: uint8 [N, H, W, 3]) against a reference, "
                    "with torch-fidelity's InceptionV3, as the xAR paper measured them.",
        epilog=f"example: {PROG} samples.npz --ref fid_stats/adm_in256_stats.npz --json scores.json",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("samples", metavar="SAMPLES.npz", help="the images to score, e.g. from xar-generate --npz")
    parser.add_argument("--ref", required=True, metavar="REF.npz",
                        help="reference statistics (mu, sigma: the official fid_stats/adm_in256_stats.npz) or images "
                             "(arr_0, e.g. ADM's VIRTUAL_imagenet256_labeled.npz, which has both)")
    parser.add_argument("--precision-recall", action="store_true",
                        help="also precision and recall (needs reference images)")
    parser.add_argument("--json", metavar="PATH", help="also write the scores as JSON (its folder must exist)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per Inception pass (default: 64)")
    parser.add_argument("--inception-weights", metavar="PATH",
                        help=f"torch-fidelity's {inception.WEIGHTS_FILE_NAME} (default: downloaded once into torch's "
                             "hub cache); for machines without internet access")
    parser.add_argument("--inception-sha256", metavar="HEX",
                        help="accept an --inception-weights file with this SHA-256 instead of the official one "
                             "(another port, or test weights); it is still read as plain tensors only")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def check_args(args: argparse.Namespace) -> None:
    if args.batch_size < 1:
        raise InvalidArgumentError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.inception_sha256 is not None:
        if not re.fullmatch(r"[0-9a-fA-F]{64}", args.inception_sha256):
            raise InvalidArgumentError(f"--inception-sha256 must be 64 hexadecimal digits, got {args.inception_sha256!r}")
        if args.inception_weights is None:
            raise InvalidArgumentError("--inception-sha256 checks the file given by --inception-weights; pass both")
    if args.inception_weights is not None and not Path(args.inception_weights).is_file():
        raise FileNotFoundError(f"--inception-weights {args.inception_weights} is not a file; download "
                                f"torch-fidelity's {inception.WEIGHTS_FILE_NAME} (its release v0.2.0) and pass its path")
    if args.json is not None:
        target = Path(args.json)
        require_parent_folder(target, "--json")
        for name, path in (("SAMPLES", args.samples), ("--ref", args.ref)):
            if same_file_name(target, Path(path)):
                raise InvalidArgumentError(f"--json {args.json} names the {name} file; choose another name")
        if target.is_dir():
            raise IsADirectoryError(f"--json {args.json} is a directory")
        if os.path.lexists(target) and not args.overwrite:
            raise FileExistsError(f"--json {args.json} already exists; {OVERWRITE_HINT}")


def run(args: argparse.Namespace) -> None:
    check_args(args)
    samples = open_images(args.samples, "SAMPLES")
    reference = open_reference(args.ref)
    device = check_device(args.device)
    inception.torch_fidelity()  # a missing or broken extra is reported before any download
    sha256 = (args.inception_sha256 or inception.INCEPTION_SHA256).lower()
    job = plan(samples, reference, sha256, precision_and_recall=args.precision_recall)
    path = (Path(args.inception_weights) if args.inception_weights is not None
            else inception.fetch_weights(inception.default_weights_path(), inception.weights_url()))
    extractor = inception.feature_extractor(inception.load_weights(path, sha256), device)
    scores = score(job, extractor, batch_size=args.batch_size, progress=not args.quiet)
    print(scores.line())
    if args.json is not None:
        report = {**scores.as_dict(), "samples": str(args.samples), "reference": str(args.ref),
                  "reference_used": "statistics" if reference.statistics is not None else "images",
                  "inception_sha256": sha256, "torch_fidelity": inception.torch_fidelity().__version__,
                  "xar_infer": __version__}
        text = json.dumps(report, indent=2) + "\n"
        write_file(args.json, lambda f: f.write(text.encode()), overwrite=args.overwrite, exists_hint=OVERWRITE_HINT)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``xar-fid``; returns the exit status."""
    args = build_parser().parse_args(argv)
    return run_command(PROG, lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
