"""Per-image seeds: an image depends on its own label and seed only, bit for bit, whatever the batch
size or its position in it (CPU, float32, the torch backend and the Triton kernels); and where that
is not promised, how far apart the results may be.

Batching mixes rows in the matrix products only: every other op of a network call works row by row
(attention per cell and head, norms and modulations per token, the sampler per element), and
each image draws its noise from its own generator. So the promise rests on every product giving a row
the same result whatever the number of rows, which oneDNN's fp32 kernels do (a lone row is computed as
two, ``backends.onednn_linear``). MKL's, behind ``F.linear``, do not: with few rows, the rows past a
multiple of 4 take another kernel (up to 11 rows with 2 threads here, 27 with 16).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from xar_infer import XARPipeline
from xar_infer.backends import Backend, _onednn_available, onednn_linear, resolve_backend
from xar_infer.config import XARConfig
from xar_infer.engine import generate_latents
from xar_infer.loading import load_pretrained
from xar_infer.model import TORCH_OPS
from xar_infer.sampling import NoiseSource, flow_step
from xar_infer.settings import SamplingSettings

from conftest import TINY_CONFIG, TRITON_DEVICE, random_transformer
from test_model import released_call

needs_onednn = pytest.mark.skipif(not _onednn_available(), reason="oneDNN is not part of this PyTorch build")

# (label, seed) of the images; batches are the first B of them, in this order and reversed, so each
# image is compared at several batch sizes and positions with itself generated alone.
IMAGES = [(3, 11), (7, 12), (3, 13), (1, 14), (9, 15)]


def _batches(max_batch: int) -> list[list[int]]:
    return [order for B in range(2, max_batch + 1) for order in (list(range(B)), list(range(B))[::-1])]


def _latents(pipe: XARPipeline, images: list[tuple[int, int]], steps: int, scale: float, sampler: str) -> torch.Tensor:
    return pipe([label for label, _ in images], num_inference_steps=steps, guidance_scale=scale,
                generator=[torch.Generator().manual_seed(seed) for _, seed in images], sampler=sampler,
                output_type="latent").images


def _assert_batch_invariant(pipe: XARPipeline, steps: int, scale: float, sampler: str, batches: list[list[int]]) -> None:
    """Each image of each batch (indices into IMAGES) equals the same image generated alone."""
    alone = {i: _latents(pipe, [IMAGES[i]], steps, scale, sampler)[0] for i in sorted({i for b in batches for i in b})}
    for order in batches:
        batch = _latents(pipe, [IMAGES[i] for i in order], steps, scale, sampler)
        for position, i in enumerate(order):
            assert torch.equal(batch[position], alone[i]), f"image {i} at position {position} of a batch of {len(order)}"


def _pipeline(model, backend: str, device: str = "cpu") -> XARPipeline:
    pipe = XARPipeline(model.to(device), backend=backend)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# Few steps per cell are where the modulations' products have few rows (rows x evaluation times):
# the case that used to differ. Guided and unguided (the first cell runs the conditional rows alone),
# both sampler families.
@needs_onednn
@pytest.mark.parametrize("sampler, steps, scale", [("sde", 2, 2.7), ("sde", 1, 1.0), ("heun", 2, 2.0)])
def test_per_image_seeds_are_bit_exact_at_any_batch_size_and_position(sampler, steps, scale):
    _assert_batch_invariant(_pipeline(random_transformer(), "torch"), steps, scale, sampler, _batches(5))


@needs_onednn
def test_bundled_digits_model_is_bit_exact_at_any_batch_size():
    _assert_batch_invariant(_pipeline(load_pretrained("xar-digits").model, "torch"), 3, 2.0, "sde", _batches(4))


@needs_onednn
@pytest.mark.triton
@pytest.mark.skipif(TRITON_DEVICE != "cpu", reason="the float32 CPU promise; compiled GPU kernels are not covered")
def test_triton_backend_is_bit_exact_at_any_batch_size():
    # Few batches: the interpreter is slow. Images 0 and 1 each at both positions, image 2 last.
    _assert_batch_invariant(_pipeline(random_transformer(), "triton", TRITON_DEVICE), 1, 1.0, "sde", [[1, 0], [0, 1, 2]])


@needs_onednn
@pytest.mark.parametrize("config", [TINY_CONFIG, XARConfig(dim=32, encoder_depth=1, decoder_depth=1, num_heads=2,
                                                           mlp_hidden_dim=48, grid_size=4, cell_size=1)],
                         ids=["cells-of-64", "cells-of-1"])
def test_network_calls_without_a_modulation_table_are_batch_invariant(config):
    """The calls that compute their own modulations (large batches x step counts, beyond the table's
    size): a lone row and a single cell of one token make products of a single row."""
    model = random_transformer(config)
    T, c = config.tokens_per_cell, config.token_channels
    g = torch.Generator().manual_seed(0)
    cells = [torch.randn(5, T, c, generator=g) for _ in range(2)]
    labels = torch.tensor([3, 7, 1000, 3, 9])

    def calls(rows):
        cache = model.new_cache(len(rows))
        ops = resolve_backend("torch", "cpu").ops
        with torch.no_grad():
            first = released_call(model, cache, cells[0][rows], labels[rows], 0.7, cell=0, ops=ops)
            second = released_call(model, cache, cells[1][rows], labels[rows], 0.55, cell=1, prefix=cells[0][rows],
                                   ops=ops)
            third = released_call(model, cache, cells[1][rows], labels[rows], 0.3, cell=1, ops=ops)
        return first, second, third

    alone = [calls([i]) for i in range(5)]
    for order in _batches(5):
        for call, outputs in enumerate(calls(order)):
            for position, i in enumerate(order):
                assert torch.equal(outputs[position], alone[i][call][0]), (call, i, position, len(order))


# The model's product shapes (in -> out features): the tiny model's, xar-digits' and xAR-B's.
SHAPES = [(16, 32), (32, 96), (256, 32), (32, 192), (1, 128), (256, 128), (128, 768), (16, 768), (256, 768),
          (768, 2304), (768, 2048), (2048, 768), (768, 4608), (768, 16)]


@needs_onednn
@pytest.mark.parametrize("in_features, out_features", SHAPES)
def test_onednn_linear_gives_a_row_the_same_result_whatever_the_row_count(in_features, out_features):
    torch.manual_seed(0)
    layer = torch.nn.Linear(in_features, out_features)
    x = torch.randn(640, in_features)
    with torch.no_grad():
        reference = onednn_linear(x, layer)
        for rows in [*range(1, 34), 64, 65, 127, 128, 129, 257, 639]:
            assert torch.equal(onednn_linear(x[:rows], layer), reference[:rows]), rows
        # A lone row in any leading shape.
        assert torch.equal(onednn_linear(x[:1].view(1, 1, in_features), layer), reference[:1].view(1, 1, -1))


def test_outside_the_promise_batches_differ_only_by_rounding():
    """The reference ops (``F.linear``: MKL on x86, as with ``torch.backends.mkldnn.enabled = False``)
    give no row-count guarantee, so a batched image may differ from itself alone. Both are float32
    evaluations of the same arithmetic in another summation order, so they may differ by at most the
    sum of their errors; float32's error is measured here against float64, the exact-arithmetic
    reference: the batched image must lie within twice the error of the image alone. A mixed-up row
    (another image's label, noise or cache) would be off by O(1)."""
    reference = Backend("reference", TORCH_OPS, flow_step)

    settings = SamplingSettings.build(TINY_CONFIG.num_cells, 2, 2.7)

    def latents(model, images):
        labels = torch.tensor([label for label, _ in images])
        noise = NoiseSource([torch.Generator().manual_seed(seed) for _, seed in images], len(images), torch.device("cpu"))
        return generate_latents(model, labels, settings, noise, reference)

    model, exact_model = random_transformer(), random_transformer().double()
    batch = latents(model, IMAGES)
    alone = torch.cat([latents(model, [image]) for image in IMAGES])
    exact = torch.cat([latents(exact_model, [image]) for image in IMAGES])
    error = (alone.double() - exact).abs().max().item()
    assert (batch - alone).abs().max().item() <= 2 * error
