"""The server's queue in front of the engine: which requests wait, which run, and when a batch may start.

A request is checked when it arrives (bad settings are refused at once, never after a wait), then
waits here until the engine has rows for it; the engine itself then never holds a waiting request.
Keeping the queue here is what lets the server refuse requests beyond ``max_queue`` and count what
waits, and it is where the batching policy lives:

- ``continuous``: a waiting request starts as soon as its rows are free, joining the requests that
  run, at the engine's next network call.
- ``static``: a batch starts only when the previous one has ended, and takes every waiting request
  that fits. It exists to measure what continuous batching gains (``benchmarks/serve.py``).
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

from ..engine import GenerationFuture, GenerationRequest
from ..errors import InvalidArgumentError, XARError
from ..imagenet import resolve_class_label
from ..pipeline import XARPipeline
from .metrics import ServerMetrics

BATCHING_POLICIES = ("continuous", "static")


class QueueFullError(XARError, RuntimeError):
    """The queue holds ``max_queue`` waiting requests already; ``retry_after`` estimates when to retry (s)."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class ShuttingDownError(XARError, RuntimeError):
    """The server is stopping and takes no new requests."""


@dataclass(eq=False)
class Ticket:
    """One request in the server: waiting (``engine_future`` None) or running on the engine.

    ``future`` is the server's: it gets the engine's result, and cancelling it cancels the request
    wherever it is. ``request.seed`` is always set (drawn at arrival when the client gave none).
    """

    request: GenerationRequest
    rows: int
    on_cell: Callable | None
    arrived: float = field(default_factory=time.monotonic)
    future: Future = field(default_factory=Future)
    engine_future: GenerationFuture | None = None

    @property
    def seed(self) -> int:
        return self.request.seed


class GenerationService:
    """The engine of ``pipe`` and the queue in front of it. ``max_rows``: the engine's rows (KV-cache
    slots); ``max_queue``: waiting requests beyond which ``submit`` raises :class:`QueueFullError`;
    ``batching``: ``"continuous"`` or ``"static"``. Thread-safe; the engine's thread calls back into it.
    """

    def __init__(self, pipe: XARPipeline, max_rows: int = 64, max_queue: int = 256, batching: str = "continuous",
                 metrics: ServerMetrics | None = None):
        if batching not in BATCHING_POLICIES:
            raise InvalidArgumentError(f"batching must be one of {BATCHING_POLICIES}, got {batching!r}")
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 0:
            raise InvalidArgumentError(f"max_queue must be a non-negative integer (the requests that may wait), "
                                       f"got {max_queue!r}")
        self.pipe = pipe
        self.engine = pipe.engine(max_rows=max_rows)
        self.max_queue = max_queue
        self.batching = batching
        self.metrics = metrics or ServerMetrics()
        self.metrics.watch(self)
        self._waiting: deque[Ticket] = deque()
        self._running: set[Ticket] = set()
        self._rows_in_use = 0
        self._closed = False
        # Reentrant: a future that is already done runs its callbacks in the thread that adds them.
        self._lock = threading.RLock()
        self._mean_latency = 1.0  # seconds, a moving average: what Retry-After says

    @property
    def queue_length(self) -> int:
        return len(self._waiting)

    @property
    def rows_in_use(self) -> int:
        return self._rows_in_use

    @property
    def accepting(self) -> bool:
        return not self._closed

    # ------------------------------------------------------------------------------ requests
    def check(self, request: GenerationRequest) -> tuple[GenerationRequest, int]:
        """The request with its seed set, and the engine rows it holds while it runs. Raises
        ``ValueError``/``TypeError`` naming the bad setting, with the library's own messages."""
        config = self.pipe.transformer.config
        try:
            resolve_class_label(request.class_label, config.num_classes)
        except (TypeError, ValueError) as error:
            raise type(error)(f"class_label: {error}") from None
        if request.output_type != "latent":
            self.pipe.image_shape  # raises, naming the fix, when the model makes no images (no VAE)
        request, settings = self.engine.check(request)
        rows = 2 if settings.plan(config.num_cells).guided else 1
        if rows > self.engine.max_rows:
            raise InvalidArgumentError(f"a guided request needs 2 rows but this server has --max-rows "
                                       f"{self.engine.max_rows}: set guidance_scale to 1, or restart with more rows")
        return request, rows

    def submit(self, request: GenerationRequest, on_cell: Callable | None = None) -> Ticket:
        """Queue ``request``; ``on_cell(index, latent)`` as in ``Engine.submit``. Raises ``ValueError``
        for bad settings, :class:`QueueFullError`, or :class:`ShuttingDownError`."""
        try:
            request, rows = self.check(request)
        except (TypeError, ValueError):
            self.metrics.count("invalid")
            raise
        ticket = Ticket(request, rows, on_cell)
        with self._lock:
            if self._closed:
                self.metrics.count("refused")
                raise ShuttingDownError("the server is shutting down; retry on another replica or later")
            self._waiting.append(ticket)
            self._admit()
            if ticket.engine_future is None and len(self._waiting) > self.max_queue:
                self._waiting.remove(ticket)
                retry = max(1, math.ceil(self._mean_latency))
                self.metrics.count("refused")
                raise QueueFullError(f"{self.max_queue} requests are waiting already (--max-queue); retry in "
                                     f"about {retry} s", retry)
        ticket.future.add_done_callback(lambda future: self._on_ticket_done(ticket))
        return ticket

    def _admit(self) -> None:
        """Start the waiting requests that the policy lets in (under the lock)."""
        if self.batching == "static" and self._rows_in_use > 0:
            return  # the batch that runs must end first
        while self._waiting and self._waiting[0].rows <= self.engine.max_rows - self._rows_in_use:
            ticket = self._waiting.popleft()
            self._rows_in_use += ticket.rows
            self._running.add(ticket)
            try:
                ticket.engine_future = self.engine.submit(ticket.request, on_cell=ticket.on_cell)
            except Exception as error:  # checked at arrival, so a bug: this request fails, others go on
                self._rows_in_use -= ticket.rows
                self._running.discard(ticket)
                ticket.future.set_exception(error)
                continue
            ticket.engine_future.add_done_callback(lambda future, ticket=ticket: self._on_engine_done(ticket))

    def _on_engine_done(self, ticket: Ticket) -> None:
        """The engine is done with the request (finished, failed or cancelled): free its rows."""
        with self._lock:
            self._rows_in_use -= ticket.rows
            self._running.discard(ticket)
            self._admit()
        engine_future = ticket.engine_future
        if engine_future.cancelled():
            ticket.future.cancel()
            return
        error = engine_future.exception()
        if not ticket.future.set_running_or_notify_cancel():
            return
        if error is not None:
            ticket.future.set_exception(error)
            self.metrics.count("failed")
        else:
            latency = time.monotonic() - ticket.arrived
            self._mean_latency = 0.9 * self._mean_latency + 0.1 * latency
            ticket.future.set_result(engine_future.result())
            self.metrics.count("ok", latency)

    def _on_ticket_done(self, ticket: Ticket) -> None:
        if not ticket.future.cancelled():
            return
        self.metrics.count("cancelled")
        with self._lock:
            if ticket in self._waiting:
                self._waiting.remove(ticket)
                self._admit()
            elif ticket.engine_future is not None:
                ticket.engine_future.cancel()  # the engine frees its rows before its next network call

    # ------------------------------------------------------------------------------ life
    def start(self) -> "GenerationService":
        self.engine.start()
        return self

    def close(self, timeout: float) -> None:
        """Take no new requests, and cancel those still waiting or running ``timeout`` seconds from
        now. Returns at once (a signal handler calls it)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        timer = threading.Timer(timeout, self._cancel_all)
        timer.daemon = True
        timer.start()

    def shutdown(self, timeout: float = 30.0) -> None:
        """``close(timeout)``, wait until the accepted requests have ended or been cancelled, then stop
        the engine."""
        self.close(timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and (self._waiting or self._rows_in_use):
            time.sleep(0.02)
        self._cancel_all()
        self.engine.shutdown(wait=False)

    def _cancel_all(self) -> None:
        with self._lock:
            tickets = [*self._waiting, *self._running]
        for ticket in tickets:
            ticket.future.cancel()
