"""The transformer: presets, config inference, packed calls of cells over a KV cache of slots, RoPE layout."""

from __future__ import annotations

import copy
import dataclasses
import threading

import pytest
import torch
import torch.nn.functional as F

from xar_infer.backends import TORCH
from xar_infer.config import PRESETS, XARConfig, infer_config
from xar_infer.model import (
    TORCH_OPS,
    CellBatch,
    KVCache,
    XARTransformer,
    apply_rope,
    block_causal_mask,
    cached_attention,
    rope_tables,
)

from conftest import TINY_CONFIG, random_transformer, released_state_dict
from cpu_threads import one_torch_thread  # noqa: F401  (autouse: this module runs on one thread)


@pytest.mark.parametrize("name, millions", [("xar-b", 172.6), ("xar-l", 608.4), ("xar-h", 1186.0)])
def test_preset_parameter_counts_match_the_paper(name, millions):
    with torch.device("meta"):
        model = XARTransformer(PRESETS[name].config)
    # Counted in the released format: the zero units that pad xAR-L's and xAR-H's MLP width are not weights.
    assert round(sum(t.numel() for t in model.state_dict().values()) / 1e6, 1) == millions


@pytest.mark.parametrize("name", [name for name, preset in PRESETS.items() if preset.hub_filename])
def test_preset_has_the_released_key_count_and_shapes(name):
    with torch.device("meta"):
        model = XARTransformer(PRESETS[name].config)
    from xar_infer.loading import released_buffers

    keys = {**model.state_dict(), **released_buffers(model.config)}
    if name == "xar-b":
        assert len(keys) == 257  # the released xAR-B.pth key count
    assert infer_config(keys) == PRESETS[name].config


@pytest.mark.parity
def test_infer_config_from_the_official_tiny_checkpoint(parity_dir):
    sd = torch.load(parity_dir / "xar_tiny.pth", weights_only=True)
    assert infer_config(sd) == XARConfig(dim=32, encoder_depth=2, decoder_depth=2, num_heads=2, mlp_hidden_dim=85)


def test_infer_config_reads_cells_and_heads_from_buffers():
    config = XARConfig(dim=48, encoder_depth=2, decoder_depth=1, num_heads=3, mlp_hidden_dim=40,
                       token_channels=4, grid_size=8, cell_size=4, num_classes=10)
    assert infer_config(released_state_dict(random_transformer(config))) == config


def test_rope_tables_follow_cell_order():
    """Row angles in the first half of each head, column angles in the second; tokens in cell order."""
    config = XARConfig(dim=32, num_heads=2, grid_size=4, cell_size=2, encoder_depth=1, decoder_depth=1)
    cos, _ = rope_tables(config)
    # token 2 of the sequence is cell 0, row 1, col 0; token 4 starts cell 1 at row 0, col 2.
    angle = torch.acos(cos.clamp(-1, 1))
    assert angle[2, 0].item() == pytest.approx(1.0, abs=1e-6) and angle[2, 8].item() == pytest.approx(0.0, abs=1e-3)
    assert angle[4, 0].item() == pytest.approx(0.0, abs=1e-3) and angle[4, 8].item() == pytest.approx(2.0, abs=1e-6)


def test_apply_rope_rotates_interleaved_pairs():
    x = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    half_pi = torch.full((1, 4), torch.pi / 2)
    out = apply_rope(x, half_pi.cos(), half_pi.sin())
    assert torch.allclose(out, torch.tensor([[0.0, 1.0, -1.0, 0.0]]), atol=1e-6)


def test_block_causal_mask():
    config = XARConfig(grid_size=4, cell_size=2)  # 4 cells of 4 tokens
    mask = block_causal_mask(config.tokens_per_cell, start=4, num_queries=8)  # cells 1 and 2 against cells 0..2
    assert mask.shape == (8, 12)
    assert mask[:4, :8].all() and not mask[:4, 8:].any()
    assert mask[4:].all()


def _cells(config, B, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    shape = (B, config.tokens_per_cell, config.token_channels)
    return [torch.randn(shape, generator=g, dtype=dtype) for _ in range(config.num_cells)]


def _rows(cells, k):
    """Cells 0..k-1 of every image, image after image: the packing of ``CellBatch.whole_images``."""
    return torch.stack(cells[:k], dim=1).flatten(0, 1)


def released_call(model, cache, x, labels, t, cell, prefix=None, slots=None, ops=TORCH_OPS):
    """One network call of the released sampler, packed: cell ``cell`` of B images, ``x`` [B, tokens, channels],
    at flow time ``t``. On a cell's first call ``prefix``, the previous cell (clean), runs at t=0 just
    before it in its row, so that its keys and values become context. Image i uses slot ``slots[i]``
    (i by default). Returns the velocities of ``x``."""
    B = len(x)
    slots = list(range(B)) if slots is None else list(slots)
    labels = torch.as_tensor(labels).tolist()
    if prefix is None:
        return model(x, CellBatch.build(slots, [cell] * B, labels, [t] * B, x.device), cache, ops)
    twice = lambda values: [v for v in values for _ in range(2)]  # noqa: E731
    batch = CellBatch.build(twice(slots), [cell - 1, cell] * B, twice(labels), [0.0, t] * B, x.device)
    return model(torch.stack([prefix, x], dim=1).flatten(0, 1), batch, cache, ops)[1::2]


def test_cell_batch_rows_and_groups():
    """A row is a run of consecutive cells of one slot (a slot met again later, or a gap in its cells,
    starts a new row); the attention groups cells by index."""
    slots = [0, 0, 2, 1, 1, 1, 0, 2, 3, 3]
    cells = [1, 2, 2, 0, 1, 2, 3, 3, 0, 2]
    times = [0.0, 0.5, 0.3, 0.0, 0.0, 0.7, 0.2, 0.0, 0.9, 0.1]
    batch = CellBatch.build(slots, cells, [4, 4, 9, 1, 1, 1, 4, 9, 1000, 1000], times, "cpu")
    assert len(batch) == 10
    assert batch.row_starts.tolist() == [0, 0, 2, 3, 3, 3, 6, 7, 8, 9]
    groups = [(c, index.tolist(), slot_range, row_range) for c, index, slot_range, row_range in batch.groups]
    # Consecutive slots (1's cells at slots 0, 1) are read as a slice of the cache; others are gathered.
    # Evenly spaced places in the batch are read as a slice of it too.
    assert groups == [(0, [3, 8], None, slice(3, 9, 5)), (1, [0, 4], slice(0, 2), slice(0, 5, 4)),
                      (2, [1, 2, 5, 9], None, None), (3, [6, 7], None, slice(6, 8, 1))]
    assert batch.slots.tolist() == slots and batch.cells.tolist() == cells and batch.labels[-1] == 1000
    assert batch.times.dtype == torch.float64 and batch.times.tolist() == times
    assert batch.positions(4)[1].tolist() == [8, 9, 10, 11]  # cell 2 of cells of 4 tokens


def test_whole_images_is_one_row_per_image():
    times = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]], dtype=torch.float64)
    batch = CellBatch.whole_images(torch.tensor([5, 9]), times)
    assert batch.slots.tolist() == [0, 0, 0, 1, 1, 1] and batch.cells.tolist() == [0, 1, 2, 0, 1, 2]
    assert batch.labels.tolist() == [5, 5, 5, 9, 9, 9] and torch.equal(batch.times, times.flatten())
    assert batch.row_starts.tolist() == [0, 0, 0, 3, 3, 3]
    assert [(group.cell, group.index.tolist()) for group in batch.groups] == [(0, [0, 3]), (1, [1, 4]), (2, [2, 5])]


# The protocol tests run in float64: equal computations then agree to ~1e-12, so a tolerance of 1e-9
# catches any real difference (in fp32 this random model's rounding noise alone reaches 4e-5).
EXACT = dict(rtol=0, atol=1e-9)


@pytest.fixture
def model64():
    return random_transformer().double()


def test_cell_by_cell_with_the_cache_equals_all_cells_at_once(model64):
    """The sampler's protocol (a cell's first call runs the previous cell clean in its row, its later
    calls find it in the cache) gives cell s the velocity of a single call of the row of cells 0..s, the
    earlier ones clean, on an empty cache: the cache neither loses nor leaks context."""
    config, B = model64.config, 3
    labels = torch.tensor([3, 7, 1000])
    cells = _cells(config, B)
    with torch.no_grad():
        cache = model64.new_cache(B)
        released_call(model64, cache, cells[0], labels, 0.42, cell=0)
        for s in range(1, config.num_cells):
            first = released_call(model64, cache, cells[s], labels, 0.42, cell=s, prefix=cells[s - 1])
            later = released_call(model64, cache, cells[s], labels, 0.42, cell=s)
            times = torch.tensor([[0.0] * s + [0.42]] * B, dtype=torch.float64)
            one_call = model64(_rows(cells, s + 1), CellBatch.whole_images(labels, times), model64.new_cache(B))
            last = one_call.view(B, s + 1, *one_call.shape[1:])[:, s]
            assert torch.allclose(first, last, **EXACT), s
            assert torch.allclose(later, last, **EXACT), s


def test_cell_attention_is_the_released_block_causal_attention():
    """The attention by cell, with no mask, equals the released code's for every cell of two images:
    each image one sequence under the block-causal mask (float64). Its cache holds the rotated keys."""
    config = TINY_CONFIG
    B, k, T, H, hd = 2, config.num_cells, config.tokens_per_cell, config.num_heads, config.head_dim
    g = torch.Generator().manual_seed(0)
    q, key, value = (torch.randn(B * k, T, H, hd, generator=g, dtype=torch.float64) for _ in range(3))
    cos, sin = rope_tables(config)
    cache = KVCache(config, B, torch.float64, "cpu")
    batch = CellBatch.whole_images(torch.tensor([1, 2]), torch.zeros(B, k))
    out = cached_attention(q, key, value, cos, sin, cache, 1, batch)

    def sequence(t):  # [B * k, T, H, hd] -> [B, H, k * T, hd]
        return t.reshape(B, k * T, H, hd).transpose(1, 2)

    rotated_q, rotated_k = apply_rope(sequence(q), cos, sin), apply_rope(sequence(key), cos, sin)
    released = F.scaled_dot_product_attention(rotated_q, rotated_k, sequence(value),
                                              attn_mask=block_causal_mask(T, 0, k * T))
    assert torch.allclose(out, released.transpose(1, 2).reshape(B * k, T, H, hd), **EXACT)
    assert torch.equal(cache.keys[1], rotated_k) and torch.equal(cache.values[1], sequence(value))
    assert not cache.keys[0].any()


def test_every_linear_layer_goes_through_the_ops(model64):
    """A backend replaces the linear layers through ``BlockOps.linear``: all of them, so that it also
    decides how every product's rows are computed (``backends.onednn_linear``)."""
    used = []

    def linear(x, layer):
        used.append(layer)
        return F.linear(x, layer.weight, layer.bias)

    labels, B = torch.tensor([1, 2]), 2
    with torch.no_grad():
        released_call(model64, model64.new_cache(B), _cells(model64.config, B)[0], labels, 0.5, cell=0,
                      ops=dataclasses.replace(TORCH_OPS, linear=linear))
    expected = [m for m in model64.modules() if isinstance(m, torch.nn.Linear)]
    assert len(expected) == 6 * len(model64.blocks) + 5
    assert sorted(map(id, used)) == sorted(map(id, expected))


def test_a_call_writes_its_own_cells_only(model64):
    """Committed keys and values are never touched by later calls: a call writes its cells' positions
    of its slots and nothing else. Re-running cell 1 against the cache then matches its first call,
    which computed cell 0 alongside it."""
    T = model64.config.tokens_per_cell
    labels = torch.tensor([1, 2])
    cells = _cells(model64.config, 2)
    with torch.no_grad():
        cache = model64.new_cache(3)  # slot 2 is never used
        released_call(model64, cache, cells[0], labels, 1.0, cell=0)
        first = released_call(model64, cache, cells[1], labels, 0.5, cell=1, prefix=cells[0])
        before = [t.clone() for t in cache.keys + cache.values]
        released_call(model64, cache, cells[2], labels, 0.3, cell=1)  # other tokens in cell 1's place
        after = [t.clone() for t in cache.keys + cache.values]
        again = released_call(model64, cache, cells[1], labels, 0.5, cell=1)
    for b, a in zip(before, after):
        assert torch.equal(a[:, :, :T], b[:, :, :T])  # cell 0, committed
        assert (a[:2, :, T:2 * T] != b[:2, :, T:2 * T]).any()  # cell 1, rewritten
        assert not a[:, :, 2 * T:].any() and not a[2].any()  # cells not made yet, the unused slot
    assert torch.allclose(first, again, **EXACT)


def test_a_slot_is_read_by_its_own_cells_only(model64):
    """Images in any slots of a shared cache, beside other images (here their unconditional halves),
    give what they give in a cache of their own."""
    labels = torch.tensor([4, 5])
    both = torch.cat([labels, torch.full_like(labels, model64.null_class)])
    cells, others = _cells(model64.config, 2), _cells(model64.config, 2, seed=1)
    pair = [torch.cat([a, b]) for a, b in zip(cells, others)]
    with torch.no_grad():
        shared = model64.new_cache(4)
        released_call(model64, shared, pair[0], both, 1.0, cell=0, slots=[3, 1, 0, 2])
        released_call(model64, shared, pair[1], both, 0.5, cell=1, prefix=pair[0], slots=[3, 1, 0, 2])
        in_shared = released_call(model64, shared, cells[2], labels, 0.3, cell=1, slots=[3, 1])
        own = model64.new_cache(2)
        released_call(model64, own, cells[0], labels, 1.0, cell=0)
        released_call(model64, own, cells[1], labels, 0.5, cell=1, prefix=cells[0])
        alone = released_call(model64, own, cells[2], labels, 0.3, cell=1)
    assert torch.allclose(in_shared, alone, **EXACT)


def test_a_cells_velocity_does_not_depend_on_what_shares_its_call():
    """Bit for bit (CPU, fp32, the torch backend's ops, whose linear layers give a row the same result
    whatever the row count): cell 2 of one image equals itself computed alone, whatever cells of other
    images at other indices and times share the call, in any order, and with its previous cells re-run
    in its row. This is what lets the engine pack any requests together."""
    model = random_transformer()
    config = model.config
    g = torch.Generator().manual_seed(0)
    shape = (4, config.num_cells, config.tokens_per_cell, config.token_channels)  # [slot, cell, ...]
    tokens = torch.randn(shape, generator=g)
    labels = [3, 7, 1000, 5]
    ops = TORCH.ops
    with torch.no_grad():
        cache = model.new_cache(4)  # every slot holds its image's cells 0..2, clean
        context = CellBatch.whole_images(torch.tensor(labels), torch.zeros(4, 3))
        model(_rows(list(tokens.unbind(1)), 3), context, cache, ops)

        def velocity_of_target(entries):  # entries: (slot, cell, t); the target is (1, 2, 0.5)
            batch = CellBatch.build([s for s, _, _ in entries], [c for _, c, _ in entries],
                                    [labels[s] for s, _, _ in entries], [t for _, _, t in entries], "cpu")
            out = model(torch.stack([tokens[s, c] for s, c, _ in entries]), batch, copy.deepcopy(cache), ops)
            return out[entries.index((1, 2, 0.5))]

        alone = velocity_of_target([(1, 2, 0.5)])
        companions = [
            [(0, 1, 0.0), (0, 2, 0.3), (1, 2, 0.5), (3, 0, 0.9), (2, 3, 0.1)],
            [(2, 3, 0.1), (3, 0, 0.9), (1, 2, 0.5), (0, 2, 0.3)],
            [(0, 2, 0.5), (2, 2, 0.5), (1, 2, 0.5), (3, 2, 0.5)],  # the same index and time: one attention group
            [(1, 1, 0.0), (1, 2, 0.5)],  # its previous cell re-run in its row
            [(3, 1, 0.7), (1, 0, 0.0), (1, 1, 0.0), (1, 2, 0.5), (2, 2, 0.5)],
        ]
        for entries in companions:
            assert torch.equal(velocity_of_target(entries), alone), entries


def test_time_is_quantised_per_cell(tiny_model):
    """Each cell's time is embedded as floor(1000 t) in fp32, as released: 0.7 and 0.7004 are one level
    (bit-identical cells), 0.6999 the level below."""
    x = _cells(tiny_model.config, 1, dtype=torch.float32)[0].expand(3, -1, -1)
    with torch.no_grad():
        out = tiny_model(x, CellBatch.build([0, 1, 2], [0, 0, 0], [5, 5, 5], [0.7, 0.7004, 0.6999], "cpu"),
                         tiny_model.new_cache(3), TORCH.ops)
    assert torch.equal(out[0], out[1])
    assert (out[0] - out[2]).abs().max() > 1e-3


def test_bad_shapes_raise_value_error(tiny_model):
    cells = _cells(tiny_model.config, 2, dtype=torch.float32)
    batch = CellBatch.build([0], [1], [0], [1.0], "cpu")
    cache = tiny_model.new_cache(1)
    with pytest.raises(ValueError, match=r"x must be \[cells, tokens_per_cell, token_channels\] = \[1, 64, 16\] for this batch, got \[1, 5, 16\]"):
        tiny_model(cells[1][:1, :5], batch, cache)
    with pytest.raises(ValueError, match=r"= \[1, 64, 16\] for this batch, got \[2, 64, 16\]"):
        tiny_model(cells[1], batch, cache)  # more cells than the batch describes
    with pytest.raises(ValueError, match=r"got \[1, 128, 16\]"):
        tiny_model(torch.cat(cells[:2], dim=1)[:1], batch, cache)  # two cells as one sequence: the old layout
    with pytest.raises(ValueError, match=r"got \[1, 64, 3\]"):
        tiny_model(cells[1][:1, :, :3], batch, cache)  # channels of another model
    with pytest.raises(ValueError, match=r"got \[64, 16\]"):
        tiny_model(cells[1][0], batch, cache)  # one cell without its cell dimension
    assert not any(t.any() for t in cache.keys + cache.values)  # refused before anything was written


def test_modules_keep_no_state_between_calls(model64):
    """Two generations interleaved call by call, in two threads, give what each gives alone."""
    labels = torch.tensor([1, 2])
    cells = _cells(model64.config, 2)

    def run(order_barrier=None):
        cache = model64.new_cache(2)
        with torch.no_grad():
            outs = [released_call(model64, cache, cells[0], labels, 1.0, cell=0)]
            for s in range(1, model64.config.num_cells):
                if order_barrier is not None:
                    order_barrier.wait()
                outs.append(released_call(model64, cache, cells[s], labels, 0.5, cell=s, prefix=cells[s - 1]))
        return outs

    alone = run()
    barrier = threading.Barrier(2)
    results = [None, None]
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, run(barrier))) for i in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for res in results:
        assert all(torch.equal(a, b) for a, b in zip(alone, res))


def test_rope_tables_stay_fp32_when_the_model_is_cast():
    model = random_transformer(TINY_CONFIG).to(torch.bfloat16)
    assert model.rope_cos.dtype == torch.float32
    assert torch.equal(model.rope_cos, rope_tables(TINY_CONFIG)[0])


def test_bfloat16_model_computes_in_bfloat16_close_to_fp32():
    """fp32 inputs are cast to the weights' dtype; the cache and the velocities are bf16. Measured on this
    packed call: 0.023 relative to fp32 (0.023-0.038 over five random models), about 6 units of bf16's
    rounding 2^-8; the bound is 4x the measured. A dtype slip (a cache in the wrong dtype, an fp32
    input reaching a bf16 product) fails or is off by O(1)."""
    model = random_transformer()
    config = model.config
    x = _rows(_cells(config, 3, dtype=torch.float32), 2)
    batch = CellBatch.whole_images(torch.tensor([3, 1000, 7]), torch.tensor([[0.0, 0.6], [0.0, 0.3], [0.2, 0.9]]))
    with torch.no_grad():
        reference = model(x, batch, model.new_cache(3))
        model.to(torch.bfloat16)
        cache = model.new_cache(3)
        out = model(x, batch, cache)
    assert model.dtype == torch.bfloat16 and out.dtype == torch.bfloat16 and cache.keys[0].dtype == torch.bfloat16
    assert ((out.float() - reference).norm() / reference.norm()).item() < 0.1


def test_every_cell_of_a_training_batch_equals_the_cached_protocol(model64):
    """Training runs every cell of an image in one call, each at its own time (noisy context). Each
    cell's velocity equals running it alone after its earlier cells were cached at their times."""
    config, B = model64.config, 2
    labels = torch.tensor([2, 1000])
    cells = _cells(config, B)
    times = torch.tensor([[0.9, 0.1, 0.55, 0.8], [0.0, 0.3, 0.0, 0.35]], dtype=torch.float64)
    with torch.no_grad():
        joint = model64(_rows(cells, config.num_cells), CellBatch.whole_images(labels, times), model64.new_cache(B))
        assert joint.shape == (B * config.num_cells, config.tokens_per_cell, config.token_channels)
        joint = joint.view(B, config.num_cells, *joint.shape[1:])
        for s in range(config.num_cells):
            cache = model64.new_cache(B)
            if s:
                model64(_rows(cells, s), CellBatch.whole_images(labels, times[:, :s]), cache)
            alone = model64(cells[s], CellBatch.build([0, 1], [s, s], labels, times[:, s], "cpu"), cache)
            assert torch.allclose(joint[:, s], alone, **EXACT), s


def test_noisy_context_is_conditioned_per_cell(model64):
    """Per-cell times reach their own cells: changing cell 0's time changes cell 0 and (through
    attention) cell 1, but changing cell 1's time leaves cell 0 alone (block-causal)."""
    x = _rows(_cells(model64.config, 1), 2)

    def run(times):
        batch = CellBatch.whole_images(torch.tensor([3]), torch.tensor([times], dtype=torch.float64))
        return model64(x, batch, model64.new_cache(1))

    with torch.no_grad():
        base, later_cell1, later_cell0 = run([0.5, 0.5]), run([0.5, 0.9]), run([0.9, 0.5])
    assert torch.allclose(base[0], later_cell1[0], **EXACT)
    assert (base[1] - later_cell1[1]).abs().max() > 1e-4
    assert (base[0] - later_cell0[0]).abs().max() > 1e-4
    assert (base[1] - later_cell0[1]).abs().max() > 1e-4


def test_padded_mlp_width_is_exact_and_invisible_in_state_dicts(tmp_path):
    """A width that is not a multiple of 8 (170, as in the official tiny checkpoint) runs padded with
    zero units: the outputs are those of the released width, in float64 to 1e-12 (summation order
    only), and state dicts keep the released shapes both ways."""
    from xar_infer.hub import save_model_folder
    from xar_infer.loading import load_local
    from xar_infer.model import TORCH_OPS, GatedMLP

    config = XARConfig(dim=32, encoder_depth=1, decoder_depth=1, num_heads=2, mlp_hidden_dim=170)
    mlp = GatedMLP(config).double()
    assert mlp.fc1_g.weight.shape == (176, 32) and mlp.fc2.weight.shape == (32, 176)
    g = torch.Generator().manual_seed(0)
    released = {k: torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in mlp.state_dict().items()}
    assert released["fc1_g.weight"].shape == (170, 32) and released["fc2.weight"].shape == (32, 170)
    mlp.load_state_dict(released)
    for t in (mlp.fc1_g.weight[170:], mlp.fc1_x.bias[170:], mlp.fc2.weight[:, 170:]):
        assert not t.any()
    x = torch.randn(3, 5, 32, generator=g, dtype=torch.float64)
    r = released
    expected = F.linear(F.gelu(F.linear(x, r["fc1_g.weight"], r["fc1_g.bias"])) * F.linear(x, r["fc1_x.weight"], r["fc1_x.bias"]),
                        r["fc2.weight"], r["fc2.bias"])
    torch.testing.assert_close(mlp(x, TORCH_OPS), expected, rtol=0, atol=1e-12)
    assert all(torch.equal(mlp.state_dict()[k], v) for k, v in released.items())

    # Saved in our format and loaded back: released shapes in the file, the same model after.
    model = random_transformer(config)
    save_model_folder(tmp_path, model, num_inference_steps=4, guidance_scale=2.0)
    loaded = load_local(tmp_path).model
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    assert not loaded.encoder_blocks[0].mlp.fc1_g.weight[170:].any()
