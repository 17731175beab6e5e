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


# ---- the habits diffusers users bring -------------------------------------------------------------

@pytest.mark.parametrize("source", ["xar-digits", "tiny"])
def test_torch_dtype_is_another_name_for_dtype(source, tiny_checkpoint):
    source = tiny_checkpoint if source == "tiny" else source
    assert XARPipeline.from_pretrained(source, torch_dtype=torch.bfloat16).dtype == torch.bfloat16
    assert XARPipeline.from_pretrained(source, dtype=torch.bfloat16).dtype == torch.bfloat16
    assert XARPipeline.from_pretrained(source).dtype == torch.float32
    with pytest.raises(ValueError, match="pass the dtype once: dtype and torch_dtype are two names of one argument"):
        XARPipeline.from_pretrained(source, dtype=torch.float32, torch_dtype=torch.float32)


def test_to_takes_a_device_a_dtype_or_both_in_any_form(pipe):
    vae_dtype = next(pipe.vae.parameters()).dtype
    assert pipe.to(torch.bfloat16) is pipe and pipe.dtype == torch.bfloat16
    assert pipe.to("cpu").dtype == torch.bfloat16 and pipe.device.type == "cpu"
    assert pipe.to("cpu", torch.float16).dtype == torch.float16
    assert pipe.to(torch.device("cpu"), dtype=torch.float32).dtype == torch.float32
    assert pipe.to(dtype=torch.bfloat16, device="cpu").dtype == torch.bfloat16
    assert pipe.to(None, torch.float32).dtype == torch.float32
    assert next(pipe.vae.parameters()).dtype == vae_dtype  # the VAE keeps its own dtype
    for args, kwargs, message in [((torch.float16, torch.float32), {}, "two dtypes"),
                                  (("cpu",), {"device": "cpu"}, "two devices"),
                                  ((torch.float16,), {"dtype": torch.float32}, "two dtypes"),
                                  ((1.5,), {}, "takes a device")]:
        with pytest.raises(ValueError, match=message):
            pipe.to(*args, **kwargs)


def test_labels_and_get_label_ids_on_imagenet_and_digits(pipe):
    labels = pipe.labels
    assert labels["golden retriever"] == 207 and labels["Tinca tinca"] == 0 and "crane" not in labels
    # A class is left out only when each of its names is another class's too: those take their id.
    unnamed = sorted(set(range(1000)) - set(labels.values()))
    assert unnamed == [86, 134, 474, 517, 594, 638, 657]  # partridge, crane, cardigan, crane, harp, maillot, missile
    from xar_infer.imagenet import IMAGENET_SYNSET_WORDS
    for class_id in unnamed:
        for name in IMAGENET_SYNSET_WORDS[class_id].split(", "):
            with pytest.raises(ValueError, match="is ambiguous"):
                pipe.get_label_ids(name)
    names = list(labels)[::97]
    assert pipe.get_label_ids(names) == [labels[n] for n in names]
    assert pipe.get_label_ids("goldfish") == [1]
    with pytest.raises(ValueError, match="'crane' is ambiguous; it matches 134 .*517"):
        pipe.get_label_ids(["crane"])
    with pytest.raises(ValueError, match="unknown ImageNet class name 'golden retreiver'. Did you mean: 207"):
        pipe.get_label_ids(["golden retreiver"])

    digits = XARPipeline.from_pretrained("xar-digits")
    assert digits.labels == {str(d): d for d in range(10)}
    assert digits.get_label_ids(["7", "0", 3]) == [7, 0, 3]
    with pytest.raises(ValueError, match="class names are only available for ImageNet-1k models"):
        digits.get_label_ids(["seven"])


def test_output_indexes_like_diffusers(pipe):
    out = pipe([1], num_inference_steps=1, output_type="latent")
    assert out[0] is out.images and out["images"] is out.images and out.to_tuple() == (out.images,)
    (images,) = out.to_tuple()
    assert images is out.images
    with pytest.raises(KeyError, match="holds 'images' only"):
        out["latents"]
    with pytest.raises(IndexError):
        out[1]


# ---- callback_on_step_end -------------------------------------------------------------------------

class Recorder:
    """A callback that keeps what it was given, and optionally acts at one step."""

    def __init__(self, at: int | None = None, act=None):
        self.calls, self.at, self.act = [], at, act

    def __call__(self, pipe, step, t, kwargs):
        self.calls.append((step, t, {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}))
        if step == self.at:
            return self.act(pipe, kwargs)
        return kwargs  # unchanged, as diffusers' examples return it


ALL_INPUTS = ["x", "cell_index", "finished_latent"]


def test_callback_runs_after_every_evaluation_with_what_it_asks_for(pipe):
    """Heun with a step count per cell: 2N-1 evaluations per cell (5 + 3 + 3 + 1), each reported once, with
    the sampler's state and the finished cells; returning the kwargs unchanged changes nothing."""
    reference = _run(pipe, output_type="latent", sampler="heun", num_inference_steps=[3, 2, 2, 1])
    recorder = Recorder()
    latent = _run(pipe, output_type="latent", sampler="heun", num_inference_steps=[3, 2, 2, 1],
                  callback_on_step_end=recorder, callback_on_step_end_tensor_inputs=ALL_INPUTS)
    assert torch.equal(latent, reference)
    assert [step for step, _, _ in recorder.calls] == list(range(12))
    assert [kw["cell_index"] for _, _, kw in recorder.calls] == [0] * 5 + [1] * 3 + [2] * 3 + [3]
    # Heun on a uniform grid of 3 steps evaluates at 1, 2/3, 2/3, 1/3, 1/3: the corrector re-evaluates each time.
    assert [t for _, t, _ in recorder.calls[:5]] == pytest.approx([1, 2 / 3, 2 / 3, 1 / 3, 1 / 3])
    for _, _, kw in recorder.calls:
        assert kw["x"].shape == (2, 64, 16) and kw["x"].dtype == torch.float64
        assert kw["finished_latent"].shape == (2, 16, 16, 16) and kw["finished_latent"].dtype == torch.float32
    # After a cell's last evaluation, x is that cell and the finished latent holds it, in place.
    for step, cell in ((4, 0), (7, 1), (10, 2), (11, 3)):
        kw = recorder.calls[step][2]
        row, column = divmod(cell, 2)
        window = (..., slice(8 * row, 8 * row + 8), slice(8 * column, 8 * column + 8))
        assert torch.equal(kw["finished_latent"][window], reference[window])
        assert torch.equal(kw["finished_latent"], torch.where(_cells_mask(cell + 1), reference, 0))
    assert not recorder.calls[3][2]["finished_latent"].any()  # cell 0 not yet finished
    assert list(recorder.calls[0][2]) == ALL_INPUTS


def _cells_mask(count: int) -> torch.Tensor:
    """True over the first ``count`` 8x8 cells of a 16x16 latent (raster order)."""
    mask = torch.zeros(16, 16, dtype=torch.bool)
    for cell in range(count):
        row, column = divmod(cell, 2)
        mask[8 * row:8 * row + 8, 8 * column:8 * column + 8] = True
    return mask


def _network_inputs(pipe) -> list[torch.Tensor]:
    """Record the tokens of every network call of ``pipe``."""
    seen = []
    pipe.transformer.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    return seen


def test_a_returned_x_replaces_the_state_for_the_next_evaluation(pipe):
    """Mid-cell, the next network call reads the replacement (x is sampled in float64, the network reads
    it in its dtype); the same state given back as a new tensor changes nothing."""
    reference = _run(pipe, output_type="latent", guidance_scale=1.0)
    same = Recorder(at=1, act=lambda p, kw: {"x": kw["x"].clone()})
    assert torch.equal(_run(pipe, output_type="latent", guidance_scale=1.0, callback_on_step_end=same), reference)

    replacement = torch.randn(2, 64, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    seen = _network_inputs(pipe)
    changed = _run(pipe, output_type="latent", guidance_scale=1.0,
                   callback_on_step_end=Recorder(at=0, act=lambda p, kw: {"x": replacement}))
    assert torch.equal(seen[1], replacement.float())  # call 1: cell 0's second evaluation, unguided
    assert not torch.equal(changed, reference)
    # Editing x in place is the same replacement.
    def edit(p, kw):
        kw["x"].copy_(replacement)
        return {}
    in_place = _run(pipe, output_type="latent", guidance_scale=1.0, callback_on_step_end=Recorder(at=0, act=edit))
    assert torch.equal(in_place, changed)


def test_a_replaced_finished_cell_is_the_output_and_the_next_cell_s_context(pipe):
    cell = torch.full((2, 64, 16), 0.25, dtype=torch.float64)
    seen = _network_inputs(pipe)
    # Step 2 is cell 0's last of 3 evaluations.
    latent = _run(pipe, output_type="latent", callback_on_step_end=Recorder(at=2, act=lambda p, kw: {"x": cell}))
    assert (latent[..., :8, :8] == 0.25).all()
    # Cell 1's first call carries the previous cell for each image and guidance half: [prefix, x, ...].
    prefix_rows = seen[3].view(-1, 2, 64, 16)[:, 0]
    assert (prefix_rows == 0.25).all()


def test_interrupt_stops_at_once_and_returns_the_finished_cells(pipe):
    reference = _run(pipe, output_type="latent")
    def stop_at(step):
        def act(p, kw):
            p.interrupt = True
            return {}
        return Recorder(at=step, act=act)

    for step, finished in ((4, 1), (5, 2), (1, 0), (11, 4)):  # 3 evaluations per cell
        recorder = stop_at(step)
        latent = _run(pipe, output_type="latent", callback_on_step_end=recorder)
        assert len(recorder.calls) == step + 1 and pipe.interrupt
        assert torch.equal(latent, torch.where(_cells_mask(finished), reference, 0))
    # Images decode what exists; the next call starts with the flag cleared and runs whole.
    assert _run(pipe, output_type="pil", callback_on_step_end=stop_at(4))[0].size == (32, 32)
    assert torch.equal(_run(pipe, output_type="latent"), reference) and not pipe.interrupt

    def diffusers_habit(p, step, t, kw):
        p._interrupt = True
        return {}
    assert torch.equal(_run(pipe, output_type="latent", callback_on_step_end=diffusers_habit),
                       torch.zeros_like(reference))


def test_interrupting_one_pipeline_leaves_another_running_alongside(pipe):
    """Two pipelines on one transformer, called at once from two threads: one stops, the other finishes."""
    import threading

    other = XARPipeline(pipe.transformer, pipe.vae)
    other.set_progress_bar_config(disable=True)
    reference = _run(pipe, output_type="latent")
    together = threading.Barrier(2, timeout=60)

    def meet_then(stop: bool):
        def callback(p, step, t, kw):
            if step == 1:
                together.wait()  # both calls are under way
                p.interrupt = stop
            return {}
        return callback

    results = {}
    threads = [threading.Thread(target=lambda name, p, stop: results.__setitem__(
        name, _run(p, output_type="latent", callback_on_step_end=meet_then(stop))), args=args)
        for args in (("stopped", pipe, True), ("running", other, False))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert torch.equal(results["running"], reference)
    assert torch.equal(results["stopped"], torch.zeros_like(reference))


def test_the_graphed_network_calls_the_callback_the_same_way(pipe):
    """With CUDA graphs (replayed without capture off CUDA, as in tests/test_cuda_graphs.py) the callback
    runs between the calls: the same steps and tensors, and a replacement lands the same way."""
    from xar_infer.cuda_graphs import CUDAGraphs

    replacement = torch.ones(2, 64, 16, dtype=torch.float64)
    runs = {}
    for graphed in (False, True):
        pipe._cuda_graphs = CUDAGraphs(capture=False) if graphed else None
        recorder = Recorder(at=4, act=lambda p, kw: {"x": replacement})
        latent = _run(pipe, output_type="latent", callback_on_step_end=recorder,
                      callback_on_step_end_tensor_inputs=ALL_INPUTS)
        runs[graphed] = (latent, recorder.calls)
    assert pipe._cuda_graphs.num_graphs > 0
    (eager, eager_calls), (graphed, graphed_calls) = runs[False], runs[True]
    assert torch.equal(graphed, eager) and len(graphed_calls) == len(eager_calls) == 12
    for (s1, t1, kw1), (s2, t2, kw2) in zip(eager_calls, graphed_calls):
        assert (s1, t1, kw1["cell_index"]) == (s2, t2, kw2["cell_index"])
        assert torch.equal(kw1["x"], kw2["x"]) and torch.equal(kw1["finished_latent"], kw2["finished_latent"])


def test_callbacks_with_the_engine_exactness_of_the_default_path(pipe):
    """No callback, or one that changes nothing, keeps the latents the engine gives (bit for bit)."""
    from xar_infer.engine.engine import generate_latents
    from xar_infer.backends import TORCH
    from xar_infer.sampling import NoiseSource
    from xar_infer.settings import SamplingSettings

    settings = SamplingSettings.build(4, 3, 2.0)
    noise = NoiseSource(torch.Generator().manual_seed(0), 2, torch.device("cpu"))
    engine = generate_latents(pipe.transformer, torch.tensor([1, 2]), settings, noise, TORCH)
    assert torch.equal(_run(pipe, output_type="latent"), engine)
    assert torch.equal(_run(pipe, output_type="latent", callback_on_step_end=lambda *a: None), engine)


@pytest.mark.parametrize("kwargs, message", [
    (dict(callback_on_step_end_tensor_inputs=["x"]), "pass callback_on_step_end too"),
    (dict(callback_on_step_end="print"), "callback_on_step_end must be a function"),
    (dict(callback_on_step_end=lambda *a: {}, callback_on_step_end_tensor_inputs=["latents"]),
     r"'latents' is not one of \('x', 'cell_index', 'finished_latent'\)"),
    (dict(callback_on_step_end=lambda *a: {}, callback_on_step_end_tensor_inputs="x"), "must be a list of names"),
    (dict(callback_on_step_end=lambda *a: [1]), "must return a dict"),
    (dict(callback_on_step_end=lambda *a: {"latents": torch.zeros(1)}), "returned 'latents', which is not one of"),
    (dict(callback_on_step_end=lambda *a: {"finished_latent": torch.zeros(1)}), "for reading only"),
    (dict(callback_on_step_end=lambda *a: {"x": torch.zeros(1, 64, 16)}), r"x of shape \(1, 64, 16\); it must keep"),
])
def test_bad_callbacks_get_one_line(pipe, kwargs, message):
    with pytest.raises(ValueError, match=message) as raised:
        _run(pipe, output_type="latent", **kwargs)
    assert "\n" not in str(raised.value)


def test_the_readme_s_preview_line_works(pipe):
    """The README's callback preview, run as written: one decoded image per evaluation, showing the
    finished cells (none, then cell 0, ..., then the whole image)."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    snippet = readme.split("# Watch the cells form", 1)[1].split("\n\n", 1)[0].split("\n", 1)[1]
    assert "callback_on_step_end=" in snippet
    pipe.default_num_inference_steps = 2
    scope = {"pipe": pipe}
    torch.manual_seed(0)  # the snippet passes no generator: torch's default one draws the noise
    exec(snippet, scope)
    torch.manual_seed(0)
    latent = pipe(207, output_type="latent").images
    previews = scope["previews"]
    assert len(previews) == 8  # 2 evaluations per cell, 4 cells
    for step, finished in ((0, 0), (1, 1), (4, 2), (7, 4)):
        assert torch.equal(previews[step], pipe.decode(torch.where(_cells_mask(finished), latent, 0)))
