"""``xar-serve``: the HTTP server, in this process (uvicorn) or as Ray Serve replicas (``--ray``).

    xar-serve --model xar-digits --port 8000          # the bundled demo model: works offline
    xar-serve --model xar-b --vae kl16.ckpt --device cuda --dtype bf16 --max-rows 256

Arguments are checked before the model loads; a bad one is one line on stderr and exit status 2, as
with ``xar-generate``. SIGTERM (or Ctrl-C) stops taking connections, lets running requests finish for
up to --shutdown-timeout seconds, cancels the rest, and exits 0 (130 after Ctrl-C).
"""

from __future__ import annotations

import argparse
import importlib.util
import signal
import sys
from typing import Sequence

from ..cli import load_pipeline, run_command

SERVE_EXTRA = ("fastapi", "uvicorn", "prometheus_client")
# Seconds uvicorn waits for connections beyond --shutdown-timeout, when the requests have been
# cancelled and their answers are being sent; only then does it cut connections.
UVICORN_GRACE = 5.0


def serve(args: argparse.Namespace) -> None:
    from .options import validate_serve_args

    device = validate_serve_args(args)
    if args.ray:
        from .ray import run_ray  # Ray is an optional extra: imported only when asked for
        run_ray(args)
        return
    import uvicorn

    from .app import create_app

    pipe = load_pipeline(args, device)
    pipe.set_progress_bar_config(disable=True)
    app = create_app(pipe, max_rows=args.max_rows, max_queue=args.max_queue, batching=args.batching,
                     shutdown_timeout=args.shutdown_timeout, model_name=args.model or args.checkpoint)
    # uvicorn's own wait covers the connections (it stops accepting first); the app's shutdown then
    # stops the engine. uvicorn re-raises the signal it caught once it is done, to exit as the signal
    # would; a handler that does nothing makes that re-raise a clean exit 0.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=args.shutdown_timeout + UVICORN_GRACE)
    service = app.state.service

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            # The service ends its requests at the timeout (a stream gets an error event, a request
            # a 503), so that uvicorn's wait for the connections ends without cutting any off.
            service.close(args.shutdown_timeout)
            super().handle_exit(sig, frame)

    Server(config).run()


def serve_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``xar-serve``; returns the exit status."""
    missing = [name for name in SERVE_EXTRA if importlib.util.find_spec(name) is None]
    if missing:
        print(f"xar-serve: error: {', '.join(missing)} not installed: pip install 'xar_infer[serve]'", file=sys.stderr)
        return 2
    from .options import SERVE_PROG, build_serve_parser  # the service's policies need the extra

    args = build_serve_parser().parse_args(argv)
    return run_command(SERVE_PROG, lambda: serve(args))


if __name__ == "__main__":
    sys.exit(serve_main())
