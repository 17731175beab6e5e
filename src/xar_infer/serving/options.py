"""xar-serve's options: the parser, and the checks made before the model loads. Shared by the
command (``cli``) and the Ray Serve builder (``ray``), which takes the same options by name."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .. import __version__
from ..cli import OneLineErrorParser, add_model_options, check_device, check_device_options
from ..errors import InvalidArgumentError
from .service import BATCHING_POLICIES

SERVE_PROG = "xar-serve"
DEFAULT_MODEL = "xar-digits"


def build_serve_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog=SERVE_PROG,
        description="Serve an xAR model over HTTP: POST /v1/generate (PNG or latent), /v1/generate/stream "
                    "(a preview per cell, as Server-Sent Events), a web page at /, /healthz and /metrics.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")

    add_model_options(parser, DEFAULT_MODEL)  # as in xar-generate

    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1; "
                                                            "0.0.0.0 for every interface)")
    server.add_argument("--port", type=int, default=8000, help="default: 8000")
    server.add_argument("--max-rows", type=int, default=64,
                        help="the engine's rows (KV-cache slots, allocated at start): a request holds one, two when "
                             "guided, while it runs (default: 64)")
    server.add_argument("--max-queue", type=int, default=256,
                        help="requests that may wait for rows; beyond it the answer is 429 (default: 256)")
    server.add_argument("--batching", choices=BATCHING_POLICIES, default="continuous",
                        help="continuous (requests join the running ones at the next network call; default) or "
                             "static (a batch runs to its end before the next starts: for comparison)")
    server.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="SECONDS",
                        help="on SIGTERM, how long running requests may finish before they are cancelled (default: 30)")
    server.add_argument("--log-level", choices=("critical", "error", "warning", "info", "debug"), default="info")

    ray = parser.add_argument_group("Ray Serve (pip install 'xar_infer[ray]')")
    ray.add_argument("--ray", action="store_true", help="serve through Ray Serve's HTTP proxy, one engine per replica")
    ray.add_argument("--replicas", type=int, default=1, metavar="N",
                     help="with --ray: replicas, each with its own engine and one GPU when --device is cuda (default: 1)")
    return parser


def validate_serve_args(args: argparse.Namespace) -> torch.device:
    """Everything checkable before the model loads; returns the device."""
    if not 0 <= args.port <= 65535:
        raise InvalidArgumentError(f"--port must be in 0..65535, got {args.port}")
    if args.max_rows < 1:
        raise InvalidArgumentError(f"--max-rows must be at least 1 (2 for guided requests), got {args.max_rows}")
    if args.max_queue < 0:
        raise InvalidArgumentError(f"--max-queue must be 0 or more, got {args.max_queue}")
    if not args.shutdown_timeout >= 0:
        raise InvalidArgumentError(f"--shutdown-timeout must be 0 or more seconds, got {args.shutdown_timeout}")
    if args.replicas < 1:
        raise InvalidArgumentError(f"--replicas must be at least 1, got {args.replicas}")
    if args.replicas > 1 and not args.ray:
        raise InvalidArgumentError("--replicas needs --ray (one process serves one engine); add --ray")
    device = check_device(args.device)
    check_device_options(args, device)
    if args.model is None and args.checkpoint is None:
        args.model = DEFAULT_MODEL
    args.latents_only = False  # load_pipeline's question: a VAE given is loaded
    return device


def model_options(args: argparse.Namespace) -> dict:
    """The options that rebuild the model elsewhere (a Ray replica), as plain values; paths made
    absolute, since a replica runs in another working directory."""
    names = ("model", "checkpoint", "revision", "cache_dir", "local_files_only", "sha256", "vae", "device", "dtype",
             "backend", "cuda_graphs")
    options = {name: getattr(args, name) for name in names}
    for name in ("checkpoint", "cache_dir", "vae"):
        if options[name] is not None:
            options[name] = str(Path(options[name]).absolute())
    return options
