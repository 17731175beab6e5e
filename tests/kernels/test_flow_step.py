"""The sampler's state update (kernels/flow_step.py) against the PyTorch reference ``sampling.flow_step``.

On a machine without a GPU (CI) it runs through Triton's interpreter (conftest sets ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")  # a Linux dependency; the rest of the package works without it

from xar_infer.kernels import flow_step  # noqa: E402
from xar_infer.sampling import flow_step as torch_flow_step  # noqa: E402

from conftest import TRITON_DEVICE as DEVICE  # noqa: E402
from cpu_threads import one_torch_thread  # noqa: E402, F401  (autouse: this module runs on one thread)


# flow_step: the same operations in the same order as the reference, in the state's dtype. The
# interpreter evaluates them exactly like PyTorch (equal to the last bit here); compiled for a GPU,
# Triton may contract a multiply-add into one FMA, which changes a result by up to an ulp per
# operation. The tolerances allow a few ulps at the state's magnitude (~10): 1e-12 (fp64), 5e-6 (fp32).
STEP_TOL = {torch.float64: 1e-12, torch.float32: 5e-6}


# A step grid like the released sampler's: 1 to 0.04, then 0.
TIMES = torch.cat([torch.linspace(1.0, 0.04, 7, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])


def _step_inputs(rows, row_shape, dtype, guided, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, *row_shape, generator=g, dtype=dtype)
    v = torch.randn((2 if guided else 1) * rows, *row_shape, generator=g).to(torch.float32)
    # Per-row scales: one <= 1 (conditional velocity untouched), one exactly 1, others guided.
    scales = torch.tensor([2.5, 1.0, 0.5, 3.75, 1.5][:rows] + [2.0] * max(0, rows - 5), dtype=dtype) if guided else None
    noise = torch.randn(rows, *row_shape, generator=g, dtype=dtype)
    return [t.to(DEVICE) if t is not None else None for t in (x, v, scales, noise)]


def _times(steps, dtype):
    """(t, dt) at grid step ``steps``: an int gives one 0-d time for all rows, a list one per row."""
    times = TIMES.to(dtype)
    t, dt = times[:-1], times[1:] - times[:-1]
    index = torch.tensor(steps)
    return t[index].to(DEVICE), dt[index].to(DEVICE)


def _rule_inputs(rule, noisy, noise, x) -> dict:
    """The keyword inputs a rule takes: the noise of a noisy step, Heun's previous velocity."""
    return {"noise": noise if noisy else None, **({"previous": torch.randn_like(x)} if rule == "heun" else {})}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("rows, row_shape", [(1, (64, 16)), (3, (64, 16)), (5, (7, 3))])
@pytest.mark.parametrize("guided", [True, False])
@pytest.mark.parametrize("rule, noisy, step", [("sde", True, 0), ("sde", True, 3), ("sde", False, 6), ("euler", False, 2), ("heun", False, 4)])
def test_flow_step_matches_reference(dtype, rows, row_shape, guided, rule, noisy, step):
    x, v, scales, noise = _step_inputs(rows, row_shape, dtype, guided)
    kwargs = _rule_inputs(rule, noisy, noise, x)
    t, dt = _times(step, dtype)
    out = flow_step(rule, x, v, t, dt, scales, **kwargs)
    expected = torch_flow_step(rule, x, v, t, dt, scales, **kwargs)
    assert out.dtype == dtype and out.shape == x.shape
    assert (out - expected).abs().max().item() <= STEP_TOL[dtype]
    assert not torch.equal(out, x)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("guided", [True, False])
@pytest.mark.parametrize("rule, noisy", [("sde", True), ("sde", False), ("euler", False), ("heun", False)])
def test_flow_step_per_row_times(dtype, guided, rule, noisy):
    """Rows of different jobs step together, each at its own t and dt (the first and the last steps of
    the grid among them). Each row matches the reference with that row's time given to all rows, and
    the reference's per-row result equals its one-time result to the bit (it is elementwise)."""
    steps = [0, 5, 2, 6, 3]
    x, v, scales, noise = _step_inputs(len(steps), (7, 3), dtype, guided)
    kwargs = _rule_inputs(rule, noisy, noise, x)
    t, dt = _times(steps, dtype)
    out = flow_step(rule, x, v, t, dt, scales, **kwargs)
    expected = torch_flow_step(rule, x, v, t, dt, scales, **kwargs)
    assert (out - expected).abs().max().item() <= STEP_TOL[dtype]
    for row, step in enumerate(steps):
        alone = torch_flow_step(rule, x, v, *_times(step, dtype), scales, **kwargs)
        assert torch.equal(expected[row], alone[row])
        assert (out[row] - alone[row]).abs().max().item() <= STEP_TOL[dtype]
        other = 0 if step == 6 else 6  # the last step is the one with another dt (and t)
        assert not torch.equal(expected[row], torch_flow_step(rule, x, v, *_times(other, dtype), scales, **kwargs)[row])


@pytest.mark.parametrize("guided", [True, False])
def test_flow_step_euler_returns_the_guided_velocity(guided):
    x, v, scales, _ = _step_inputs(3, (64, 16), torch.float64, guided)
    t, dt = _times([1, 4, 0], torch.float64)
    out, guided_v = flow_step("euler", x, v, t, dt, scales, return_guided=True)
    expected_out, expected_v = torch_flow_step("euler", x, v, t, dt, scales, return_guided=True)
    assert (out - expected_out).abs().max().item() <= STEP_TOL[torch.float64]
    assert (guided_v - expected_v).abs().max().item() <= STEP_TOL[torch.float64]
    if guided:  # the row with scale 1 and the one with 0.5 keep their conditional velocity bit for bit
        assert torch.equal(guided_v[1:3], v[1:3].double())


def test_flow_step_philox_noise():
    """In-kernel noise: reproducible for a seed and offset, different otherwise, and standard normal
    (recovered from the update with guidance off: x' = x + drift dt + sqrt(2t |dt|) eps)."""
    x, v, _, _ = _step_inputs(4, (64, 16), torch.float64, guided=False)
    t, dt = _times(2, torch.float64)
    first = flow_step("sde", x, v, t, dt, philox_seed=1234)
    assert torch.equal(first, flow_step("sde", x, v, t, dt, philox_seed=1234))
    assert not torch.equal(first, flow_step("sde", x, v, t, dt, philox_seed=1235))
    assert not torch.equal(first, flow_step("sde", x, v, t, dt, philox_seed=1234, philox_offset=x.numel()))
    noiseless = torch_flow_step("sde", x, v, t, dt, noise=torch.zeros_like(x))
    eps = (first - noiseless) / (torch.sqrt(2 * t) * torch.sqrt(dt.abs()))
    n = eps.numel()  # 4096 draws: the mean's standard error is 0.016, the std's about 0.011
    assert abs(eps.mean().item()) < 5 / n ** 0.5
    assert abs(eps.std().item() - 1) < 5 / (2 * n) ** 0.5


def test_flow_step_rejects_bad_inputs():
    x, v, scales, noise = _step_inputs(3, (64, 16), torch.float64, guided=True)
    t, dt = _times(0, torch.float64)
    with pytest.raises(ValueError, match="unknown rule"):
        flow_step("rk4", x, v, t, dt, scales)
    with pytest.raises(ValueError, match="does not fit"):
        flow_step("euler", x, v[:3], t, dt, scales)
    with pytest.raises(ValueError, match="needs previous"):
        flow_step("heun", x, v, t, dt, scales)
    with pytest.raises(ValueError, match=r"dt must be one torch.float64 value or one per row \[3\]"):
        flow_step("euler", x, v, t, dt.expand(2), scales)
    with pytest.raises(ValueError, match="t must be one torch.float64 value"):
        flow_step("euler", x, v, t.float(), dt, scales)
    with pytest.raises(ValueError, match="only used by the 'sde'"):
        flow_step("euler", x, v, t, dt, scales, noise=noise)
