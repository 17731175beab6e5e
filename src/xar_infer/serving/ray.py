"""xar-serve on Ray Serve: the same app in N replicas, each with its own engine (and its own GPU on
CUDA), behind Ray's HTTP proxy, which spreads the requests (``pip install 'xar_infer[ray]'``).

    serve run xar_infer.serving.ray:app model=xar-digits replicas=2 max_rows=64
    xar-serve --ray --replicas 2 --model xar-digits --port 8000

``app`` takes xar-serve's options by their names (``max_rows``, ``vae``, ``cuda_graphs=true``, ...)
and checks them as xar-serve does. Every answer names its replica in the ``X-Served-By`` header.
"""

from __future__ import annotations

import argparse
import signal
import threading

import torch
from ray import serve
from ray.serve import Application

from ..cli import load_pipeline
from .app import create_app
from .options import build_serve_parser, model_options, validate_serve_args

DEPLOYMENT_NAME = "xar-serve"


@serve.ingress()
class XARReplica:
    """One replica: the model loaded from ``model`` (xar-serve's model options) and the app around it."""

    def __init__(self, model: dict, server: dict):
        options = argparse.Namespace(**model, latents_only=False)
        pipe = load_pipeline(options, torch.device(options.device))
        pipe.set_progress_bar_config(disable=True)
        self._app = create_app(pipe, model_name=options.model or options.checkpoint, **server)

    def __serve_build_asgi_app__(self):
        return self._app


def build_application(args: argparse.Namespace) -> Application:
    """The deployment for checked xar-serve options: ``args.replicas`` replicas, one GPU each on CUDA."""
    on_gpu = torch.device(args.device).type == "cuda"
    server = {"max_rows": args.max_rows, "max_queue": args.max_queue, "batching": args.batching,
              "shutdown_timeout": args.shutdown_timeout}
    deployment = serve.deployment(
        XARReplica, name=DEPLOYMENT_NAME, num_replicas=args.replicas,
        ray_actor_options={"num_gpus": 1} if on_gpu else {"num_cpus": 1},
        # A replica's engine batches every request it holds: let it hold as many as it may queue.
        max_ongoing_requests=args.max_rows + args.max_queue,
        # Ray waits this long for a replica's requests before stopping it; the app's own timeout goes first.
        graceful_shutdown_timeout_s=args.shutdown_timeout + 5)
    return deployment.bind(model_options(args), server)


def parse_options(options: dict[str, str]) -> argparse.Namespace:
    """``serve run``'s ``name=value`` arguments as xar-serve's options (``max_rows=8`` is
    ``--max-rows 8``; a switch takes ``true`` or ``false``)."""
    parser = build_serve_parser()
    switches = {action.dest for action in parser._actions if action.nargs == 0}
    argv = []
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if name in switches:
            if str(value).lower() in ("1", "true", "yes"):
                argv.append(flag)
        else:
            argv += [flag, str(value)]
    return parser.parse_args(argv)


def app(options: dict[str, str]) -> Application:
    """The application builder of ``serve run xar_infer.serving.ray:app name=value ...``."""
    args = parse_options({**options, "ray": "true"})
    validate_serve_args(args)
    return build_application(args)


def run_ray(args: argparse.Namespace) -> None:
    """``xar-serve --ray``: start Ray Serve on this machine with the app, until SIGTERM or Ctrl-C."""
    import ray

    ray.init(include_dashboard=False)
    # After ray.init, which installs its own SIGTERM handler (one that kills the process at once).
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda number, frame: stop.set())
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(build_application(args), name=DEPLOYMENT_NAME, route_prefix="/")
        print(f"xar-serve: {args.replicas} replica(s) serving on http://{args.host}:{args.port}", flush=True)
        stop.wait()
        serve.shutdown()  # each replica's app shuts down as a single server does
    finally:
        ray.shutdown()
