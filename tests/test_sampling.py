"""Samplers: time grids, guidance schedule, evaluation protocol, seeds, ODE convergence; the engine's
generation against the released sampler written as a plain loop."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from xar_infer.backends import TORCH
from xar_infer.engine import Engine, generate_latents
from xar_infer.sampling import NoiseSource, apply_updates, sample_image
from xar_infer.settings import SamplingSettings, cell_guidance_scales, evaluations_per_cell, sde_time_grid

from conftest import random_transformer
from cpu_threads import one_torch_thread  # noqa: F401  (autouse: this module runs on one thread)
from test_model import released_call


@pytest.fixture(scope="module")
def model64():
    # float64: two computations that should agree then do so to ~1e-12, so comparisons are sharp.
    return random_transformer().double()


def _generate(model, labels, steps=4, scale=2.0, seed=0, **kwargs):
    """The latents of one job on an engine of its size (``engine.generate_latents``), torch backend."""
    generator = kwargs.pop("generator", torch.Generator().manual_seed(seed))
    labels = torch.tensor(labels)
    settings = SamplingSettings.build(model.config.num_cells, steps, scale, **kwargs)
    return generate_latents(model, labels, settings, NoiseSource(generator, len(labels), torch.device("cpu")), TORCH)


def test_sde_time_grid():
    grid = sde_time_grid(40)
    assert len(grid) == 41 and grid.dtype == torch.float64
    assert grid[0] == 1.0 and grid[-2] == pytest.approx(0.04) and grid[-1] == 0.0
    assert torch.all(grid[1:] < grid[:-1])
    assert sde_time_grid(1).tolist() == [1.0, 0.0]
    assert sde_time_grid(2).tolist() == pytest.approx([1.0, 0.04, 0.0])


def test_guidance_schedules():
    assert cell_guidance_scales(2.5, 4, "linear") == pytest.approx([1.0, 1.5, 2.0, 2.5])
    assert cell_guidance_scales(2.5, 4, "constant") == [2.5] * 4
    assert cell_guidance_scales(3.0, 1, "linear") == [3.0]
    # An unknown schedule is refused where settings are built (test_settings.py).


class CallRecorder:
    """Forward pre-hook noting each network call's cells: (noisy cells, previous cells run clean at t=0
    to become context). A noisy cell is never evaluated at t=0: the samplers stop before it."""

    def __init__(self, model):
        self.calls = []
        self.batches = []
        self.handle = model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        batch = args[1] if len(args) > 1 else kwargs["batch"]
        self.batches.append(batch)
        self.calls.append((int((batch.times > 0).sum()), int((batch.times == 0).sum())))

    def first_calls(self) -> list[int]:
        """The calls that run previous cells clean."""
        return [i for i, (_, clean) in enumerate(self.calls) if clean]


@pytest.mark.parametrize("sampler, steps", [("sde", 1), ("sde", 2), ("sde", 5), ("euler", 1), ("heun", 1), ("heun", 3)])
def test_each_cell_commits_the_previous_one_exactly_once(model64, sampler, steps):
    """Any step count works: only the first call of cells 1..3 runs (and caches) the previous cell,
    for both guidance halves, in the row of the cell it precedes."""
    recorder = CallRecorder(model64)
    try:
        latent = _generate(model64, [1, 2], steps=steps, sampler=sampler)
    finally:
        recorder.handle.remove()
    per_cell = evaluations_per_cell(sampler, steps)
    cells = model64.config.num_cells
    assert len(recorder.calls) == cells * per_cell
    assert recorder.first_calls() == [per_cell * s for s in range(1, cells)]
    for s in range(1, cells):
        batch = recorder.batches[per_cell * s]
        clean = batch.times == 0
        assert clean.sum() == 4 and set(batch.cells[clean].tolist()) == {s - 1}
        assert set(batch.cells[~clean].tolist()) == {s}
        assert torch.equal(batch.row_starts[~clean] + 1, torch.nonzero(~clean).flatten())  # [clean ; noisy] rows
    # Guidance doubles the noisy cells, except in the first cell (scale 1 under the linear schedule),
    # whose unconditional half would be discarded.
    assert [noisy for noisy, _ in recorder.calls] == [2] * per_cell + [4] * (cells - 1) * per_cell
    assert torch.isfinite(latent).all() and latent.shape == (2, 16, 16, 16)


def test_without_guidance_the_batch_is_not_doubled(model64):
    recorder = CallRecorder(model64)
    try:
        _generate(model64, [1, 2], scale=1.0)
    finally:
        recorder.handle.remove()
    assert {noisy for noisy, _ in recorder.calls} == {2}
    assert {clean for _, clean in recorder.calls} == {0, 2}
    assert {batch.slots.max().item() for batch in recorder.batches} == {1}  # two slots: no unconditional half


def test_linear_guidance_leaves_the_first_cell_alone(model64):
    """Cell 0 has scale 1 under the released schedule: guidance changes cells 1..3 only (the noise
    draws do not depend on guidance, so cell 0 is the same computation)."""
    plain, guided = _generate(model64, [5], scale=1.0), _generate(model64, [5], scale=3.0)
    # the latent is [B, C, 16, 16]; cell 0 is its top-left 8x8 block, cell 1 the top-right one
    assert torch.allclose(plain[..., :8, :8], guided[..., :8, :8], rtol=0, atol=1e-9)
    assert (plain[..., :8, 8:] - guided[..., :8, 8:]).abs().max() > 1e-3


def test_per_image_generators_make_images_independent_of_the_batch(model64):
    alone = [_generate(model64, [c], generator=[torch.Generator().manual_seed(s)]) for c, s in ((7, 11), (8, 12), (9, 13))]
    batch = _generate(model64, [7, 8, 9], generator=[torch.Generator().manual_seed(s) for s in (11, 12, 13)])
    swapped = _generate(model64, [9, 7], generator=[torch.Generator().manual_seed(s) for s in (13, 11)])
    for i in range(3):
        assert torch.allclose(batch[i], alone[i][0], rtol=0, atol=1e-9)
    assert torch.allclose(swapped[0], alone[2][0], rtol=0, atol=1e-9)
    assert torch.allclose(swapped[1], alone[0][0], rtol=0, atol=1e-9)


def test_single_generator_is_shared_across_the_batch(model64):
    """One generator draws for the whole batch at once (the released order): reproducible, and two
    images of the same class get different noise."""
    pair = _generate(model64, [7, 7], seed=3)
    assert torch.equal(pair, _generate(model64, [7, 7], seed=3))
    assert (pair[0] - pair[1]).abs().max() > 1e-3


def test_generator_count_must_match(model64):
    with pytest.raises(ValueError, match="got 1 generators for 2 images"):
        _generate(model64, [1, 2], generator=[torch.Generator()])


@pytest.fixture(scope="module")
def smooth_model64():
    """Weights 4x smaller than `random_transformer`'s: a smooth velocity field, where integration orders
    show (with the full-size random weights the cell-to-cell dynamics are too stiff for that)."""
    model = random_transformer().double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith(("_ln.weight", "_norm.weight")):
                p.mul_(0.25)
    return model


def test_ode_samplers_converge(smooth_model64):
    """Heun with few steps matches Euler with many more. The reference is Euler extrapolated
    (Richardson: 2 E(200) - E(100) cancels Euler's first-order error term), 300 evaluations per cell;
    it is within 3.9e-5 of Heun at 800 steps, 6x below the smallest error measured against it.
    Measured errors: Heun 10/20/40 steps 2.3e-3/6.6e-4/2.4e-4 (3.4x per halving from 10 to 20 steps,
    not quite 4x because the network sees time as floor(1000 t), piecewise constant), Euler 19/39
    steps 1.07e-2/5.1e-3 (2.1x: first order), on outputs of size ~4.5."""
    def generate(steps, sampler):
        return _generate(smooth_model64, [4], steps=steps, sampler=sampler)

    reference = 2 * generate(200, "euler") - generate(100, "euler")

    def error(steps, sampler):
        return (generate(steps, sampler) - reference).abs().max().item()

    heun = {n: error(n, "heun") for n in (10, 20, 40)}
    euler = {n: error(2 * n - 1, "euler") for n in (10, 20)}  # the same number of evaluations as Heun n
    assert heun[40] < 5e-4
    assert heun[20] < heun[10] / 3  # more than Euler's 2x per halving: second order
    assert euler[20] < euler[10] / 1.8  # ~2x per halving: first order
    assert heun[20] < euler[20] / 5


def test_unknown_sampler(model64):
    with pytest.raises(ValueError, match=r"sampler must be one of \('sde', 'euler', 'heun'\), got 'ddim'"):
        _generate(model64, [1], sampler="ddim")


def test_sample_image_asks_for_the_released_evaluations():
    """The generator protocol on its own, fed zero velocities: per cell, its step count's evaluations
    at the grid's times; the previous finished cell on a cell's first evaluation; both halves where
    the cell's scale exceeds 1 inside the guidance interval, and on a first evaluation once any cell
    guides (the unconditional half's context)."""
    plan = SamplingSettings.build(4, [2, 1, 3, 1], 2.5, guidance_interval=(0.5, 1.0)).plan(4)
    noise = NoiseSource(torch.Generator().manual_seed(0), 2, torch.device("cpu"))
    finished = []
    sampler = sample_image(plan, noise, (4, 3), grid_size=4, cell_size=2,
                           on_cell=lambda index, cells: finished.append(cells[-1].clone()))
    seen, evaluation = [], next(sampler)
    try:
        while True:
            if evaluation.prefix is not None:
                assert torch.equal(evaluation.prefix, finished[evaluation.cell - 1])
            seen.append((evaluation.cell, round(evaluation.t, 6), evaluation.prefix is not None, evaluation.guide,
                         evaluation.both_halves))
            assert evaluation.x.shape == (2, 4, 3) and evaluation.x.dtype == torch.float64
            velocity = torch.zeros(4 if evaluation.guide else 2, 4, 3, dtype=torch.float64)
            evaluation = sampler.send(apply_updates([evaluation.update], [velocity])[0])
    except StopIteration as done:
        latent = done.value
    assert seen == [(0, 1.0, False, False, False), (0, 0.04, False, False, False),  # scale 1: never guides
                    (1, 1.0, True, True, True),
                    (2, 1.0, True, True, True), (2, 0.52, False, True, True),
                    (2, 0.04, False, False, False),  # outside the interval
                    (3, 1.0, True, True, True)]
    assert latent.shape == (2, 3, 4, 4) and len(finished) == 4


def test_latent_token_layout_round_trip():
    from xar_infer.sampling import latent_to_tokens, tokens_to_latent

    latent = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    tokens = latent_to_tokens(latent, cell_size=4)
    # token 0..15 are the top-left 4x4 cell in raster order; token 16 starts the top-right cell
    assert tokens[0, 1, 0] == latent[0, 0, 0, 1] and tokens[0, 4, 0] == latent[0, 0, 1, 0]
    assert tokens[0, 16, 0] == latent[0, 0, 0, 4] and tokens[0, 32, 0] == latent[0, 0, 4, 0]
    assert torch.equal(tokens_to_latent(tokens, 8, 4), latent)


# ---- the engine against the released protocol, written plainly ------------------------------------

def released_protocol(model, labels, steps_per_cell, scale, seeds, interval=(0.0, 1.0)):
    """The released SDE sampler as a loop: every call on the doubled batch (slot i for image i's
    conditional half, B + i for its unconditional one), the modulations computed inside each call,
    guidance applied after the fact (only at times inside ``interval``)."""
    from xar_infer.sampling import sde_drift, tokens_to_latent

    config, B = model.config, len(labels)
    noise = NoiseSource([torch.Generator().manual_seed(s) for s in seeds], B, torch.device("cpu"))
    both = torch.cat([labels, torch.full_like(labels, model.null_class)])
    cache = model.new_cache(2 * B)
    cells = []
    for s, (n, cell_scale) in enumerate(zip(steps_per_cell, cell_guidance_scales(scale, config.num_cells))):
        x = noise.randn((config.tokens_per_cell, config.token_channels), torch.float32).double()
        grid = sde_time_grid(n)
        for i in range(n):
            t, dt = grid[i], grid[i + 1] - grid[i]
            eps = None if i == n - 1 else noise.randn(x.shape[1:], x.dtype)
            prefix = torch.cat([cells[-1]] * 2).double() if i == 0 and cells else None
            v = released_call(model, cache, torch.cat([x, x]), both, float(t), cell=s, prefix=prefix)
            cond, uncond = (sde_drift(half, x, t) for half in v.double().chunk(2))
            drift = uncond + cell_scale * (cond - uncond) if cell_scale > 1 and interval[0] <= t <= interval[1] else cond
            x = x + dt * drift if eps is None else x + drift * dt + torch.sqrt(2 * t) * (eps * torch.sqrt(dt.abs()))
        cells.append(x.float())
    return tokens_to_latent(torch.cat(cells, dim=1), config.grid_size, config.cell_size)


def _engine(model, labels, steps, scale, seeds, **kwargs):
    return _generate(model, labels, steps, scale, generator=[torch.Generator().manual_seed(s) for s in seeds], **kwargs)


@pytest.mark.parametrize("table", [True, False])
def test_engine_equals_the_released_protocol(model64, table):
    """Skipping the first cell's unconditional half and precomputing the modulations (or not: a job
    beyond the engine's table memory computes them at every call) change nothing: float64 agreement
    to rounding."""
    reference = released_protocol(model64, torch.tensor([3, 4]), [3] * 4, 2.5, seeds=(1, 2))
    settings = SamplingSettings.build(4, 3, 2.5)
    noise = NoiseSource([torch.Generator().manual_seed(s) for s in (1, 2)], 2, torch.device("cpu"))
    engine = Engine(model64, TORCH, 4, (3, 2.5), modulation_table_bytes=256 * 2**20 if table else 0)
    future = engine.add_job(torch.tensor([3, 4]), settings, noise, finish=lambda latent: latent)
    computed = []  # time embeddings: one per computation of modulations
    hook = model64.time_embed.register_forward_hook(lambda *args: computed.append(1))
    try:
        engine.run_until_idle()
    finally:
        hook.remove()
    assert (future.result() - reference).abs().max().item() < 1e-10
    assert len(computed) == (1 if table else engine.num_calls)  # the table once, or at every call


def test_per_cell_step_counts(model64):
    """Opt-in: one step count per cell. Each cell takes its own number of calls, the first of cells
    1..3 caching the previous cell, and the result is the released loop run with those counts."""
    recorder = CallRecorder(model64)
    try:
        latent = _engine(model64, [3, 4], [4, 3, 2, 1], 2.5, seeds=(1, 2))
    finally:
        recorder.handle.remove()
    assert recorder.first_calls() == [4, 7, 9]
    assert len(recorder.calls) == 10
    reference = released_protocol(model64, torch.tensor([3, 4]), [4, 3, 2, 1], 2.5, seeds=(1, 2))
    assert (latent - reference).abs().max().item() < 1e-10
    with pytest.raises(ValueError, match=r"a list of 4 of them \(one per cell\): \[4, 3\] gives 2 counts"):
        _engine(model64, [3], [4, 3], 2.5, seeds=(1,))


def test_guidance_interval(model64):
    """Opt-in: guidance only at flow times inside the interval; the other calls run the conditional
    half alone, except that a cell's first call caches the previous cell for both halves (the
    unconditional half then runs only that clean cell, not the noisy one it would not use)."""
    interval = (0.3, 0.7)
    recorder = CallRecorder(model64)
    try:
        latent = _engine(model64, [3, 4], 5, 2.5, seeds=(1, 2), guidance_interval=interval)
    finally:
        recorder.handle.remove()
    times = sde_time_grid(5)[:5].tolist()  # 1.0, 0.76, 0.52, 0.28, 0.04: only 0.52 is inside
    expected = [2] * 5 + [4 if interval[0] <= t <= interval[1] else 2 for t in times] * 3
    assert [noisy for noisy, _ in recorder.calls] == expected
    assert [clean for _, clean in recorder.calls] == ([0] * 5 + [4] + [0] * 4) + ([4] + [0] * 4) * 2
    reference = released_protocol(model64, torch.tensor([3, 4]), [5] * 4, 2.5, seeds=(1, 2), interval=interval)
    assert (latent - reference).abs().max().item() < 1e-10
    full = _engine(model64, [3, 4], 5, 2.5, seeds=(1, 2), guidance_interval=(0.0, 1.0))
    assert torch.equal(full, _engine(model64, [3, 4], 5, 2.5, seeds=(1, 2)))
    assert (full - latent).abs().max().item() > 1e-3


def test_apply_updates_steps_each_kind_once_and_each_update_as_alone():
    """The engine's sampler step for many jobs: one ``flow_step`` per kind of update (rule, guided,
    noisy, returning the guided velocity), on rows at different times, and each update's result equal
    to the bit to its own ``flow_step``."""
    from xar_infer.sampling import StateUpdate, StepTimes, flow_step
    from xar_infer.settings import ode_time_grid

    g = torch.Generator().manual_seed(0)
    sde, ode = (StepTimes(grid, torch.device("cpu"), torch.float64) for grid in (sde_time_grid(5), ode_time_grid(4)))

    def update(rule, step, batch, guided=False, noisy=False, heun=False, return_guided=False):
        times = sde if rule == "sde" else ode
        x = torch.randn(batch, 4, 3, generator=g, dtype=torch.float64)
        return StateUpdate(rule, x, times.t[step], times.dt[step],
                           scales=torch.tensor([2.5, 1.0, 3.0][:batch], dtype=torch.float64) if guided else None,
                           noise=torch.randn(batch, 4, 3, generator=g, dtype=torch.float64) if noisy else None,
                           previous=torch.randn(batch, 4, 3, generator=g, dtype=torch.float64) if heun else None,
                           return_guided=return_guided)

    updates = [update("sde", 0, 1, guided=True, noisy=True), update("sde", 3, 2, noisy=True),
               update("sde", 2, 3, guided=True, noisy=True), update("sde", 4, 1), update("euler", 1, 2, guided=True),
               update("sde", 1, 2, noisy=True), update("heun", 2, 1, heun=True), update("euler", 0, 1, guided=True),
               update("euler", 3, 2, return_guided=True), update("heun", 0, 2, heun=True), update("sde", 4, 2)]
    velocities = [torch.randn((2 if u.scales is not None else 1) * len(u.x), 4, 3, generator=g) for u in updates]
    calls = []

    def counted(*args, **kwargs):
        calls.append(args[0])
        return flow_step(*args, **kwargs)

    results = apply_updates(updates, velocities, counted)
    assert sorted(calls) == ["euler", "euler", "heun", "sde", "sde", "sde"]  # six kinds among eleven updates
    for u, v, result in zip(updates, velocities, results):
        alone = flow_step(u.rule, u.x, v, u.t, u.dt, u.scales, noise=u.noise, previous=u.previous,
                          return_guided=u.return_guided)
        for got, expected in zip(*((r,) if isinstance(r, Tensor) else r for r in (result, alone))):
            assert torch.equal(got, expected)
