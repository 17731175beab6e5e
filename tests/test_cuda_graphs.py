"""CUDA graphs of the engine's network calls: the eager engine's latents, padding that stays padding,
graphs keyed and reused as designed, and dropped when the model changes.

Without a GPU the graphs run with ``capture=False``: the same static buffers, padding, cache and
keys, each "replay" running the captured function eagerly. What only a capture can break (a host
sync, a copy from host memory) is checked on the meta device; the real captures run in the CUDA tests.
"""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from xar_infer.backends import TORCH, Backend, onednn_linear, resolve_backend, triton_available
from xar_infer.cuda_graphs import CUDAGraphs, GraphedNetwork, bucket_sizes, keys_by_cells
from xar_infer.engine import EagerNetwork, Engine, GenerationRequest
from xar_infer.engine.engine import generate_latents
from xar_infer.errors import InvalidArgumentError
from xar_infer.model import BlockOps, CellBatch, apply_rope
from xar_infer.sampling import NoiseSource, flow_step
from xar_infer.settings import SamplingSettings

from conftest import TRITON_DEVICE, random_transformer

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (real captures)")


def masked_attention(q, k, v, cos, sin, cache, layer, batch):
    """``model.cached_attention`` without host data: every cell over its whole slot, masked past its
    own end. A stand-in, for these tests, for ``kernels.ragged_attention`` (not written yet)."""
    T = q.shape[1]
    positions = batch.positions(T)
    cos, sin = cos[positions].unsqueeze(2), sin[positions].unsqueeze(2)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    keys, values = cache.keys[layer], cache.values[layer]
    keys[batch.slots[:, None], :, positions] = k
    values[batch.slots[:, None], :, positions] = v
    visible = torch.arange(keys.shape[2], device=q.device) < ((batch.cells + 1) * T)[:, None]
    return F.scaled_dot_product_attention(q.transpose(1, 2), keys[batch.slots], values[batch.slots],
                                          attn_mask=visible[:, None, None, :]).transpose(1, 2)


MASKED = Backend("masked", BlockOps(attention=masked_attention, linear=onednn_linear), flow_step)

# (the network call at which a request arrives, the request): different cells, steps, samplers and
# guidance share calls; 7 slots make the last ones wait for slots.
MIXED = [
    (0, GenerationRequest(class_label=3, seed=1)),
    (0, GenerationRequest(class_label=5, seed=2, sampler="heun", num_inference_steps=2)),
    (2, GenerationRequest(class_label=7, seed=3, guidance_scale=1.0)),
    (4, GenerationRequest(class_label=1, seed=4, sampler="euler", guidance_schedule="constant",
                          guidance_interval=(0.3, 0.7), num_inference_steps=[4, 3, 2, 2])),
    (9, GenerationRequest(class_label=2, seed=5, sampler="heun", guidance_scale=4.0)),
]


def run_engine(model, network=EagerNetwork, backend=TORCH, max_rows=7, requests=MIXED, **kwargs):
    """Each request's latent, from an engine stepped in this thread; and the engine."""
    engine = Engine(model, backend, max_rows, (3, 2.5), network=network, **kwargs)
    pending, futures, call = list(requests), [], 0
    while pending or engine.scheduler.has_work():
        while pending and pending[0][0] <= call:
            futures.append(engine.submit(pending.pop(0)[1]))
        engine.step()
        call += 1
    return [f.result() for f in futures], engine


def latents(model, labels, network=EagerNetwork, seeds=(1, 2, 3), backend=TORCH, steps=3, scale=2.5):
    """A pipeline call's latents: one job of ``len(labels)`` images."""
    device = model.device
    settings = SamplingSettings.build(model.config.num_cells, steps, scale)
    noise = NoiseSource([torch.Generator(device).manual_seed(s) for s in seeds[:len(labels)]], len(labels), device)
    return generate_latents(model, torch.tensor(labels, device=device), settings, noise, backend, network=network)


def recording(made: list, **kwargs):
    """A network factory that keeps the GraphedNetworks it makes."""
    def factory(model, ops, num_slots):
        made.append(GraphedNetwork(model, ops, num_slots, capture=False, **kwargs))
        return made[-1]
    return factory


def assert_all_equal(a, b):
    assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def model():
    return random_transformer()


# ---- the engine's latents, bit for bit ----------------------------------------------------------

@pytest.mark.parametrize("table_bytes", [256 * 2**20, 20_000, 0], ids=["tables", "one-table", "no-table"])
@pytest.mark.parametrize("backend", [TORCH, MASKED], ids=["keyed-by-cells", "keyed-by-bucket"])
def test_graphed_engine_gives_the_eager_latents_exactly(model, backend, table_bytes):
    """Mixed jobs joining at different calls, with modulations looked up or computed by the engine:
    the same latents as the eager engine (oneDNN's products and SDPA compute each row alike whatever
    the rows beside it, so padding changes nothing on CPU)."""
    made = []
    eager, _ = run_engine(model, backend=backend, modulation_table_bytes=table_bytes)
    keys = {} if backend is TORCH else {"key_by_cells": False}  # TORCH: keys_by_cells decides
    graphed, engine = run_engine(model, recording(made, **keys), backend, modulation_table_bytes=table_bytes)
    assert_all_equal(graphed, eager)
    assert engine.network is made[0] and len(made) == 1
    assert made[0].cache.keys[0][made[0].scratch_slot].any()  # some calls were padded


def test_modulations_left_to_the_network_are_computed_in_the_graph(model, monkeypatch):
    """A caller that passes no modulations gets them computed from the static labels and times."""
    monkeypatch.setattr(Engine, "_modulations", lambda self, batch, on_device: None)
    monkeypatch.setattr(Engine, "_store_view", lambda self, entries: None)
    made = []
    eager, _ = run_engine(model)
    assert_all_equal(run_engine(model, recording(made))[0], eager)
    assert all(computes for _, computes, _ in made[0].graphs)


def test_padding_stays_in_the_scratch_slot(model):
    """Padding rows hold NaN here (the buffers are poisoned before every call): the latents and every
    slot of the engine's cache are the eager ones; only positions [0, T) of the scratch slot were written."""
    eager, eager_engine = run_engine(model, max_rows=5)
    network = GraphedNetwork(model, TORCH.ops, 5, capture=False)

    def poisoned(x, batch, modulations):
        network.x.fill_(float("nan"))
        network.modulations.fill_(float("nan"))
        return network(x, batch, modulations)

    graphed, _ = run_engine(model, lambda *args: poisoned, max_rows=5)
    assert_all_equal(graphed, eager)
    T = model.config.tokens_per_cell
    for layer in range(model.config.num_layers):
        for ours, theirs in ((network.cache.keys, eager_engine.network.cache.keys),
                             (network.cache.values, eager_engine.network.cache.values)):
            assert torch.equal(ours[layer][:5], theirs[layer])
            scratch = ours[layer][network.scratch_slot]
            assert scratch[:, :T].isnan().all() and not scratch[:, T:].any()


def test_tokens_given_in_chunks_reach_the_network_as_their_concatenation(model):
    """The engine passes a call's tokens as chunks, a guided image's two halves as the same chunk
    twice: the graphed network copies them into its input buffer (a repeated chunk in one copy, no
    concatenation), and its velocities and cache are those of the eager call on the concatenation."""
    config = model.config
    null = model.null_class
    batch = CellBatch.build([0, 1, 2, 3, 4], [2, 2, 1, 1, 0], [3, null, 4, null, 5], [0.5, 0.5, 0.2, 0.2, 0.9], "cpu")
    a = torch.randn(1, config.tokens_per_cell, config.token_channels)
    b = torch.randn(1, config.tokens_per_cell, config.token_channels)
    c = torch.randn(1, config.tokens_per_cell, config.token_channels)
    eager, graphed = EagerNetwork(model, TORCH.ops, 5), GraphedNetwork(model, TORCH.ops, 5, capture=False)
    for network in (eager, graphed):  # the earlier cells, in both caches alike
        with torch.inference_mode():
            network(torch.randn(4, config.tokens_per_cell, config.token_channels, generator=torch.Generator().manual_seed(0)),
                    CellBatch.build([0, 0, 1, 1], [0, 1, 0, 1], [3, 3, null, null], [0.0] * 4, "cpu"), None)
    with torch.inference_mode():
        expected = eager(torch.cat([a, a, b, b, c]), batch, None)
        got = graphed([a, a, b, b, c], batch, None)
    assert torch.equal(graphed.x[:5], torch.cat([a, a, b, b, c]))
    assert torch.equal(got, expected)
    for layer in range(config.num_layers):
        assert torch.equal(graphed.cache.keys[layer][:5], eager.cache.keys[layer][:5])


def test_a_call_past_the_largest_bucket_runs_eagerly(model):
    """No engine makes one (at most two cells per slot), but the protocol allows it."""
    network = GraphedNetwork(model, TORCH.ops, 1, capture=False)
    eager = EagerNetwork(model, TORCH.ops, 1)
    config = model.config
    batch = CellBatch.whole_images(torch.tensor([3]), torch.rand(1, config.num_cells, dtype=torch.float64))
    x = torch.randn(config.num_cells, config.tokens_per_cell, config.token_channels)
    assert network.buckets == [1, 2]
    with torch.inference_mode():
        assert torch.equal(network(x, batch, None), eager(x, batch, None))
    assert network.graphs == {}


# ---- buckets and keys ---------------------------------------------------------------------------

@pytest.mark.parametrize("max_cells, sizes", [
    (1, [1]), (2, [1, 2]), (3, [1, 2, 4]), (6, [1, 2, 4, 8]), (8, [1, 2, 4, 8]), (9, [1, 2, 4, 8, 16]),
    (128, [1, 2, 4, *range(8, 129, 8)]),
])
def test_bucket_sizes(max_cells, sizes):
    assert bucket_sizes(max_cells) == sizes


def test_the_key_holds_the_cells_unless_the_attention_reads_device_metadata():
    """cached_attention loops over CellBatch.groups on the host; an attention that says it reads only
    device tensors (the Triton backend's ragged kernel) is keyed by bucket alone."""
    assert keys_by_cells(TORCH.ops) and keys_by_cells(MASKED.ops)
    assert not keys_by_cells(BlockOps(attention=masked_attention, attention_uses_groups=False))
    if triton_available():
        assert not keys_by_cells(resolve_backend("triton", TRITON_DEVICE).ops)


@pytest.mark.parametrize("labels, keys", [
    # Linear guidance over 4 cells: cell 0 runs the 2 conditional rows alone (3 steps); each later
    # cell has a first call (its previous cell, clean, on 4 rows, then itself) and 2 more on 4 rows.
    ([3, 4], {(2, False, ((0, 2),)): 3,
              (8, False, ((0, 4), (1, 4))): 1, (4, False, ((1, 4),)): 2,
              (8, False, ((1, 4), (2, 4))): 1, (4, False, ((2, 4),)): 2,
              (8, False, ((2, 4), (3, 4))): 1, (4, False, ((3, 4),)): 2}),
    # 3 images: 3, 12 and 6 cells, padded to 4, 16 and 8; the padding counts at cell 0.
    ([3, 4, 5], {(4, False, ((0, 4),)): 3,
                 (16, False, ((0, 10), (1, 6))): 1, (8, False, ((0, 2), (1, 6))): 2,
                 (16, False, ((0, 4), (1, 6), (2, 6))): 1, (8, False, ((0, 2), (2, 6))): 2,
                 (16, False, ((0, 4), (2, 6), (3, 6))): 1, (8, False, ((0, 2), (3, 6))): 2}),
], ids=["2-images", "3-images-padded"])
def test_keyed_by_cells_one_graph_per_bucket_and_cell_counts(model, labels, keys):
    graphs = CUDAGraphs(capture=False)
    latents(model, labels, graphs.network)
    [network] = graphs._networks
    assert {key: graph.replays for key, graph in network.graphs.items()} == keys
    # Other labels and seeds: replays only, the latents still exact.
    again = latents(model, labels[::-1], graphs.network, seeds=(7, 8, 9))
    assert graphs._networks == [network] and graphs.num_graphs == len(keys)
    assert {key: graph.replays for key, graph in network.graphs.items()} == {k: 2 * n for k, n in keys.items()}
    assert torch.equal(again, latents(model, labels[::-1], seeds=(7, 8, 9)))


def test_keyed_by_bucket_one_graph_per_bucket(model):
    """With an attention that reads only device tensors, calls of other cells replay the same graph."""
    made = []
    latent = latents(model, [3, 4], recording(made, key_by_cells=False), backend=MASKED)
    assert torch.equal(latent, latents(model, [3, 4], backend=MASKED))
    assert {key: graph.replays for key, graph in made[0].graphs.items()} == {(2, False): 3, (8, False): 3, (4, False): 6}


# ---- reuse, invalidation, threads ----------------------------------------------------------------

def test_later_engines_reuse_the_network_and_a_changed_model_gets_a_new_one():
    model = random_transformer()
    graphs = CUDAGraphs(capture=False)
    latents(model, [3, 4], graphs.network)
    [network] = graphs._networks
    latents(model, [5], graphs.network)  # fewer slots: the same network, its graphs
    assert graphs._networks == [network] and not network.leased
    latents(model, [3, 4, 5], graphs.network)  # more slots: a new network, the free old one freed
    [bigger] = graphs._networks
    assert bigger is not network and bigger.num_slots == 6
    model.double()
    latent = latents(model, [3, 4], graphs.network)
    [double] = graphs._networks
    assert double is not bigger and double.x.dtype == torch.float64
    assert torch.equal(latent, latents(model, [3, 4]))
    graphs.reset()
    assert graphs.num_graphs == 0 and graphs._networks == []


def test_new_weight_tensors_are_recaptured_and_a_cast_refused_mid_engine():
    model = random_transformer()
    graphs = CUDAGraphs(capture=False)
    engine = Engine(model, TORCH, 4, (3, 2.5), network=graphs.network)
    future = engine.submit(GenerationRequest(class_label=3, seed=1))
    engine.step()
    before = dict(engine.network.network.graphs)
    model.to("cpu")  # same device: same weights, but new RoPE tables, which the graphs read
    engine.step()
    after = engine.network.network.graphs
    assert len(after) == 1 and all(graph is not before.get(key) for key, graph in after.items())
    engine.run_until_idle()
    assert torch.equal(future.result(), run_engine(model, requests=[(0, GenerationRequest(class_label=3, seed=1))])[0][0])

    future = engine.submit(GenerationRequest(class_label=3, seed=1))
    engine.step()
    model.double()
    engine.run_until_idle()
    with pytest.raises(InvalidArgumentError, match="moved or cast after this engine was made.*make a new engine"):
        future.result()


def test_engines_alive_together_get_networks_of_their_own(model):
    """A network's KV cache holds its engine's images between calls: it is never shared by two live engines."""
    graphs = CUDAGraphs(capture=False)
    a = Engine(model, TORCH, 4, (3, 2.5), network=graphs.network)
    b = Engine(model, TORCH, 4, (3, 2.5), network=graphs.network)
    assert a.network.network is not b.network.network
    requests = [GenerationRequest(class_label=3, seed=1), GenerationRequest(class_label=8, seed=2, sampler="heun")]
    futures = [a.submit(requests[0]), b.submit(requests[1])]
    while a.step() | b.step():  # interleaved calls
        pass
    for future, request in zip(futures, requests):
        assert torch.equal(future.result(), run_engine(model, requests=[(0, request)])[0][0])
    networks = {id(a.network.network), id(b.network.network)}
    del a, b
    c = Engine(model, TORCH, 4, (3, 2.5), network=graphs.network)
    assert id(c.network.network) in networks


def test_threads_sharing_graphs_take_turns(model):
    graphs = CUDAGraphs(capture=False)
    labels = {0: [3, 4], 1: [8, 9, 1]}
    results = {}

    def run(i):
        results[i] = latents(model, labels[i], graphs.network, seeds=(i, i + 1, i + 2))

    threads = [threading.Thread(target=run, args=(i,)) for i in labels]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for i in labels:
        assert torch.equal(results[i], latents(model, labels[i], seeds=(i, i + 1, i + 2)))


def test_pipeline_engines_use_the_pipeline_graphs(tiny_checkpoint):
    from xar_infer import XARPipeline

    pipe = XARPipeline.from_pretrained(tiny_checkpoint)
    requests = [GenerationRequest(class_label=c, seed=s, num_inference_steps=2) for c, s in ((1, 5), (2, 6))]
    with pipe.engine(max_rows=4) as engine:
        eager = [f.result() for f in [engine.submit(r) for r in requests]]
    pipe._cuda_graphs = CUDAGraphs(capture=False)  # what enable_cuda_graphs() makes, without capturing
    with pipe.engine(max_rows=4) as engine:
        assert isinstance(engine.network.network, GraphedNetwork)
        assert_all_equal([f.result() for f in [engine.submit(r) for r in requests]], eager)
    assert pipe._cuda_graphs.num_graphs > 0


# ---- what a capture needs ------------------------------------------------------------------------

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


@pytest.mark.parametrize("given", [True, False], ids=["modulations-given", "modulations-computed"])
@pytest.mark.parametrize("backend", [TORCH, MASKED], ids=["keyed-by-cells", "keyed-by-bucket"])
def test_a_graphed_call_needs_nothing_from_the_host(backend, given):
    """A CUDA graph cannot capture a sync (``.item()``) or a copy from host memory, and copying a
    call's inputs in should need neither. On the meta device a tensor made on the host shows up as a
    CPU tensor, and reading a value back fails. Checked: a whole call (copies and "replay") of a
    padded batch whose graph exists."""
    model = random_transformer().to("meta")
    config = model.config
    network = GraphedNetwork(model, backend.ops, 4, capture=False, key_by_cells=backend is TORCH)
    null = model.null_class
    batch = CellBatch.build([0, 0, 1, 1, 2], [1, 2, 1, 2, 0], [3, 3, null, null, 5], [0.0, 0.7, 0.0, 0.7, 0.3], "meta")
    x = torch.zeros(5, config.tokens_per_cell, config.token_channels, device="meta")
    modulations = [torch.zeros(5, 1, 6 * config.dim, device="meta") for _ in range(config.num_layers)] if given else None
    with torch.inference_mode():
        network(x, batch, modulations)
        watch = HostTraffic("meta")
        with watch:
            network(x, batch, modulations)
    assert len(network.graphs) == 1 and next(iter(network.graphs))[0] == 8
    assert watch.found == []


def test_capture_needs_cuda(model):
    with pytest.raises(ValueError, match="CUDA graphs need the model on a CUDA device, not cpu"):
        Engine(model, TORCH, 2, (3, 2.5), network=CUDAGraphs().network)


# ---- on a GPU: real captures ---------------------------------------------------------------------

@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_captured_graphs_replay_the_uncaptured_calls_exactly_on_cuda(dtype, backend):
    """Mixed jobs: a replay runs the kernels of the ``capture=False`` call on the same buffers."""
    model = random_transformer().to("cuda", dtype)
    kernels = resolve_backend(backend, "cuda")
    uncaptured, _ = run_engine(model, CUDAGraphs(capture=False).network, kernels)
    graphs = CUDAGraphs()
    assert_all_equal(run_engine(model, graphs.network, kernels)[0], uncaptured)
    captured = graphs.num_graphs
    assert_all_equal(run_engine(model, graphs.network, kernels)[0], uncaptured)
    assert graphs.num_graphs == captured  # replays only


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_unpadded_captured_calls_give_the_eager_latents_exactly_on_cuda(dtype, backend):
    """One or two images: every call holds 1, 2, 4 or 8 cells, a bucket, so the graphs run the eager
    kernels on the eager shapes. (A padded call may round differently: cuBLAS picks its kernels by size.)"""
    model = random_transformer().to("cuda", dtype)
    kernels = resolve_backend(backend, "cuda")
    graphs = CUDAGraphs()
    for labels in ([3], [3, 4]):
        assert torch.equal(latents(model, labels, graphs.network, backend=kernels),
                           latents(model, labels, backend=kernels))
    assert graphs.num_graphs == (7 if keys_by_cells(kernels.ops) else 3)
