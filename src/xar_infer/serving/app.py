"""The HTTP API and the web page: a FastAPI app around a :class:`~.service.GenerationService`.

    POST /v1/generate          JSON settings -> image/png, or the latent as .npy bytes; X-Seed header
    POST /v1/generate/stream   the same -> Server-Sent Events: a ``cell`` preview per cell, then ``done``
    GET  /v1/model             what the page needs: classes, defaults, image size
    GET  /healthz, /metrics    liveness; Prometheus text
    GET  /                     the page (static/index.html)

Every error a client can cause is answered ``{"error": "<one line>"}``: 422 for bad input, 429 when
the queue is full, 503 while stopping, 500 (without details) for a bug, which the log keeps.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import time
from contextlib import asynccontextmanager
from importlib.resources import files
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, StrictFloat, StrictInt, StrictStr
from starlette.concurrency import run_in_threadpool

from ..engine import GenerationRequest
from ..errors import first_line
from ..imagenet import IMAGENET_NUM_CLASSES, IMAGENET_SYNSET_WORDS
from ..pipeline import XARPipeline
from .images import npy_bytes, png_bytes, preview
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .service import GenerationService, QueueFullError, ShuttingDownError, Ticket

EXAMPLE_BODY = '{"class_label": 7, "seed": 3}'
CANCELLED_AT_SHUTDOWN = "the server is stopping: the request was cancelled; retry on another replica or later"


class GenerateBody(BaseModel):
    """The body of both generate routes. Fields left out take the model's defaults; values are
    checked by the library (``GenerationRequest``), types here."""

    model_config = ConfigDict(extra="forbid")

    class_label: StrictInt | StrictStr
    seed: StrictInt | None = None
    num_inference_steps: StrictInt | list[StrictInt] | None = None
    guidance_scale: StrictFloat | StrictInt | None = None
    sampler: StrictStr | None = None
    guidance_schedule: StrictStr | None = None
    guidance_interval: tuple[StrictFloat | StrictInt, StrictFloat | StrictInt] | None = None
    output: Literal["png", "latent"] = "png"

    def request(self, output_type: str) -> GenerationRequest:
        return GenerationRequest(
            class_label=self.class_label, seed=self.seed, num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale, sampler=self.sampler, guidance_schedule=self.guidance_schedule,
            guidance_interval=self.guidance_interval, output_type=output_type)


# What each field must be, for the one-line answer to a value of the wrong type.
FIELD_TYPES = {
    "class_label": "a class id (an integer) or an ImageNet class name (a string)",
    "seed": "an integer in [0, 2**64)",
    "num_inference_steps": "a positive integer, or a list of them with one per cell",
    "guidance_scale": "a number >= 1 (1 turns guidance off)",
    "sampler": "a string: sde, euler or heun",
    "guidance_schedule": "a string: linear or constant",
    "guidance_interval": "a list [lo, hi] of flow times with 0 <= lo <= hi <= 1",
    "output": "\"png\" or \"latent\"",
}


def _shown(value: object, limit: int = 40) -> str:
    text = json.dumps(value) if isinstance(value, (dict, list, str, int, float, bool, type(None))) else repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def validation_message(errors: list[dict]) -> str:
    """FastAPI's list of validation errors -> one line naming the first problem and its fix."""
    error = errors[0]
    kind = error.get("type", "")
    path = [part for part in error.get("loc", ()) if part != "body"]
    field = str(path[0]) if path else ""
    if kind == "json_invalid":
        detail = (error.get("ctx") or {}).get("error", "")
        return f"the body is not valid JSON ({detail}): send a JSON object such as {EXAMPLE_BODY}"
    if not field:
        return (f"the body must be a JSON object such as {EXAMPLE_BODY}, sent with Content-Type: application/json")
    if kind == "extra_forbidden":
        return f"unknown field {field!r}: the fields are {', '.join(GenerateBody.model_fields)}"
    if kind == "missing":
        return f"{field} is required: the class to generate, e.g. {EXAMPLE_BODY}"
    return f"{field} must be {FIELD_TYPES.get(field, 'of another type')}, got {_shown(error.get('input'))}"


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class ServedBy:
    """Names the process that answered in an ``X-Served-By`` header (host:pid), so that a client of
    several replicas sees which one served it. Plain ASGI: streamed answers stream through untouched."""

    def __init__(self, app, value: str):
        self.app, self.header = app, (b"x-served-by", value.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_named(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, send_named)


def sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


def create_app(pipe: XARPipeline, *, max_rows: int = 64, max_queue: int = 256, batching: str = "continuous",
               shutdown_timeout: float = 30.0, model_name: str = "") -> FastAPI:
    """The server's app for an already loaded pipeline. Its engine (``max_rows`` rows) is allocated
    now and runs from the app's startup to its shutdown, which lets running requests finish for up to
    ``shutdown_timeout`` seconds, then cancels them.

    Example::

        pipe = XARPipeline.from_pretrained("xar-digits")
        uvicorn.run(create_app(pipe, max_rows=64), port=8000)
    """
    service = GenerationService(pipe, max_rows=max_rows, max_queue=max_queue, batching=batching)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.start()
        yield
        await run_in_threadpool(service.shutdown, shutdown_timeout)

    app = FastAPI(title="xar-serve", lifespan=lifespan)
    app.state.service = service
    app.add_middleware(ServedBy, value=f"{socket.gethostname()}:{os.getpid()}")
    app.mount("/static", StaticFiles(directory=str(files("xar_infer.serving") / "static")), name="static")

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, error: RequestValidationError):
        service.metrics.count("invalid")
        return error_response(422, validation_message(error.errors()))

    @app.exception_handler(Exception)
    async def bug(request: Request, error: Exception):  # Starlette re-raises it after, for the server's log
        return error_response(500, f"internal error ({type(error).__name__}); the server's log has the details")

    def submit(body: GenerateBody, output_type: str, on_cell=None) -> Ticket | JSONResponse:
        try:
            return service.submit(body.request(output_type), on_cell=on_cell)
        except QueueFullError as error:
            return error_response(429, str(error), {"Retry-After": str(error.retry_after)})
        except ShuttingDownError as error:
            return error_response(503, str(error))
        except (TypeError, ValueError) as error:
            return error_response(422, first_line(error))

    @app.post("/v1/generate")
    async def generate(body: GenerateBody):
        ticket = submit(body, "latent" if body.output == "latent" else "pil")
        if isinstance(ticket, JSONResponse):
            return ticket
        await settled(ticket)
        if ticket.future.cancelled():
            return error_response(503, CANCELLED_AT_SHUTDOWN)
        if ticket.future.exception() is not None:  # this request's generation failed (e.g. NaN); others go on
            return error_response(500, f"generation failed: {first_line(ticket.future.exception())}")
        result = ticket.future.result()
        headers = {"X-Seed": str(ticket.seed)}
        if body.output == "latent":
            return Response(await run_in_threadpool(npy_bytes, result), media_type="application/octet-stream",
                            headers=headers)
        return Response(await run_in_threadpool(png_bytes, result), media_type="image/png", headers=headers)

    @app.post("/v1/generate/stream")
    async def generate_stream(body: GenerateBody):
        if body.output != "png":
            return error_response(422, 'output must be "png" for the stream (previews and the final image are PNGs); '
                                       'use /v1/generate for a latent')
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def on_cell(index, latent):  # the engine's thread
            call_in_loop(loop, events.put_nowait, (index, latent))

        ticket = submit(body, "pil", on_cell)
        if isinstance(ticket, JSONResponse):
            return ticket
        ticket.future.add_done_callback(lambda future: call_in_loop(loop, events.put_nowait, (None, future)))

        async def stream():
            try:
                while True:
                    index, item = await events.get()
                    elapsed = round(time.monotonic() - ticket.arrived, 4)
                    if index is not None:  # the engine's cells arrive before its result
                        image = await run_in_threadpool(preview, pipe, item, index + 1)
                        yield sse("cell", {"index": index, "png": _base64_png(image), "seconds": elapsed})
                        continue
                    if item.cancelled():
                        yield sse("error", {"error": CANCELLED_AT_SHUTDOWN})
                    elif item.exception() is not None:
                        yield sse("error", {"error": f"generation failed: {first_line(item.exception())}"})
                    else:
                        png = await run_in_threadpool(_base64_png, item.result())
                        yield sse("done", {"png": png, "seed": ticket.seed, "seconds": elapsed})
                    return
            finally:
                ticket.future.cancel()  # the client left (nothing happens when the request is done)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"X-Seed": str(ticket.seed), "Cache-Control": "no-cache"})

    @app.get("/v1/model")
    async def model_info():
        config = pipe.transformer.config
        imagenet = config.num_classes == IMAGENET_NUM_CLASSES
        try:
            height, width, _ = pipe.image_shape
        except ValueError:  # no VAE: latents only
            height = width = None
        return {"model": model_name, "num_classes": config.num_classes, "num_cells": config.num_cells,
                "class_names": list(IMAGENET_SYNSET_WORDS) if imagenet else None,
                "default_steps": pipe.default_num_inference_steps, "default_guidance_scale": pipe.default_guidance_scale,
                "image_size": None if height is None else [height, width], "max_rows": service.engine.max_rows,
                "batching": service.batching}

    @app.get("/healthz")
    async def healthz():
        if not service.accepting:
            return error_response(503, "the server is shutting down")
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(service.metrics.render(), media_type=METRICS_CONTENT_TYPE)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse((files("xar_infer.serving") / "static" / "index.html").read_text(encoding="utf-8"))

    return app


def call_in_loop(loop: asyncio.AbstractEventLoop, function, *args) -> None:
    """``function(*args)`` in the event loop, from another thread; nothing once the loop has closed
    (at shutdown, when nobody waits any more)."""
    try:
        loop.call_soon_threadsafe(function, *args)
    except RuntimeError:
        pass


async def settled(ticket: Ticket) -> None:
    """Wait until the request has ended (done, failed or cancelled). If the waiting is cancelled (the
    client left, or the server stops), the request is cancelled too."""
    loop = asyncio.get_running_loop()
    ended = loop.create_future()
    ticket.future.add_done_callback(lambda _: call_in_loop(loop, lambda: ended.done() or ended.set_result(None)))
    try:
        await ended
    finally:
        ticket.future.cancel()  # nothing happens when it has ended


def _base64_png(image) -> str:
    return base64.b64encode(png_bytes(image)).decode("ascii")
