import random
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from xar_infer.checkpoint_io import CheckpointError, write_safetensors
from xar_infer.vae import AutoencoderKLDecoder, VAEConfig, infer_vae_config, load_vae

from conftest import PARITY_DIR

VAE_FIXTURE = PARITY_DIR / "vae_small.safetensors"
SMALL = VAEConfig(embed_dim=16, ch=32, ch_mult=(1, 2), num_res_blocks=1)


class Opaque:
    """Stands in for an arbitrary Python object hidden inside a pickle."""


def random_decoder(cfg: VAEConfig = SMALL, seed: int = 0) -> AutoencoderKLDecoder:
    torch.manual_seed(seed)
    model = AutoencoderKLDecoder(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():  # move norms off 1/0 so that every weight matters
            p.add_(0.1 * torch.randn_like(p))
    return model


def kl_ckpt_dict(model: AutoencoderKLDecoder) -> dict[str, torch.Tensor]:
    """What kl16.ckpt's "model" dict looks like: decoder weights beside encoder-side ones."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["encoder.conv_in.weight"] = torch.randn(32, 3, 3, 3)
    sd["encoder.down.0.block.0.norm1.weight"] = torch.randn(32)
    sd["quant_conv.weight"] = torch.randn(32, 32, 1, 1)
    sd["quant_conv.bias"] = torch.randn(32)
    return sd


def save_ckpt(tmp_path: Path, sd: dict, name: str = "kl.ckpt") -> Path:
    path = tmp_path / name
    torch.save({"model": sd}, path)
    return path


# ---- parity with the official implementation ------------------------------------------------------
# The fixture's decode (|image| <= 3.1) lies 2.99e-6 from our float64 decode of the same fp16 weights:
# its own float32 rounding. Ours lies up to 3.8e-6 from float64 (1 and 2 threads, with and without
# oneDNN's convolutions) and gets about twice that, so VAE_TOL = 3e-6 + 7e-6; measured
# |ours - fixture| 2.7e-6 to 4.3e-6.
FIXTURE_VAE_ROUNDING = 3e-6
OUR_VAE_ROUNDING = 7e-6
VAE_TOL = FIXTURE_VAE_ROUNDING + OUR_VAE_ROUNDING


@pytest.fixture(scope="module")
def fixture_tensors():
    with safe_open(VAE_FIXTURE, "pt") as f:
        return f.metadata(), f.get_tensor("z"), f.get_tensor("image")


@pytest.mark.parity
@pytest.mark.parametrize("ch_mult", [None, (1, 1, 2)])
def test_decode_matches_official(fixture_tensors, ch_mult):
    meta, z, image = fixture_tensors
    vae = load_vae(VAE_FIXTURE, ch_mult)
    assert vae.config == VAEConfig(embed_dim=int(meta["embed_dim"]), ch=int(meta["ch"]), ch_mult=(1, 1, 2))
    assert next(vae.parameters()).dtype == torch.float32  # fp16 file, fp32 module
    with torch.no_grad():
        out = vae.decode(z)
    assert out.shape == image.shape == (2, 3, 32, 32)
    err = (out - image).abs().max().item()
    assert err <= VAE_TOL, f"max abs error {err:.3e} vs the official decode"


@pytest.mark.parity
def test_float64_decode_brackets_the_official_one(fixture_tensors):
    """What justifies VAE_TOL: our fp32 decode near our float64 one, the fixture within its own
    float32 rounding of it."""
    _, z, image = fixture_tensors
    with torch.no_grad():
        out32 = load_vae(VAE_FIXTURE).decode(z)
        out64 = load_vae(VAE_FIXTURE, dtype=torch.float64).decode(z.double())
    assert (out32.double() - out64).abs().max().item() <= OUR_VAE_ROUNDING
    assert (image.double() - out64).abs().max().item() <= FIXTURE_VAE_ROUNDING


# ---- loading a kl16.ckpt-style file ---------------------------------------------------------------

def test_ckpt_roundtrip(tmp_path):
    ref = random_decoder()
    vae = load_vae(save_ckpt(tmp_path, kl_ckpt_dict(ref)))
    assert vae.config == SMALL
    assert not vae.training
    assert not any(p.requires_grad for p in vae.parameters())
    z = torch.randn(2, 16, 4, 4)
    with torch.no_grad():
        assert torch.equal(vae.decode(z), ref.decode(z))


def test_safetensors_with_model_prefix_and_dtype(tmp_path):
    ref = random_decoder()
    path = tmp_path / "kl16.safetensors"
    sd = {"model." + k: v.half() for k, v in kl_ckpt_dict(ref).items()}
    sd["model.loss.discriminator.weight"] = torch.randn(3)  # training-only, must be ignored
    write_safetensors(sd, path)
    vae = load_vae(path, (1, 2), dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in vae.parameters())
    for k, v in vae.state_dict().items():
        assert torch.equal(v, sd["model." + k].double()), k


def test_infer_config_default_shape():
    cfg = infer_vae_config(AutoencoderKLDecoder(VAEConfig()).state_dict())
    assert cfg == VAEConfig() and cfg.stride == 16


@pytest.mark.parametrize("cfg", [SMALL, VAEConfig(ch=32, ch_mult=(1, 1, 2), num_res_blocks=2, out_channels=4)])
def test_output_shape(cfg):
    vae = AutoencoderKLDecoder(cfg)
    with torch.no_grad():
        out = vae.decode(torch.randn(3, 16, 3, 5))
    assert out.shape == (3, cfg.out_channels, 3 * cfg.stride, 5 * cfg.stride)


# ---- strict errors --------------------------------------------------------------------------------

def test_missing_key(tmp_path):
    sd = kl_ckpt_dict(random_decoder())
    del sd["decoder.mid.attn_1.q.bias"]
    with pytest.raises(CheckpointError, match=r"missing tensors decoder\.mid\.attn_1\.q\.bias"):
        load_vae(save_ckpt(tmp_path, sd))


def test_unexpected_key(tmp_path):
    sd = kl_ckpt_dict(random_decoder())
    sd["decoder.mid.attn_2.q.weight"] = torch.zeros(64, 64, 1, 1)
    with pytest.raises(CheckpointError, match=r"unexpected tensors decoder\.mid\.attn_2\.q\.weight"):
        load_vae(save_ckpt(tmp_path, sd))


def test_wrong_shape(tmp_path):
    sd = kl_ckpt_dict(random_decoder())
    sd["decoder.conv_in.weight"] = torch.zeros(64, 16, 1, 1)
    with pytest.raises(CheckpointError, match=r"decoder\.conv_in\.weight \(expected \(64, 16, 3, 3\), got \(64, 16, 1, 1\)\)"):
        load_vae(save_ckpt(tmp_path, sd))


def test_wrong_ch_mult(tmp_path):
    path = save_ckpt(tmp_path, kl_ckpt_dict(random_decoder()))
    with pytest.raises(CheckpointError, match=r"ch_mult=\(1, 1, 2, 2, 4\) was asked for .* say ch_mult=\(1, 2\)"):
        load_vae(path, ch_mult=(1, 1, 2, 2, 4))


def test_not_a_vae(tmp_path):
    path = save_ckpt(tmp_path, {"blocks.0.weight": torch.zeros(3)})
    with pytest.raises(CheckpointError, match=r"not a KL VAE decoder checkpoint: key 'decoder\.conv_out\.weight'"):
        load_vae(path)


def test_corrupted_file(tmp_path):
    path = tmp_path / "kl16.ckpt"
    path.write_bytes(random.Random(0).randbytes(4096))  # seeded: the same garbage on every run
    with pytest.raises(CheckpointError, match="corrupted"):
        load_vae(path)


def test_truncated_file(tmp_path):
    path = save_ckpt(tmp_path, kl_ckpt_dict(random_decoder()))
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(CheckpointError, match="corrupted or truncated"):
        load_vae(path)


def test_pickled_object_refused(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"model": {"decoder.conv_out.weight": Opaque()}}, path)
    with pytest.raises(CheckpointError, match="objects other than tensors"):
        load_vae(path)


# ---- tiled decoding ----------------------------------------------------------------------------------

def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR of images in [-1, 1] (peak-to-peak 2)."""
    mse = ((a.clamp(-1, 1) - b.clamp(-1, 1)) ** 2).mean().item()
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(4 / mse)).item()


@pytest.fixture(scope="module")
def small_vae():
    return load_vae(VAE_FIXTURE)


@torch.no_grad()
@pytest.mark.parametrize("shape", [(2, 16, 8, 8), (1, 16, 6, 10)])
def test_a_window_covering_the_latent_is_the_untiled_decode(small_vae, shape):
    z = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    assert torch.equal(small_vae.decode(z, tile_size=max(shape[2:])), small_vae.decode(z))
    assert torch.equal(small_vae.decode(z, tile_size=4, tile_overlap=8), small_vae.decode(z))  # the halo covers all


@torch.no_grad()
def test_tiled_decode_of_the_parity_vae(small_vae, fixture_tensors):
    """The fixture's random-weight VAE (stride 4) on its 8x8 latents, against its untiled decode. Its
    GroupNorm statistics are per window, which caps the fidelity; more halo helps. Measured PSNR:
    tile 2 / halo 1: 17.6 dB, tile 2 / halo 2: 22.4 dB, tile 3 / halo 2: 26.2 dB; asserted just below."""
    z = fixture_tensors[1]
    full = small_vae.decode(z)
    measured = {(2, 1): 17.3, (2, 2): 22.1, (3, 2): 25.9}
    for (tile, overlap), floor in measured.items():
        tiled = small_vae.decode(z, tile_size=tile, tile_overlap=overlap)
        assert tiled.shape == full.shape
        assert psnr(tiled, full) >= floor, (tile, overlap)


@torch.no_grad()
def test_tiled_decode_of_the_full_kl16_architecture():
    """KL-16 shapes (stride 16) with torch's default random init, 16x16 and non-square 12x20
    latents. Measured PSNR for tile 8 / halo 2: 27.1 dB (16x16) and 29.9 dB (12x20), asserted just
    below; without a halo 18.1 / 21.4 dB. The remaining seams come from per-window GroupNorm
    statistics (of random weights), not from the blend."""
    from cpu_threads import one_thread  # on a busy machine, two threads spin between the many small operators

    torch.manual_seed(0)
    vae = AutoencoderKLDecoder(VAEConfig()).eval()
    for shape, floor in (((1, 16, 16, 16), 26.8), ((1, 16, 12, 20), 29.6)):
        z = torch.randn(shape)
        with one_thread():
            full = vae.decode(z)
            tiled = vae.decode(z, tile_size=8, tile_overlap=2)
            no_halo = vae.decode(z, tile_size=8, tile_overlap=0)
        assert tiled.shape == full.shape == (1, 3, shape[2] * 16, shape[3] * 16)
        assert psnr(tiled, full) >= floor
        assert psnr(no_halo, full) < psnr(tiled, full)


def test_bad_tile_arguments(small_vae):
    z = torch.zeros(1, 16, 8, 8)
    for kwargs in ({"tile_size": 0}, {"tile_size": 2.5}, {"tile_size": 4, "tile_overlap": -1}):
        with pytest.raises(ValueError, match="tile_size must be a positive"):
            small_vae.decode(z, **kwargs)


# ---- the compiled gather/blend against the PyTorch fallback ----------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# What each compiled version handles, per device (vae_tiling.COMPILED_DTYPES), as test cases.
COMPILED_CASES = [("cpu", torch.float32), ("cpu", torch.float64)] + [
    pytest.param("cuda", dtype, marks=needs_cuda)
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16)]


def test_the_compiled_extension_is_built_here():
    """CI installs with --no-build-isolation, so the C++ extension must be there: a silent fallback
    would leave it untested."""
    import xar_infer

    assert xar_infer.vae_tiling_backend("cpu") == "cpp"


@needs_cuda
def test_the_cuda_extension_is_built_on_a_gpu_machine():
    """On a GPU machine with nvcc, setup.py builds the CUDA version too (see README)."""
    import xar_infer

    assert xar_infer.vae_tiling_backend("cuda") == "cuda"


def test_the_cuda_source_compiles(tmp_path):
    """Without a GPU, nvcc (when installed) still compiles csrc/vae_tiling.cu against this torch's headers
    for Hopper, so that a GPU machine never meets a syntax or type error first. Device code only, to a
    cubin for one architecture (sm_90): nvcc's front end still type-checks the host functions (a wrong
    call in the launchers or in their AT_DISPATCH lambdas fails here), but the host half is not handed
    to the host compiler, which would parse torch's headers twice more; that compiler builds the same
    headers in the CPU extension at every install."""
    import shutil
    import subprocess
    import sysconfig

    from torch.utils import cpp_extension

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH: the CUDA source is compiled only where the CUDA toolkit is installed")
    source = Path(__file__).resolve().parents[1] / "csrc" / "vae_tiling.cu"
    # A CPU build of torch ships the c10/cuda headers but not the one its CMake generates for CUDA
    # builds; that one only declares that c10_cuda is a shared library.
    generated = tmp_path / "include" / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    generated.parent.mkdir(parents=True)
    generated.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    includes = [f"-I{path}" for path in (tmp_path / "include", *cpp_extension.include_paths(),
                                         sysconfig.get_paths()["include"])]
    cubin = tmp_path / "vae_tiling_cuda.cubin"
    command = [nvcc, "--cubin", "-std=c++20", "--fmad=false", "-arch=sm_90", *cpp_extension.COMMON_NVCC_FLAGS,
               "-DTORCH_EXTENSION_NAME=_vae_tiling_cuda", "-DTORCH_API_INCLUDE_EXTENSION_H", *includes, str(source),
               "-o", str(cubin)]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    assert b"gather_kernel" in cubin.read_bytes() and b"blend_kernel" in cubin.read_bytes()


def test_setup_chooses_the_extensions_this_torch_can_build():
    """setup.py's decision, without building: FORCE_CUDA=1 under a torch without CUDA warns and keeps
    the CPU extension (the install must not fail)."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "FORCE_CUDA": "1"}
    result = subprocess.run([sys.executable, "setup.py", "--version"], cwd=root, env=env, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    if torch.version.cuda is None:
        assert "FORCE_CUDA=1, but this torch was built without CUDA; building the CPU extension only" in result.stderr
    else:
        assert "building the CPU extension only" not in result.stderr


def compiled_module(device):
    from xar_infer import vae_tiling as vt

    module = vt._compiled_cuda if device == "cuda" else vt._compiled
    if module is None:  # the two tests above fail in that case; this one has nothing to compare
        pytest.skip(f"the {device} extension is not built")
    return module


@pytest.mark.parametrize("device,dtype", COMPILED_CASES)
def test_compiled_gather_and_blend_equal_the_fallback(device, dtype):
    from xar_infer import vae_tiling as vt

    compiled = compiled_module(device)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 5, 9, 11, generator=g).to(device, dtype)
    rows = torch.tensor([0, 0, 4, 4, 2], dtype=torch.int64)
    cols = torch.tensor([0, 6, 0, 6, 3], dtype=torch.int64)
    assert torch.equal(compiled.gather_tiles(h, rows, cols, 5, 5), vt.gather_tiles_torch(h, rows, cols, 5, 5))

    # Five overlapping windows (the last overlaps all four), blended in one call: the order of the sums matters.
    scale, ramp = 4, 6
    tiles = torch.randn(5 * 3, 2, 20, 20, generator=g).to(device, dtype)
    wy = vt.window_weights([r * scale for r in rows.tolist()], 20, 36, ramp, device, dtype)
    wx = vt.window_weights([c * scale for c in cols.tolist()], 20, 44, ramp, device, dtype)
    results = []
    for blend in (compiled.blend_tiles_, vt.blend_tiles_torch_):
        out = torch.randn(3, 2, 36, 44, generator=torch.Generator().manual_seed(1)).to(device, dtype)
        weight_sum = torch.zeros(36, 44, device=device, dtype=dtype)
        blend(out, weight_sum, tiles, rows, cols, wy, wx, scale)
        results.append((out, weight_sum))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    assert (results[0][1][:20, :20] > 0).all()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_compiled_blend_refuses_mismatched_weights(device):
    compiled = compiled_module(device)
    out, weight_sum = torch.zeros(1, 2, 8, 8, device=device), torch.zeros(8, 8, device=device)
    tiles = torch.zeros(1, 2, 8, 8, device=device)
    rows = cols = torch.zeros(1, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="wy and wx must be"):
        compiled.blend_tiles_(out, weight_sum, tiles, rows, cols, torch.ones(1, 7, device=device),
                              torch.ones(1, 8, device=device), 1)
    with pytest.raises(RuntimeError, match="share one dtype"):
        compiled.blend_tiles_(out, weight_sum, tiles, rows, cols, torch.ones(1, 8, device=device, dtype=torch.float64),
                              torch.ones(1, 8, device=device), 1)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_compiled_and_fallback_decode_alike(small_vae, monkeypatch, device):
    from xar_infer import vae_tiling as vt

    compiled_module(device)
    z = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(1)).to(device)
    try:
        vae = small_vae.to(device)  # the fixture is shared: moved back below
        with torch.no_grad():
            compiled = vae.decode(z, tile_size=3, tile_overlap=2)
            monkeypatch.setattr(vt, "_compiled_cuda" if device == "cuda" else "_compiled", None)
            assert vt.vae_tiling_backend(device) == "torch"
            fallback = vae.decode(z, tile_size=3, tile_overlap=2)
    finally:
        small_vae.to("cpu")
    assert torch.equal(compiled, fallback)
