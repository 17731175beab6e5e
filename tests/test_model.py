"""The transformer: presets, config inference, the KV cache protocol, RoPE layout."""

from __future__ import annotations

import dataclasses
import threading

import pytest
import torch
import torch.nn.functional as F

from xar_infer.config import PRESETS, XARConfig, infer_config
from xar_infer.model import TORCH_OPS, XARTransformer, apply_rope, block_causal_mask, rope_tables

from conftest import TINY_CONFIG, random_transformer, released_state_dict


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


def _cells(config, B, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (B, config.tokens_per_cell, config.token_channels)
    return [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(config.num_cells)]


# The protocol tests run in float64: equal computations then agree to ~1e-12, so a tolerance of 1e-9
# catches any real difference (in fp32 this random model's rounding noise alone reaches 4e-5).
EXACT = dict(rtol=0, atol=1e-9)


@pytest.fixture
def model64():
    return random_transformer().double()


def test_cached_evaluation_equals_one_block_causal_pass(model64):
    """Cell-by-cell with the cache (the sampler's protocol) equals a single pass over all earlier cells
    as one block-causal prefix: the cache neither loses nor leaks context."""
    config, B = model64.config, 3
    labels = torch.tensor([3, 7, 1000])
    cells = _cells(config, B)
    t = torch.full((B,), 0.42)
    with torch.no_grad():
        cache = model64.new_cache(B)
        model64(cells[0], labels, t, cache)
        for s in range(1, config.num_cells):
            incremental = model64(cells[s], labels, t, cache, prefix=cells[s - 1])
            one_pass = model64(cells[s], labels, t, model64.new_cache(B), prefix=torch.cat(cells[:s], dim=1))
            assert torch.allclose(incremental, one_pass, **EXACT), s
        assert cache.length == (config.num_cells - 1) * config.tokens_per_cell


def test_every_linear_layer_goes_through_the_ops(model64):
    """A backend replaces the linear layers through ``BlockOps.linear``: all of them, so that it also
    decides how every product's rows are computed (``backends.onednn_linear``)."""
    used = []

    def linear(x, layer):
        used.append(layer)
        return F.linear(x, layer.weight, layer.bias)

    labels, B = torch.tensor([1, 2]), 2
    with torch.no_grad():
        model64(_cells(model64.config, B)[0], labels, torch.full((B,), 0.5), model64.new_cache(B),
                ops=dataclasses.replace(TORCH_OPS, linear=linear))
    expected = [m for m in model64.modules() if isinstance(m, torch.nn.Linear)]
    assert len(expected) == 6 * len(model64.blocks) + 5
    assert sorted(map(id, used)) == sorted(map(id, expected))


def test_later_calls_do_not_change_the_cache(model64):
    B = 2
    labels = torch.tensor([1, 2])
    cells = _cells(model64.config, B)
    with torch.no_grad():
        cache = model64.new_cache(B)
        model64(cells[0], labels, torch.full((B,), 1.0), cache)
        first = model64(cells[1], labels, torch.full((B,), 0.5), cache, prefix=cells[0])
        committed = torch.stack(cache.keys)[:, :, :, :cache.length].clone()
        model64(cells[2], labels, torch.full((B,), 0.3), cache)
        assert torch.equal(torch.stack(cache.keys)[:, :, :, :cache.length], committed)
        again = model64(cells[1], labels, torch.full((B,), 0.5), cache)
    assert cache.length == model64.config.tokens_per_cell
    # Running cell 1 against the cache matches its first call, which computed cell 0 alongside it.
    assert torch.allclose(first, again, **EXACT)


def test_conditional_half_can_read_a_doubled_cache(model64):
    """A call with B rows uses the first B rows of a 2B cache (the conditional half)."""
    labels = torch.tensor([4, 5])
    cells = _cells(model64.config, 2)
    doubled = torch.cat([labels, torch.full_like(labels, 1000)])
    with torch.no_grad():
        cache = model64.new_cache(4)
        model64(torch.cat([cells[0]] * 2), doubled, torch.ones(4), cache)
        model64(torch.cat([cells[1]] * 2), doubled, torch.full((4,), 0.5), cache, prefix=torch.cat([cells[0]] * 2))
        half = model64(cells[2], labels, torch.full((2,), 0.3), cache)
        single = model64.new_cache(2)
        model64(cells[1], labels, torch.full((2,), 0.5), single, prefix=cells[0])
        alone = model64(cells[2], labels, torch.full((2,), 0.3), single)
    assert torch.allclose(half, alone, **EXACT)


def test_prefix_must_be_whole_cells(tiny_model):
    cells = _cells(tiny_model.config, 1)
    with pytest.raises(ValueError, match="whole cells of 64 tokens, got x 64 and prefix 5"):
        tiny_model(cells[1], torch.tensor([0]), torch.ones(1), tiny_model.new_cache(1), prefix=cells[0][:, :5])


def test_modules_keep_no_state_between_calls(model64):
    """Two generations interleaved step by step, in two threads, give what each gives alone."""
    labels = torch.tensor([1, 2])
    cells = _cells(model64.config, 2)

    def run(order_barrier=None):
        cache = model64.new_cache(2)
        outs = []
        with torch.no_grad():
            outs.append(model64(cells[0], labels, torch.ones(2), cache))
            for s in range(1, model64.config.num_cells):
                if order_barrier is not None:
                    order_barrier.wait()
                outs.append(model64(cells[s], labels, torch.full((2,), 0.5), cache, prefix=cells[s - 1]))
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


def test_several_noisy_cells_in_one_call_equal_the_cached_protocol(model64):
    """Training runs every cell at once with its own time. Each cell's velocity must equal running it
    after the others were cached (at that same time, here 0 for the context cells)."""
    config, B = model64.config, 2
    labels = torch.tensor([2, 1000])
    cells = _cells(config, B)
    times = torch.tensor([[0.0, 0.0, 0.0, 0.8], [0.0, 0.0, 0.0, 0.35]], dtype=torch.float64)
    with torch.no_grad():
        joint = model64(torch.cat(cells, dim=1), labels, times, model64.new_cache(B))
        cache = model64.new_cache(B)
        last = model64(cells[3], labels, times[:, 3], cache, prefix=torch.cat(cells[:3], dim=1))
    assert joint.shape == (B, config.seq_len, config.token_channels)
    assert torch.allclose(joint[:, -config.tokens_per_cell:], last, **EXACT)


def test_noisy_context_is_conditioned_per_cell(model64):
    """Per-cell times reach their own cells: changing cell 0's time changes cell 0 and (through
    attention) cell 1, but changing cell 1's time leaves cell 0 alone (block-causal)."""
    B, T = 1, model64.config.tokens_per_cell
    cells = _cells(model64.config, B)
    x = torch.cat(cells[:2], dim=1)
    run = lambda t: model64(x, torch.tensor([3]), torch.tensor([t], dtype=torch.float64), model64.new_cache(B))  # noqa: E731
    with torch.no_grad():
        base, later_cell1, later_cell0 = run([0.5, 0.5]), run([0.5, 0.9]), run([0.9, 0.5])
    assert torch.allclose(base[:, :T], later_cell1[:, :T], **EXACT)
    assert (base[:, T:] - later_cell1[:, T:]).abs().max() > 1e-4
    assert (base[:, :T] - later_cell0[:, :T]).abs().max() > 1e-4


def test_padded_mlp_width_is_exact_and_invisible_in_state_dicts(tmp_path):
    """A width that is not a multiple of 8 (170, as in the official tiny checkpoint) runs padded with
    zero units: the outputs are those of the released width, in float64 to 1e-12 (summation order
    only), and state dicts keep the released shapes both ways."""
    from xar_infer.loading import load_local, save_model_dir
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
    save_model_dir(model, tmp_path, num_inference_steps=4, guidance_scale=2.0)
    loaded = load_local(tmp_path).model
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    assert not loaded.encoder_blocks[0].mlp.fc1_g.weight[170:].any()
