"""The generation engine: many jobs, one network call at a time, each call a packed batch of cells.

Every network call, the scheduler admits what fits; then each running job contributes the evaluation
its sampler asked for (one noisy cell per image and half, plus the previous clean cell on a cell's
first call), all packed into one :class:`~xar_infer.model.CellBatch`. Jobs at different cells, steps
and settings share the call; each gets its own velocities back, and the state updates of all of
them run together, one sampler step per kind of update; then each sampler moves on. So a
request that arrives while others run joins at the next call instead of waiting for a whole batch.

``step()`` runs one call; ``start()`` runs calls in a background thread while there is work, which
is how ``XARPipeline.engine`` serves requests; ``run_until_idle()`` runs them in the caller's thread,
which is how ``XARPipeline.__call__`` generates its batch.
"""

from __future__ import annotations

import secrets
import threading
from concurrent.futures import Future, InvalidStateError
from dataclasses import replace
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from ..backends import Backend
from ..errors import InvalidArgumentError
from ..imagenet import resolve_class_labels
from ..memory import require_memory
from ..model import CellBatch, Tokens, XARTransformer, join_tokens, to_device
from ..sampling import NoiseSource, StepHook, apply_updates, cells_to_latent, sample_image
from ..settings import SamplingSettings
from .modulations import ModulationStore
from .requests import CellCallback, GenerationFuture, GenerationRequest, Job
from .scheduler import Scheduler

# Seeds go to torch.Generator.manual_seed, which takes up to 64 bits.
MAX_SEED = 2**64 - 1


class EagerNetwork:
    """The network call protocol, run eagerly: ``network(tokens, batch, modulations)`` -> velocities of
    every cell of ``batch`` (``XARTransformer.forward``), with the KV cache this object owns.
    ``tokens``: a tensor, or its chunks in packing order (``model.Tokens``). ``xar_infer.cuda_graphs``
    replays the same calls from CUDA graphs."""

    def __init__(self, model: XARTransformer, ops, num_slots: int):
        self.model, self.ops = model, ops
        self.cache = model.new_cache(num_slots)

    def __call__(self, tokens: Tokens, batch: CellBatch, modulations: Tensor | None) -> Tensor:
        return self.model(join_tokens(tokens), batch, self.cache, self.ops, modulations)


# network(model, ops, num_slots) -> a callable like EagerNetwork.
NetworkFactory = Callable[[XARTransformer, Any, int], Callable[[Tokens, CellBatch, "list[Tensor] | None"], Tensor]]


class Engine:
    """Continuous batching of generation jobs on one transformer.

    ``max_rows``: the KV cache's slots, allocated up front: a call computes at most one row per slot
    (an image's conditional or unconditional half), and a request needs one slot per half for its
    whole life. ``defaults``: (steps, guidance scale) for settings a request leaves out.
    ``finish(latent, output_type)``: turns a job's latent into its result (the pipeline decodes), and
    ``check_output_type`` refuses the output types it cannot make; without them results are latents.
    ``modulation_table_bytes``: the memory for the jobs' modulations (:class:`ModulationStore`); a job
    admitted beyond it computes its modulations at every call instead (same values, more weight reads).
    ``network``: makes the network-call object (``EagerNetwork``, or CUDA graphs' replaying one).
    """

    def __init__(self, transformer: XARTransformer, backend: Backend, max_rows: int,
                 defaults: tuple[int | Sequence[int], float],
                 finish: Callable[[Tensor, str], Any] | None = None,
                 check_output_type: Callable[[str], None] | None = None,
                 modulation_table_bytes: int = 256 * 2**20, network: NetworkFactory = EagerNetwork):
        if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1:
            raise InvalidArgumentError(f"max_rows must be a positive integer (the rows one network call may hold), "
                                       f"got {max_rows!r}")
        self.model = transformer
        self.backend = backend
        self.max_rows = max_rows
        self.defaults = defaults
        self._finish = finish
        self._check_output_type = check_output_type
        self.modulation_store = ModulationStore(transformer, modulation_table_bytes)
        config = transformer.config
        cache_bytes = 2 * config.num_layers * max_rows * config.seq_len * config.dim * transformer.dtype.itemsize
        require_memory(cache_bytes, transformer.device, f"a KV cache of {max_rows} rows", "pass a smaller max_rows")
        self.network = network(transformer, backend.ops, max_rows)
        self.scheduler = Scheduler(max_rows)
        self._wakeup = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._stepping = threading.Lock()  # one network call at a time, whichever thread runs it
        self.num_calls = 0
        self.num_rows = 0  # summed over calls

    # ---------------------------------------------------------------- submitting
    def check(self, request: GenerationRequest) -> tuple[GenerationRequest, SamplingSettings]:
        """``request`` with a seed drawn if it had none, and its settings with the model's defaults filled
        in. Raises ``ValueError`` naming a bad setting. ``submit`` runs it; a front end (xar-serve) runs
        it first to refuse a request before it queues."""
        if not isinstance(request, GenerationRequest):
            raise InvalidArgumentError(f"submit takes a GenerationRequest, got {type(request).__name__}")
        config = self.model.config
        resolve_class_labels(request.class_label, config.num_classes)
        seed = request.seed
        if seed is None:
            seed = secrets.randbits(63)
        elif isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
            raise InvalidArgumentError(f"seed must be an integer in [0, 2**64), got {seed!r}")
        if self._check_output_type is not None:  # the pipeline's own check, the one for its calls too
            self._check_output_type(request.output_type)
        elif request.output_type != "latent":
            raise InvalidArgumentError("this engine returns latents only: use output_type='latent'")
        steps, scale = self.defaults
        settings = SamplingSettings.build(
            config.num_cells, steps if request.num_inference_steps is None else request.num_inference_steps,
            scale if request.guidance_scale is None else request.guidance_scale, request.sampler or "sde",
            request.guidance_schedule or "linear", request.guidance_interval)
        return replace(request, seed=seed), settings

    def submit(self, request: GenerationRequest, on_cell: CellCallback | None = None) -> GenerationFuture:
        """Queue one image; returns its future. Thread-safe. Bad settings raise ``ValueError`` here.

        ``on_cell(index, latent)``: called from the engine's thread after each finished cell with the
        latent so far ([c, h, w], model scale; cells not made yet are zero), for previews.
        """
        request, settings = self.check(request)
        seed = request.seed
        label = resolve_class_labels(request.class_label, self.model.config.num_classes)
        future = GenerationFuture(seed)
        noise = NoiseSource([torch.Generator().manual_seed(seed)], 1, self.model.device)
        output_type = request.output_type

        def finish(latent: Tensor):
            return (latent if self._finish is None else self._finish(latent, output_type))[0]

        preview = None
        if on_cell is not None:
            def preview(index: int, cells: list[Tensor]) -> None:
                on_cell(index, self._partial_latent(cells)[0])

        self.add_job(torch.tensor(label, device=self.model.device), settings, noise, finish, future, on_cell=preview)
        return future

    def add_job(self, labels: Tensor, settings: SamplingSettings, noise: NoiseSource, finish: Callable[[Tensor], Any],
                future: Future | None = None, on_evaluation: Callable[[], None] | None = None,
                on_cell: Callable[[int, list[Tensor]], None] | None = None, on_step: StepHook | None = None) -> Future:
        """Queue ``len(labels)`` images sampled together from ``noise`` (one generator keeps the
        released draw order); ``finish(latent)`` makes the future's result. Thread-safe. ``on_cell``
        and ``on_step``: the sampler's hooks (``sampling.sample_image``), run in the engine's thread
        between network calls."""
        config = self.model.config
        plan = settings.plan(config.num_cells)
        sampler = sample_image(plan, noise, (config.tokens_per_cell, config.token_channels), config.grid_size,
                               config.cell_size, on_cell, on_step)
        job = Job(labels, plan, sampler, future or Future(), finish, on_evaluation)
        if job.num_slots > self.max_rows:
            raise InvalidArgumentError(f"{len(labels)} image(s) need {job.num_slots} rows (one per image and guidance "
                                       f"half), but this engine has max_rows={self.max_rows}: raise max_rows")
        self.scheduler.add(job)
        with self._wakeup:
            self._wakeup.notify()
        return job.future

    # ---------------------------------------------------------------- running
    def step(self) -> bool:
        """Admit what fits and run one network call. Returns whether any job is left."""
        with self._stepping, torch.inference_mode():
            jobs, admitted = self.scheduler.schedule()
            for job in admitted:
                self._start(job)
            jobs = [job for job in jobs if job.pending is not None]
            if jobs:
                try:
                    velocities = self._network_call(jobs)
                except Exception as error:  # e.g. out of memory: the jobs of this call fail, the engine goes on
                    for job in jobs:
                        self._fail(job, error)
                else:
                    self._advance(jobs, velocities)
            return self.scheduler.has_work()

    def run_until_idle(self) -> None:
        """Run network calls in this thread until every job has left."""
        while self.step():
            pass

    def _start(self, job: Job) -> None:
        try:
            job.table = self.modulation_store.add(self._row_labels(job), job.plan.modulation_times, self.backend.ops)
            job.row_labels = self._row_labels(job).tolist()  # once, not a device read at every call
            job.pending = next(job.sampler)
        except Exception as error:
            self._fail(job, error)

    def _row_labels(self, job: Job) -> Tensor:
        """The label of each of the job's rows: its images, then the null class for the unconditional half."""
        if not job.plan.guided:
            return job.labels
        return torch.cat([job.labels, torch.full_like(job.labels, self.model.null_class)])

    def _network_call(self, jobs: list[Job]) -> list[Tensor]:
        """One call for every job's pending evaluation; returns each job's velocities."""
        dtype = self.model.dtype
        slots, cells, labels, times, cell_rows, tokens, noisy = [], [], [], [], [], [], []
        for job in jobs:
            e, B = job.pending, job.batch_size
            row_labels = job.row_labels
            halves = 2 if e.both_halves else 1
            # Each chunk made once per job: both halves pass the same tensor.
            x = e.x.to(dtype)
            prefix = None if e.prefix is None else e.prefix.to(dtype)
            prefix_and_x = None
            for half in range(halves):
                # The unconditional half without guidance only adds the previous cell to its context.
                with_noisy = half == 0 or e.guide
                for b in range(B):
                    row = half * B + b
                    if e.prefix is not None:
                        slots.append(job.slots[row]), cells.append(e.cell - 1), labels.append(row_labels[row])
                        times.append(0.0), cell_rows.append((job, row))
                    if with_noisy:
                        noisy.append(len(slots))
                        slots.append(job.slots[row]), cells.append(e.cell), labels.append(row_labels[row])
                        times.append(e.t), cell_rows.append((job, row))
                if prefix is not None and with_noisy:  # [prefix 0, x 0, prefix 1, x 1, ...]
                    if prefix_and_x is None:
                        prefix_and_x = torch.stack([prefix, x], dim=1).flatten(0, 1)
                    tokens.append(prefix_and_x)
                else:
                    tokens.append(x if prefix is None else prefix)
        batch = CellBatch.build(slots, cells, labels, times, self.model.device)
        # Which outputs are velocities, and which cells read the modulation store (at which entries) or
        # compute theirs: the lists go to the device in one copy, and not at all where a view does (a
        # pipeline call's usual call).
        stored, entries, computed = [], [], []
        for i, (job, row) in enumerate(cell_rows):
            if job.table is None:
                computed.append(i)
            else:
                stored.append(i), entries.append(job.table.entry(row, times[i]))
        modulations = None if computed else self._store_view(entries)
        all_noisy = noisy == list(range(len(slots)))
        lists = {} if all_noisy else {"noisy": noisy}
        if modulations is None and entries:
            lists["entries"] = entries
            if computed:
                lists.update(stored=stored, computed=computed)
        on_device = dict(zip(lists, self._to_device(list(lists.values()))))
        if not all_noisy:
            noisy = on_device["noisy"]
        if modulations is None:
            modulations = self._modulations(batch, on_device)
        out = self.network(tokens, batch, modulations)
        self.num_calls += 1
        self.num_rows += len(set(slots))
        counts = [job.batch_size * (2 if job.pending.guide else 1) for job in jobs]
        return list((out if all_noisy else out[noisy]).split(counts))

    def _to_device(self, lists: list[list[int]]) -> list[Tensor]:
        """Integer lists on the model's device, in one copy."""
        if not lists:
            return []
        host = torch.tensor([i for values in lists for i in values], dtype=torch.long)
        return list(to_device(host, self.model.device).split([len(values) for values in lists]))

    def _store_view(self, entries: list[int]) -> Tensor | None:
        """The modulations [blocks, cells, 1, 6 * dim] as a view of the store, when the entries are evenly
        spaced (a pipeline call's rows at one time); else None."""
        step = entries[1] - entries[0] if len(entries) > 1 else 1
        if step < 1 or any(b - a != step for a, b in zip(entries, entries[1:])):
            return None
        return self.modulation_store.values[:, entries[0]:entries[-1] + 1:step].unsqueeze(2)

    def _modulations(self, batch: CellBatch, on_device: dict[str, Tensor]) -> Tensor:
        """[blocks, cells, 1, 6 * dim]: the cells ``stored`` (all, when absent) read from the store at
        ``entries``; the cells of jobs without entries (``computed``, all when there are no entries)
        computed now."""
        if "entries" not in on_device:
            return torch.stack(self.model.modulations(batch.labels, batch.times[:, None], self.backend.ops))
        stored = self.modulation_store.values[:, on_device["entries"]].unsqueeze(2)
        if "computed" not in on_device:
            return stored
        at = on_device["computed"]
        out = stored.new_empty(stored.shape[0], len(batch), *stored.shape[2:])
        out[:, on_device["stored"]] = stored
        out[:, at] = torch.stack(self.model.modulations(batch.labels[at], batch.times[at, None], self.backend.ops))
        return out

    def _advance(self, jobs: list[Job], velocities: list[Tensor]) -> None:
        """Step every job's sampler with its velocities: their state updates run together, one
        ``flow_step`` per kind of update (``sampling.apply_updates``)."""
        try:
            results = apply_updates([job.pending.update for job in jobs], velocities, self.backend.flow_step)
        except Exception as error:
            for job in jobs:
                self._fail(job, error)
            return
        for job, result in zip(jobs, results):
            if job.on_evaluation is not None:
                job.on_evaluation()
            try:
                job.pending = job.sampler.send(result)
            except StopIteration as finished:
                job.pending = None
                self._complete(job, finished.value)
            except Exception as error:
                self._fail(job, error)

    def _complete(self, job: Job, latent: Tensor) -> None:
        self._leave(job)
        try:
            result = job.finish(latent)
        except Exception as error:
            self._settle(job.future, error=error)
        else:
            self._settle(job.future, result=result)

    def _fail(self, job: Job, error: BaseException) -> None:
        job.pending = None
        self._leave(job)
        self._settle(job.future, error=error)

    def _leave(self, job: Job) -> None:
        if job in self.scheduler.running:
            self.scheduler.release(job)
        if job.table is not None:
            self.modulation_store.remove(job.table)
            job.table = None
        job.sampler.close()

    @staticmethod
    def _settle(future: Future, result: Any = None, error: BaseException | None = None) -> None:
        try:
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)
        except InvalidStateError:  # cancelled meanwhile: nobody wants the result
            pass

    def _partial_latent(self, cells: list[Tensor]) -> Tensor:
        return cells_to_latent(cells, self.model.config.grid_size, self.model.config.cell_size)

    # ---------------------------------------------------------------- the background thread
    def start(self) -> "Engine":
        """Run network calls in a background thread whenever there is work."""
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="xar-engine", daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        while True:
            with self._wakeup:
                self._wakeup.wait_for(lambda: self._stopping or self.scheduler.has_work())
                if self._stopping:
                    return
            try:
                self.step()
            except Exception as error:  # a bug outside any one job's work: fail what runs, keep serving
                with self._stepping:
                    for job in list(self.scheduler.running):
                        self._fail(job, error)

    def shutdown(self, wait: bool = True) -> None:
        """Stop the background thread. ``wait``: finish every queued request first; otherwise they
        are cancelled."""
        if self._thread is not None and wait:
            while self.scheduler.has_work() and self._thread.is_alive():
                with self._wakeup:
                    self._wakeup.wait(0.01)
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._stepping:
            for job in self.scheduler.drain():
                job.future.cancel() or self._settle(job.future, error=RuntimeError("the engine was shut down"))
                if job.table is not None:
                    self.modulation_store.remove(job.table)
                    job.table = None

    def __enter__(self) -> "Engine":
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.shutdown(wait=exc_type is None)


def generate_latents(model: XARTransformer, labels: Tensor, settings: SamplingSettings, noise: NoiseSource,
                     backend: Backend, on_evaluation: Callable[[], None] | None = None,
                     network: NetworkFactory = EagerNetwork, on_step: StepHook | None = None) -> Tensor:
    """The latent [B, c, grid, grid] (model scale) of ``labels``, generated as one job on an engine of
    its size, in this thread: the network calls of lockstep sampling, with the released draw order
    when ``noise`` has one generator. ``on_step``: the sampler's hook after each evaluation
    (``sampling.sample_image``), which may replace its state or stop it."""
    rows = len(labels) * (2 if settings.plan(model.config.num_cells).guided else 1)
    engine = Engine(model, backend, rows, (settings.steps_per_cell, settings.guidance_scale), network=network)
    future = engine.add_job(labels, settings, noise, finish=lambda latent: latent, on_evaluation=on_evaluation,
                            on_step=on_step)
    engine.run_until_idle()
    return future.result()
