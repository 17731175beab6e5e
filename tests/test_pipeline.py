"""XARPipeline: output types, decoding, argument checks, class names, progress bar, dtypes."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from xar_infer import XARPipeline, load_vae


@pytest.fixture
def pipe(tiny_checkpoint, tiny_vae_checkpoint):
    pipe = XARPipeline.from_pretrained(tiny_checkpoint, vae=tiny_vae_checkpoint)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run(pipe, labels=(1, 2), seed=0, **kwargs):
    kwargs.setdefault("num_inference_steps", 3)
    kwargs.setdefault("guidance_scale", 2.0)
    return pipe(list(labels), generator=torch.Generator().manual_seed(seed), **kwargs).images


def test_output_types_agree(pipe, tiny_vae_checkpoint):
    latent = _run(pipe, output_type="latent")
    pt = _run(pipe, output_type="pt")
    np_images = _run(pipe, output_type="np")
    pil = _run(pipe, output_type="pil")
    assert latent.shape == (2, 16, 16, 16)
    assert pt.shape == (2, 3, 32, 32) and pt.min() >= 0 and pt.max() <= 1
    assert isinstance(np_images, np.ndarray) and np_images.shape == (2, 32, 32, 3)
    assert np.array_equal(np_images, pt.permute(0, 2, 3, 1).numpy())
    assert all(isinstance(im, Image.Image) and im.size == (32, 32) and im.mode == "RGB" for im in pil)
    assert np.array_equal(np.asarray(pil[1]), np.round(np.clip(np_images[1] * 255, 0, 255)).astype(np.uint8))
    # Decoding is the official recipe: vae.decode(latent / 0.2325), then (x + 1) / 2.
    vae = load_vae(tiny_vae_checkpoint)
    expected = ((vae.decode(latent / 0.2325) + 1) / 2).clamp(0, 1)
    assert torch.allclose(pt, expected, atol=1e-6)


def test_return_dict_false(pipe):
    out = pipe([1], num_inference_steps=2, output_type="latent", return_dict=False)
    assert isinstance(out, tuple) and out[0].shape == (1, 16, 16, 16)


def test_class_names_resolve(pipe):
    by_name = _run(pipe, labels=("goldfish", "Tinca tinca"), output_type="latent")
    by_id = _run(pipe, labels=(1, 0), output_type="latent")
    assert torch.equal(by_name, by_id)


def test_single_label_and_tensor_labels(pipe):
    one = pipe(207, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="latent").images
    tensor = pipe(torch.tensor([207]), num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                  output_type="latent").images
    assert one.shape == (1, 16, 16, 16) and torch.equal(one, tensor)


def test_defaults_come_from_the_checkpoint(pipe):
    # an architecture that is no preset: 50 steps, no guidance
    assert (pipe.default_num_inference_steps, pipe.default_guidance_scale) == (50, 1.0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_inference_steps=0), "num_inference_steps must be a positive integer"),
    (dict(num_inference_steps=-2), "num_inference_steps must be a positive integer"),
    (dict(num_inference_steps=2.5), "num_inference_steps must be a positive integer"),
    (dict(num_inference_steps=True), "num_inference_steps must be a positive integer"),
    (dict(guidance_scale=0.5), "guidance_scale must be a finite number >= 1"),
    (dict(guidance_scale=float("nan")), "guidance_scale must be a finite number >= 1"),
    (dict(guidance_scale=float("inf")), "guidance_scale must be a finite number >= 1"),
    (dict(output_type="jpg"), "output_type must be one of"),
    (dict(sampler="ddim"), "sampler must be one of"),
    (dict(guidance_schedule="cosine"), "guidance_schedule must be one of"),
    (dict(num_inference_steps=[3, 2]), "a list of 4 of them"),
    (dict(num_inference_steps=[3, 2, 0, 1]), "a list of 4 of them"),
    (dict(guidance_interval=(0.8, 0.2)), "guidance_interval must be"),
    (dict(guidance_interval=(0.1, 1.5)), "guidance_interval must be"),
    (dict(guidance_interval=0.5), "guidance_interval must be"),
])
def test_bad_arguments(pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        _run(pipe, **kwargs)


@pytest.mark.parametrize("labels, message", [
    (("crane",), "ambiguous"),
    (("golden retreiver",), "golden retriever"),
    ((1000,), "out of range"),
    ((), "no class labels"),
])
def test_bad_labels(pipe, labels, message):
    with pytest.raises(ValueError, match=message):
        _run(pipe, labels=labels)


def test_images_need_a_vae(tiny_checkpoint):
    pipe = XARPipeline.from_pretrained(tiny_checkpoint)
    pipe.set_progress_bar_config(disable=True)
    with pytest.raises(ValueError, match="no VAE"):
        _run(pipe)
    assert _run(pipe, output_type="latent").shape == (2, 16, 16, 16)


def test_progress_bar_can_be_switched_off(pipe, capsys):
    pipe.set_progress_bar_config(disable=False, desc="xar")
    _run(pipe, output_type="latent")
    assert "xar" in capsys.readouterr().err
    pipe.set_progress_bar_config(disable=True)
    _run(pipe, output_type="latent")
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_runs_close_to_fp32(tiny_checkpoint, dtype):
    """Half-precision weights with the sampler state in float64: the result stays near fp32's. The bound
    is this random model's sensitivity, not a quality claim: measured relative errors are 0.008 (fp16)
    and 0.04 (bf16), about 2^-7 and 2^-5, i.e. a few units of each format's rounding; bounds are 4x that."""
    ref = XARPipeline.from_pretrained(tiny_checkpoint)
    low = XARPipeline.from_pretrained(tiny_checkpoint, dtype=dtype)
    assert low.dtype == dtype
    for p in (ref, low):
        p.set_progress_bar_config(disable=True)
    a = _run(ref, output_type="latent")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        b = _run(low, output_type="latent")
    # float16 on CPU runs, with advice: its matrix products are very slow on most CPUs.
    advice = [w for w in caught if "float16 matrix products are very slow" in str(w.message)]
    assert len(advice) == (dtype == torch.float16)
    assert b.dtype == torch.float32 and torch.isfinite(b).all()
    relative = ((a - b).norm() / a.norm()).item()
    assert relative < (0.03 if dtype == torch.float16 else 0.16)


def test_to_casts_the_transformer_and_keeps_rope_exact(tiny_checkpoint):
    pipe = XARPipeline.from_pretrained(tiny_checkpoint).to(dtype=torch.float16)
    assert pipe.dtype == torch.float16 and pipe.transformer.rope_cos.dtype == torch.float32


def test_opt_in_fast_settings(pipe):
    """A step count per cell and a guidance interval run through the pipeline (the sampler tests check
    their results against the released loop)."""
    pipe.set_progress_bar_config(disable=True)
    base = _run(pipe, output_type="latent")
    tapered = _run(pipe, output_type="latent", num_inference_steps=[3, 2, 2, 1])
    interval = _run(pipe, output_type="latent", guidance_interval=(0.2, 0.8))
    assert tapered.shape == base.shape and torch.isfinite(tapered).all()
    assert (tapered - base).abs().max() > 1e-4 and (interval - base).abs().max() > 1e-4
    assert torch.equal(base[..., :8, :8], tapered[..., :8, :8])  # cell 0 keeps its 3 steps


def test_tiled_vae_decoding_switch(pipe):
    """``vae_tile_size`` reaches the VAE: a window covering the 16x16 latent is the untiled decode."""
    untiled = _run(pipe, output_type="pt")
    assert torch.equal(_run(pipe, output_type="pt", vae_tile_size=16), untiled)
    tiled = _run(pipe, output_type="pt", vae_tile_size=4, vae_tile_overlap=2)
    assert tiled.shape == untiled.shape and not torch.equal(tiled, untiled)


def test_cuda_graphs_switch(pipe):
    """Off CUDA the switch refuses with the fix; the pipeline passes its graphs to every call (run here
    without capturing, as the CUDA-graph tests do; the real capture is tested on a GPU)."""
    from xar_infer.cuda_graphs import CUDAGraphs

    with pytest.raises(ValueError, match="need the pipeline on a CUDA device, not cpu: call pipe.to"):
        pipe.enable_cuda_graphs()
    eager = _run(pipe, output_type="latent")
    pipe._cuda_graphs = CUDAGraphs(capture=False)
    assert torch.equal(_run(pipe, output_type="latent"), eager)
    assert pipe._cuda_graphs.num_graphs == 7
    pipe.disable_cuda_graphs()
    assert pipe._cuda_graphs is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graphs_give_the_eager_images_on_cuda(tiny_checkpoint, tiny_vae_checkpoint):
    pipe = XARPipeline.from_pretrained(tiny_checkpoint, vae=tiny_vae_checkpoint, device="cuda", dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    run = lambda seed: pipe([1, 2], num_inference_steps=3, guidance_scale=2.0, output_type="pt",  # noqa: E731
                            generator=torch.Generator("cuda").manual_seed(seed)).images
    eager = [run(0), run(1)]
    pipe.enable_cuda_graphs()
    assert torch.equal(run(0), eager[0]) and torch.equal(run(1), eager[1])
    assert pipe._cuda_graphs.num_graphs == 7


@pytest.mark.parametrize("dtype, advice", [
    (torch.float16, "use dtype=torch.bfloat16"),
    (torch.bfloat16, "try dtype=torch.float32"),
    (torch.float32, "check them"),
])
def test_the_nan_guard_advises_only_what_can_help(dtype, advice):
    from xar_infer.errors import NumericalError
    from xar_infer.pipeline import check_finite

    values = torch.zeros(3, 4)
    values[1, 2] = float("nan")
    with pytest.raises(NumericalError, match=r"image\(s\) \[1\] hold inf or NaN") as raised:
        check_finite(values, "latents", dtype)
    message = str(raised.value)
    assert advice in message
    if dtype == torch.float32:  # already the exact mode: fp32 is no advice
        assert "dtype=torch.float32" not in message
