"""CUDA graphs of the network calls: the same latents as eager calls, graphs reused only when valid.

Without a GPU the graphs run with ``capture=False``: the same static buffers, cache and bookkeeping,
each "replay" running the captured function eagerly. What only a capture can break (a host sync, a
host-to-device copy) is checked on the meta device; the real captures run in the CUDA tests.
"""

from __future__ import annotations

import threading

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import xar_infer.backends
import xar_infer.sampling
from xar_infer.backends import resolve_backend
from xar_infer.cuda_graphs import CUDAGraphs
from xar_infer.model import TORCH_OPS
from xar_infer.sampling import NoiseSource, generate_tokens, modulation_times

from conftest import random_transformer

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _generate(model, labels, steps=3, scale=2.5, seeds=(1, 2, 3), cuda_graphs=None, **kwargs):
    device = model.z_proj.weight.device
    generators = [torch.Generator(device).manual_seed(s) for s in seeds[:len(labels)]]
    return generate_tokens(model, torch.tensor(labels, device=device), steps, scale,
                           NoiseSource(generators, len(labels), device), cuda_graphs=cuda_graphs, **kwargs)


@pytest.fixture(scope="module")
def model():
    return random_transformer()


@pytest.mark.parametrize("kwargs", [
    {},
    {"sampler": "heun"},
    {"sampler": "euler", "guidance_schedule": "constant"},
    {"guidance_interval": (0.3, 0.7), "steps": [4, 3, 2, 2]},
    {"scale": 1.0},
], ids=["sde", "heun", "euler-constant", "interval-per-cell-steps", "unguided"])
@pytest.mark.parametrize("table", [True, False], ids=["table", "no-table"])
def test_graphed_calls_give_the_eager_latents_exactly(model, monkeypatch, kwargs, table):
    """The same kernels on the same values: equal bit for bit, with and without the modulation table."""
    if not table:
        monkeypatch.setattr(xar_infer.sampling, "MODULATION_TABLE_BYTES", 0)
    graphs = CUDAGraphs(capture=False)
    eager = _generate(model, [3, 4], **kwargs)
    assert torch.equal(_generate(model, [3, 4], cuda_graphs=graphs, **kwargs), eager)
    assert (graphs._calls.table is not None) == table


def test_one_graph_per_kind_of_call(model):
    """Linear guidance over 4 cells: cell 0 runs the conditional rows alone; cells 1-3 each have a
    first call (caching the previous cell) and later calls, all on both halves: 7 kinds."""
    graphs = CUDAGraphs(capture=False)
    _generate(model, [3, 4], steps=5, cuda_graphs=graphs)
    T = model.config.tokens_per_cell
    # (rows, caches the previous cell, cache length before the call)
    assert sorted(graphs._calls.graphs) == [(2, False, 0), (4, False, T), (4, False, 2 * T), (4, False, 3 * T),
                                            (4, True, 0), (4, True, T), (4, True, 2 * T)]


def test_graphs_are_reused_for_new_labels_and_seeds_and_rebuilt_otherwise(model):
    graphs = CUDAGraphs(capture=False)
    _generate(model, [3, 4], cuda_graphs=graphs)
    first = graphs._calls
    captured = dict(first.graphs)

    # New labels (new modulation table rows) and seeds: every graph is reused, the latents still exact.
    latent = _generate(model, [7, 1], seeds=(5, 6), cuda_graphs=graphs)
    assert graphs._calls is first and graphs._calls.graphs == captured
    assert torch.equal(latent, _generate(model, [7, 1], seeds=(5, 6)))

    # Another batch size, step count or dtype of the model: new buffers and graphs.
    for labels, steps in (([3, 4, 5], 3), ([3, 4], 4)):
        latent = _generate(model, labels, steps=steps, cuda_graphs=graphs)
        assert graphs._calls is not first
        assert torch.equal(latent, _generate(model, labels, steps=steps))
        first = graphs._calls
    double = random_transformer().double()
    latent = _generate(double, [3, 4], steps=4, cuda_graphs=graphs)
    assert graphs._calls is not first and graphs._calls.x.dtype == torch.float64
    assert torch.equal(latent, _generate(double, [3, 4], steps=4))

    graphs.reset()
    assert graphs.num_graphs == 0


def test_a_failed_call_drops_the_graphs(model):
    graphs = CUDAGraphs(capture=False)
    _generate(model, [3, 4], cuda_graphs=graphs)

    def interrupt():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _generate(model, [3, 4], cuda_graphs=graphs, on_evaluation=interrupt)
    assert graphs.num_graphs == 0
    assert torch.equal(_generate(model, [3, 4], cuda_graphs=graphs), _generate(model, [3, 4]))


def test_threads_sharing_graphs_take_turns(model):
    """Two threads on one set of graphs would write the same buffers: the second waits for the first."""
    graphs = CUDAGraphs(capture=False)
    labels = {0: [3, 4], 1: [8, 9]}
    results = {}

    def run(i):
        results[i] = _generate(model, labels[i], seeds=(i, i + 1), cuda_graphs=graphs)

    threads = [threading.Thread(target=run, args=(i,)) for i in labels]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for i in labels:
        assert torch.equal(results[i], _generate(model, labels[i], seeds=(i, i + 1)))


class HostTraffic(TorchDispatchMode):
    """Notes every op that reads a value back to the host or takes a tensor from off the device."""

    def __init__(self, device: str):
        super().__init__()
        self.device, self.found = device, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        tensors = [a for a in tree_leaves((args, kwargs or {})) if isinstance(a, torch.Tensor)]
        if func is torch.ops.aten._local_scalar_dense.default or any(t.device.type != self.device for t in tensors):
            self.found.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("table", [True, False], ids=["table", "no-table"])
def test_a_graphed_call_needs_nothing_from_the_host(monkeypatch, table):
    """A CUDA graph cannot capture a sync (``.item()``) or a copy from host memory. On the meta device
    any tensor made on the host shows up as a CPU tensor, and reading a value back fails."""
    if not table:
        monkeypatch.setattr(xar_infer.sampling, "MODULATION_TABLE_BYTES", 0)
    model = random_transformer().to("meta")
    config = model.config
    labels = torch.tensor([1, 2, 10, 10], device="meta")
    times = modulation_times("sde", [3] * 4)
    x = torch.zeros(2, config.tokens_per_cell, config.token_channels, dtype=torch.float64, device="meta")
    prefix = torch.zeros(2, config.tokens_per_cell, config.token_channels, device="meta")
    with torch.no_grad(), CUDAGraphs(capture=False).session(model, labels, times, TORCH_OPS) as calls:
        watch = HostTraffic("meta")
        with watch:
            calls(x, times[-1], 2, None)
            calls(x, times[-1], 4, prefix)
            calls(x, times[-2], 4, None)
    assert len(calls.graphs) == 3 and watch.found == []


def test_capture_needs_cuda(model):
    with pytest.raises(ValueError, match="CUDA graphs need the model on a CUDA device, not cpu"):
        _generate(model, [3], cuda_graphs=CUDAGraphs())


# ---- on a GPU: real captures --------------------------------------------------------------------

@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", ["torch", "triton", "triton, sdpa route"])
def test_captured_graphs_give_the_eager_latents_exactly_on_cuda(monkeypatch, dtype, backend):
    if backend == "triton, sdpa route":  # the attention route of large bf16 batches, at this small one
        monkeypatch.setattr(xar_infer.backends, "SDPA_MIN_BATCH_HEADS", 1)
    model = random_transformer().to("cuda", dtype)
    kernels = resolve_backend(backend.split(",")[0], "cuda")
    graphs = CUDAGraphs()
    eager = _generate(model, [3, 4], backend=kernels)
    assert torch.equal(_generate(model, [3, 4], backend=kernels, cuda_graphs=graphs), eager)
    assert graphs.num_graphs == 7
    # Replays only, for other labels and seeds.
    captured = dict(graphs._calls.graphs)
    again = _generate(model, [5, 6], seeds=(7, 8), backend=kernels, cuda_graphs=graphs)
    assert graphs._calls.graphs == captured
    assert torch.equal(again, _generate(model, [5, 6], seeds=(7, 8), backend=kernels))
