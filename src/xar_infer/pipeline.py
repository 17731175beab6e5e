"""XARPipeline: class labels in, images out, with diffusers' conventions."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .backends import resolve_backend
from .cuda_graphs import CUDAGraphs
from .errors import InvalidArgumentError, NumericalError
from .hub import push_model_folder, save_model_folder
from .imagenet import label_ids, resolve_class_labels
from .loading import load_pretrained
from .memory import require_memory
from .model import XARTransformer
from .engine import EagerNetwork, Engine
from .engine.engine import generate_latents
from .sampling import NoiseSource, Step, StopSampling, cells_to_latent
from .settings import SamplingSettings
from .vae import AutoencoderKLDecoder, load_vae
from .vae_tiling import DEFAULT_TILE_OVERLAP

OUTPUT_TYPES = ("pil", "np", "pt", "latent")

# Measured on this project's CPU (AMD EPYC, AVX512-BF16), dense matmuls: float16 1 GFLOP/s, float32
# 168, bfloat16 783. Most CPUs have no fast float16 matmul; recent ones have a bfloat16 one.
CPU_FLOAT16_ADVICE = ("float16 matrix products are very slow on most CPUs (here 170x slower than float32); "
                      "on CPU use dtype=torch.bfloat16 (fast where the CPU has bfloat16 instructions) or torch.float32")


# What callback_on_step_end can ask for (callback_on_step_end_tensor_inputs), and what it may return.
CALLBACK_INPUTS = ("x", "cell_index", "finished_latent")
CALLBACK_REPLACEABLE = ("x",)


@dataclass
class XARPipelineOutput:
    """``images``: a list of PIL images, an array [B, H, W, 3] in [0, 1] (``np``), a tensor
    [B, 3, H, W] in [0, 1] (``pt``), or the latent [B, C, h, w] before VAE scaling (``latent``).

    As diffusers' outputs: ``out.images``, ``out[0]``, ``out["images"]`` and ``out.to_tuple()``.
    """

    images: list[Image.Image] | np.ndarray | torch.Tensor

    def to_tuple(self) -> tuple:
        return (self.images,)

    def __getitem__(self, key: int | str):
        if isinstance(key, str):
            if key != "images":
                raise KeyError(f"{key!r}: an XARPipelineOutput holds 'images' only")
            return self.images
        return self.to_tuple()[key]


class XARPipeline:
    """Class-conditional image generation with an xAR transformer and a KL VAE decoder.

    Example::

        pipe = XARPipeline.from_pretrained("xar-b", vae="kl16.ckpt", device="cuda", dtype=torch.bfloat16)
        images = pipe(["golden retriever", 88], generator=torch.Generator("cuda").manual_seed(0)).images
        images[0].save("retriever.png")
    """

    def __init__(self, transformer: XARTransformer, vae: AutoencoderKLDecoder | None = None, *,
                 num_inference_steps: int = 50, guidance_scale: float = 1.0, backend: str = "auto"):
        self.transformer = transformer
        resolve_backend(backend, transformer.device)  # fail now, not at the first call
        self.backend = backend
        self.vae = vae
        self.default_num_inference_steps = num_inference_steps
        self.default_guidance_scale = guidance_scale
        self._progress_bar_config: dict = {}
        self._cuda_graphs: CUDAGraphs | None = None
        self._interrupt = False

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, vae: str | os.PathLike | AutoencoderKLDecoder | None = None, *,
                        dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                        revision: str | None = None, cache_dir: str | os.PathLike | None = None,
                        local_files_only: bool = False, backend: str = "auto", sha256: str | None = None,
                        variant: str | None = None, token: str | bool | None = None, force_download: bool = False,
                        torch_dtype: torch.dtype | None = None) -> "XARPipeline":
        """Load a transformer and, optionally, the VAE.

        ``name_or_path``: a preset (``"xar-b"``, ``"xar-l"``, ``"xar-h"``: the released weights from the
        Hugging Face Hub), a local released ``.pth``, a ``.safetensors`` file, a folder written by
        ``save_pretrained`` or ``xar-convert``, or a Hub repo id holding such a folder. ``vae``: MAR's
        ``kl16.ckpt`` (or a safetensors export) or an already loaded decoder; by default the VAE saved
        in the folder, if any. Without one only ``output_type="latent"`` works, except for pixel-space
        models such as ``"xar-digits"``, which need none.

        ``dtype`` (default ``torch.float32``, the exact mode): what the transformer runs in, whatever
        precision its file stores. ``torch_dtype`` is accepted as another name for it, because most
        diffusers code passes that; ``dtype`` is the name here, as in torch and in diffusers since 0.40,
        and passing both is an error. The VAE stays fp32 unless you pass a decoder in another dtype.
        ``variant="bf16"`` loads a folder's ``model.bf16.safetensors`` (half the download) instead of
        ``model.safetensors``. ``token``, ``force_download``, ``revision``, ``cache_dir`` and
        ``local_files_only`` concern Hub downloads. ``backend``: ``"auto"`` (the fused Triton kernels
        on CUDA when triton is installed, PyTorch otherwise), ``"torch"`` or ``"triton"``; it is
        resolved for the pipeline's device at each call, so ``.to("cuda")`` works. ``sha256``: the
        expected digest of the transformer's weights file (downloaded or local).

        Example::

            pipe = XARPipeline.from_pretrained("someone/xar-b", variant="bf16", torch_dtype=torch.bfloat16)
        """
        if dtype is not None and torch_dtype is not None:
            raise InvalidArgumentError("pass the dtype once: dtype and torch_dtype are two names of one argument "
                                       "(dtype is the one used here)")
        dtype = dtype if dtype is not None else torch_dtype if torch_dtype is not None else torch.float32
        loaded = load_pretrained(name_or_path, dtype=dtype, device=device, revision=revision,
                                 cache_dir=cache_dir, local_files_only=local_files_only, sha256=sha256,
                                 variant=variant, token=token, force_download=force_download)
        if vae is None:
            vae = loaded.vae_path
        if vae is not None and not isinstance(vae, AutoencoderKLDecoder):
            vae = load_vae(vae, device=device)
        return cls(loaded.model, vae, num_inference_steps=loaded.num_inference_steps,
                   guidance_scale=loaded.guidance_scale, backend=backend)

    def save_pretrained(self, save_directory: str | os.PathLike, variant: str | None = None,
                        safe_serialization: bool = True, *, overwrite: bool = False) -> None:
        """Write this pipeline as a folder that ``from_pretrained`` loads back: ``model.safetensors``
        (``model.bf16.safetensors`` with ``variant="bf16"``), ``config.json`` (architecture and the
        sampling defaults), the VAE in ``vae/`` when there is one, and a ``README.md`` model card.

        ``variant=None`` stores the weights in the precision they have; ``"bf16"`` in bfloat16, which
        loads back into any ``dtype``. Weights are safetensors only (``safe_serialization=False``, a
        pickle, is refused). Each file appears whole; identical files already there are kept, and a
        folder holding a different save is refused unless ``overwrite=True``. Both variants can share a
        folder. ``xar-convert`` is the command line of this method.

        Example::

            pipe.save_pretrained("xar-b-hub", variant="bf16")
            pipe = XARPipeline.from_pretrained("xar-b-hub", variant="bf16", dtype=torch.bfloat16)
        """
        if safe_serialization is not True:
            raise InvalidArgumentError("safe_serialization=False would pickle the weights, which xar_infer never does: "
                                       "leave it out (safetensors)")
        save_model_folder(save_directory, self.transformer, self.default_num_inference_steps,
                          self.default_guidance_scale, self.vae, variant=variant, overwrite=overwrite)

    def push_to_hub(self, repo_id: str, *, token: str | None = None, private: bool | None = None,
                    variant: str | None = None, commit_message: str | None = None):
        """Upload the folder ``save_pretrained`` writes to the Hub repo ``repo_id``, creating the repo if
        needed (``private`` applies then). Written to a temporary folder first, then uploaded in one
        commit; returns huggingface_hub's ``CommitInfo``. ``token``: default, huggingface_hub's login.

        Example::

            pipe.push_to_hub("me/xar-b", variant="bf16", private=True)
        """
        return push_model_folder(repo_id, self.transformer, self.default_num_inference_steps,
                                 self.default_guidance_scale, self.vae, variant=variant, token=token,
                                 private=private, commit_message=commit_message)

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(height, width, channels) of the images this pipeline makes."""
        config = self.transformer.config
        if config.pixel_space:
            return config.grid_size, config.grid_size, config.token_channels
        if self.vae is None:
            raise InvalidArgumentError("this pipeline has no VAE, so it makes no images, only latents: pass "
                                       "vae='path/to/kl16.ckpt' to from_pretrained")
        side = config.grid_size * self.vae.config.stride
        return side, side, self.vae.config.out_channels

    def memory_needed(self, num_images: int, output_type: str = "pil", guided: bool = True,
                      vae_tile_size: int | None = None, vae_tile_overlap: int = DEFAULT_TILE_OVERLAP) -> int:
        """Bytes that one call making ``num_images`` images holds at once on the pipeline's device, counting
        its large buffers: the KV cache (both guidance halves when ``guided``) and, when decoding, the decoder's two
        widest activations (a convolution's input and output at full resolution, or at the tile's
        window) and the images themselves."""
        config = self.transformer.config
        rows = num_images * (2 if guided else 1)
        needed = 2 * config.num_layers * rows * config.seq_len * config.dim * self.dtype.itemsize
        if output_type == "latent":
            return needed
        height, width, channels = self.image_shape
        needed += num_images * height * width * channels * 4
        if self.vae is not None and not config.pixel_space:
            vae = self.vae.config
            window = height if vae_tile_size is None else min(height, (vae_tile_size + 2 * vae_tile_overlap) * vae.stride)
            element = next(self.vae.parameters()).element_size()
            needed += 2 * num_images * vae.ch * vae.ch_mult[0] * window * window * element
        return needed

    def to(self, *args, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "XARPipeline":
        """Move the transformer (and the VAE, which keeps its own dtype) to a device and/or cast the
        transformer to a dtype, in any of the ways torch and diffusers take them: ``pipe.to("cuda")``,
        ``pipe.to(torch.bfloat16)``, ``pipe.to("cuda", torch.bfloat16)``, ``pipe.to(device=...,
        dtype=...)``. Returns the pipeline."""
        for arg in args:
            if arg is None:  # pipe.to(None, dtype): the older positional form
                continue
            if isinstance(arg, torch.dtype):
                if dtype is not None:
                    raise InvalidArgumentError(f"pipe.to got two dtypes ({dtype} and {arg}); pass one")
                dtype = arg
            elif isinstance(arg, (str, torch.device, int)) and not isinstance(arg, bool):
                if device is not None:
                    raise InvalidArgumentError(f"pipe.to got two devices ({device!r} and {arg!r}); pass one")
                device = arg
            else:
                raise InvalidArgumentError(f"pipe.to takes a device (e.g. 'cuda') and/or a torch.dtype, got "
                                           f"{type(arg).__name__} {arg!r:.40}")
        self.transformer.to(device=device, dtype=dtype)
        if self.vae is not None and device is not None:
            self.vae.to(device=device)
        return self

    @property
    def labels(self) -> dict[str, int]:
        """Every class name this model takes and its id, as diffusers' DiT pipeline has it: ImageNet
        models map each synonym (``"golden retriever"`` -> 207), leaving out the few names shared by
        several classes (``"crane"``), which are refused; seven classes have no name of their own (both
        cranes, for one) and are asked for by id. Other models name classes by id (``"7"`` -> 7)."""
        return label_ids(self.transformer.config.num_classes)

    def get_label_ids(self, label: int | str | Sequence[int | str]) -> list[int]:
        """The class ids of names (or ids): ``pipe.get_label_ids(["golden retriever", "tench"])`` ->
        ``[207, 0]``. An unknown or ambiguous name raises ``ValueError`` with the candidates."""
        return resolve_class_labels(label, self.transformer.config.num_classes)

    @property
    def interrupt(self) -> bool:
        """Set it (``pipe.interrupt = True``, e.g. in ``callback_on_step_end``, or from another thread)
        to stop this pipeline's running call after the current network evaluation; each call starts
        with it cleared. diffusers' ``pipe._interrupt = True`` works too."""
        return self._interrupt

    @interrupt.setter
    def interrupt(self, value: bool) -> None:
        self._interrupt = bool(value)

    def enable_cuda_graphs(self) -> None:
        """Replay the transformer's calls from CUDA graphs: same images, far fewer kernel launches, which
        is what limits small batches on a GPU.

        A network call is padded to a bucket of cells and replays that bucket's graph (with the PyTorch
        attention, one graph per count of cells at each cell index), captured the first time, at the
        cost of a few network calls; later calls and engines (``pipe.engine()``) replay them. The graphs
        keep their own KV cache and inputs on the GPU until ``disable_cuda_graphs()``
        (``xar_infer.cuda_graphs``). A padded call can round differently from the eager one, as a GPU's
        matrix products may at another row count: then images agree to rounding, not bit for bit.

        Example::

            pipe = XARPipeline.from_pretrained("xar-b", vae="kl16.ckpt", device="cuda", dtype=torch.bfloat16)
            pipe.enable_cuda_graphs()
            for labels in batches:
                images = pipe(labels).images  # captures once, then replays
        """
        if self.device.type != "cuda":
            raise InvalidArgumentError(f"CUDA graphs need the pipeline on a CUDA device, not {self.device.type}: "
                             "call pipe.to('cuda') first")
        if self._cuda_graphs is None:
            self._cuda_graphs = CUDAGraphs()

    def disable_cuda_graphs(self) -> None:
        """Run the transformer's calls eagerly again and free the graphs and their memory."""
        self._cuda_graphs = None

    @property
    def _network(self):
        """The network-call factory of this pipeline's engines (``engine.NetworkFactory``)."""
        return EagerNetwork if self._cuda_graphs is None else self._cuda_graphs.network

    def set_progress_bar_config(self, **kwargs) -> None:
        """Options for the tqdm progress bar, e.g. ``disable=True``."""
        self._progress_bar_config = dict(kwargs)

    def _check_output_type(self, output_type: str) -> None:
        if output_type not in OUTPUT_TYPES:
            raise InvalidArgumentError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if output_type != "latent" and self.vae is None and not self.transformer.config.pixel_space:
            raise InvalidArgumentError("this pipeline has no VAE to decode images: pass vae='path/to/kl16.ckpt' to "
                                       "from_pretrained, or use output_type='latent'")

    def engine(self, max_rows: int = 64, modulation_table_bytes: int = 256 * 2**20) -> Engine:
        """A continuous-batching engine on this pipeline's model: requests join and leave between
        network calls, each with its own settings. ``max_rows``: the KV cache's rows, allocated now
        (one per image and guidance half in flight). Use it as a context manager, which runs it in a
        background thread and finishes its requests on exit.

        Example::

            with pipe.engine(max_rows=64) as engine:
                future = engine.submit(GenerationRequest(class_label=7, seed=3, output_type="pil"))
                image = future.result()
        """
        return Engine(self.transformer, resolve_backend(self.backend, self.device), max_rows,
                      (self.default_num_inference_steps, self.default_guidance_scale),
                      finish=self._postprocess, check_output_type=self._check_output_type,
                      modulation_table_bytes=modulation_table_bytes, network=self._network)

    @torch.inference_mode()
    def __call__(self, class_labels: int | str | Sequence[int | str] | torch.Tensor,
                 num_inference_steps: int | Sequence[int] | None = None, guidance_scale: float | None = None,
                 generator: torch.Generator | Sequence[torch.Generator] | None = None,
                 output_type: str = "pil", sampler: str = "sde", guidance_schedule: str = "linear",
                 guidance_interval: tuple[float, float] | None = None,
                 vae_tile_size: int | None = None, vae_tile_overlap: int = DEFAULT_TILE_OVERLAP,
                 return_dict: bool = True,
                 callback_on_step_end: Callable[["XARPipeline", int, float, dict], dict | None] | None = None,
                 callback_on_step_end_tensor_inputs: Sequence[str] | None = None) -> XARPipelineOutput | tuple:
        """Generate one image per class label.

        ``class_labels``: ImageNet ids or names (``"golden retriever"``). Steps and guidance default to the
        model's official settings. ``generator``: one generator reproduces the released code's random draw
        order (on CPU, the same latents as the official sampler after ``torch.manual_seed``); a list with
        one generator per image makes each image independent of the batch. ``sampler``: ``"sde"`` (the
        released sampler), ``"euler"`` or ``"heun"`` (deterministic ODE). ``guidance_schedule``:
        ``"linear"`` (released: no guidance on the first cell, full scale on the last) or ``"constant"``.

        Faster opt-in settings that change the images (their effect on quality needs the real weights
        to judge): ``num_inference_steps`` as a list with one count per cell, e.g. ``[40, 30, 21, 12]``
        (later cells see more context), and ``guidance_interval=(lo, hi)``: guidance only at flow times
        ``lo <= t <= hi`` (t = 1 is noise), which skips the unconditional half elsewhere.

        ``vae_tile_size``: decode in windows of that many latent cells (plus ``vae_tile_overlap`` on
        each side), bounding the decoder's memory; see ``AutoencoderKLDecoder.decode``.

        ``callback_on_step_end(pipe, step, t, callback_kwargs) -> dict``, as in diffusers: called after
        every network evaluation (``step`` counts them from 0, ``t`` is its flow time, 1 = noise) with
        ``callback_kwargs`` holding what ``callback_on_step_end_tensor_inputs`` names (default
        ``["x"]``): ``"x"``, the sampler state of the cell being made, [B, tokens_per_cell, channels]
        in float64 (the state the next evaluation reads; after a cell's last evaluation, the finished
        cell); ``"cell_index"``, that cell's index (an int); ``"finished_latent"``, the latent
        [B, C, h, w] of the finished cells (model scale, zero where no cell is finished yet;
        ``pipe.decode`` makes it an image). Returning ``{"x": new_x}`` replaces the state for the next
        evaluation (a finished cell that way becomes the next cell's context); return ``{}`` (or the
        ``callback_kwargs`` unchanged) to change nothing. Setting ``pipe.interrupt = True`` stops the
        call after this evaluation and returns the finished cells, with the cell under way and those
        after it zero. The callback runs between network calls (with CUDA graphs, between replays).

        Example, a preview per cell::

            def preview(pipe, step, t, callback_kwargs):
                previews.append(pipe.decode(callback_kwargs["finished_latent"]))  # images in [-1, 1]
                return {}

            pipe(7, callback_on_step_end=preview, callback_on_step_end_tensor_inputs=["finished_latent"])
        """
        inputs = _check_callback(callback_on_step_end, callback_on_step_end_tensor_inputs)
        config = self.transformer.config
        settings = SamplingSettings.build(
            config.num_cells, self.default_num_inference_steps if num_inference_steps is None else num_inference_steps,
            self.default_guidance_scale if guidance_scale is None else guidance_scale, sampler, guidance_schedule,
            guidance_interval)
        self._check_output_type(output_type)
        labels = torch.tensor(resolve_class_labels(class_labels, config.num_classes), device=self.device)
        backend = resolve_backend(self.backend, self.device)
        plan = settings.plan(config.num_cells)
        require_memory(self.memory_needed(len(labels), output_type, plan.guided, vae_tile_size, vae_tile_overlap),
                       self.device, f"making {len(labels)} images in one call",
                       "pass fewer class labels per call" + ("" if output_type == "latent" else ", or decode in tiles (vae_tile_size)"))
        if self.device.type == "cpu" and self.dtype == torch.float16:
            warnings.warn(CPU_FLOAT16_ADVICE, stacklevel=2)

        noise = NoiseSource(generator, len(labels), self.device)  # checks the generators before the progress bar shows
        self._interrupt = False
        with tqdm(**{"total": plan.num_evaluations, "unit": "eval", **self._progress_bar_config}) as progress:
            latent = generate_latents(self.transformer, labels, settings, noise, backend,
                                      on_evaluation=lambda: progress.update(1), network=self._network,
                                      on_step=self._step_hook(callback_on_step_end, inputs))
        images = self._postprocess(latent, output_type, vae_tile_size, vae_tile_overlap)
        return XARPipelineOutput(images) if return_dict else (images,)

    def _step_hook(self, callback: Callable | None, inputs: tuple[str, ...]) -> Callable[[Step], torch.Tensor | None]:
        """The sampler's ``on_step`` hook of one call: the user's callback, then the interrupt check."""
        config = self.transformer.config

        def on_step(step: Step) -> torch.Tensor | None:
            replacement = None
            if callback is not None:
                given: dict[str, Any] = {}
                if "x" in inputs:
                    given["x"] = step.x
                if "cell_index" in inputs:
                    given["cell_index"] = step.cell
                if "finished_latent" in inputs:
                    given["finished_latent"] = (
                        cells_to_latent(step.cells, config.grid_size, config.cell_size) if step.cells else
                        step.x.new_zeros(len(step.x), config.token_channels, config.grid_size, config.grid_size,
                                         dtype=torch.float32))
                replacement = _callback_replacement(callback(self, step.index, step.t, given), given, step.x)
            if self._interrupt:
                raise StopSampling
            return replacement

        return on_step

    def _postprocess(self, latent: torch.Tensor, output_type: str, vae_tile_size: int | None = None,
                     vae_tile_overlap: int = DEFAULT_TILE_OVERLAP):
        """A batch's latent -> the images of ``output_type`` (refusing inf/NaN)."""
        check_finite(latent, "latents", self.dtype)
        if output_type == "latent":
            return latent
        decoded = self.decode(latent, tile_size=vae_tile_size, tile_overlap=vae_tile_overlap)
        check_finite(decoded, "decoded images", next(self.vae.parameters()).dtype if self.vae is not None else self.dtype)
        images = ((decoded + 1) / 2).clamp(0, 1).cpu()
        if output_type == "np":
            return images.permute(0, 2, 3, 1).numpy()
        if output_type == "pil":
            return to_pil(images)
        return images

    def decode(self, latent: torch.Tensor, tile_size: int | None = None,
               tile_overlap: int = DEFAULT_TILE_OVERLAP) -> torch.Tensor:
        """Model-scale latent -> image in [-1, 1] (fp32): the VAE's decode (tiled with ``tile_size``),
        or the identity for pixel models."""
        x = latent / self.transformer.config.latent_scale
        if self.transformer.config.pixel_space:
            return x.float()
        return self.vae.decode(x.to(next(self.vae.parameters()).dtype), tile_size, tile_overlap).float()


def _check_callback(callback: Callable | None, inputs: Sequence[str] | None) -> tuple[str, ...]:
    """The names the callback asks for, checked."""
    if callback is None:
        if inputs is not None:
            raise InvalidArgumentError("callback_on_step_end_tensor_inputs names what callback_on_step_end receives: "
                                       "pass callback_on_step_end too")
        return ()
    if not callable(callback):
        raise InvalidArgumentError(f"callback_on_step_end must be a function (pipe, step, t, callback_kwargs) -> dict, "
                                   f"got {type(callback).__name__}")
    if inputs is None:
        return ("x",)
    if isinstance(inputs, str) or not isinstance(inputs, Sequence):
        raise InvalidArgumentError(f"callback_on_step_end_tensor_inputs must be a list of names from {CALLBACK_INPUTS}, "
                                   f"got {inputs!r:.60}")
    unknown = [name for name in inputs if name not in CALLBACK_INPUTS]
    if unknown:
        raise InvalidArgumentError(f"callback_on_step_end_tensor_inputs: {unknown[0]!r:.40} is not one of "
                                   f"{CALLBACK_INPUTS}")
    return tuple(inputs)


def _callback_replacement(returned: Any, given: dict[str, Any], x: torch.Tensor) -> torch.Tensor | None:
    """The state that callback_on_step_end's return value puts in place of ``x``, or None."""
    if returned is None:
        return None
    if not isinstance(returned, dict):
        raise InvalidArgumentError(f"callback_on_step_end must return a dict (what it replaces, or {{}}), got "
                                   f"{type(returned).__name__}")
    for key, value in returned.items():
        if key not in CALLBACK_INPUTS:
            raise InvalidArgumentError(f"callback_on_step_end returned {key!r:.40}, which is not one of "
                                       f"{CALLBACK_INPUTS}: return {{}} or {{'x': new_x}}")
        if key not in CALLBACK_REPLACEABLE and (key not in given or value is not given[key]):
            raise InvalidArgumentError(f"callback_on_step_end returned a new {key!r}, which is for reading only: the "
                                       "finished cells are already the model's context; only 'x' can be replaced")
    new = returned.get("x", x)
    if new is x:
        return None
    if not isinstance(new, torch.Tensor) or new.shape != x.shape:
        shown = tuple(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__
        raise InvalidArgumentError(f"callback_on_step_end returned x of shape {shown}; it must keep x's shape "
                                   f"{tuple(x.shape)}")
    return new


def check_finite(values: torch.Tensor, what: str, dtype: torch.dtype) -> None:
    """Refuse to return inf/NaN, which would silently become black or saturated images."""
    if not torch.isfinite(values).all():
        bad = (~torch.isfinite(values)).flatten(1).any(1).nonzero().flatten().tolist()
        if dtype == torch.float16:
            advice = "use dtype=torch.bfloat16 (float32's range in half the bytes) or torch.float32"
        elif dtype == torch.float32:
            advice = "the weights or the inputs hold values this model cannot have come from: check them"
        else:
            advice = "check the weights; try dtype=torch.float32"
        raise NumericalError(f"the {what} of image(s) {bad} hold inf or NaN, computed in {str(dtype).removeprefix('torch.')}; {advice}")


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B, C, H, W] in [0, 1] -> uint8 [B, H, W, C], rounded to the nearest level as the released evaluation does."""
    return (images * 255).clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[B, C, H, W] in [0, 1] -> PIL images (grayscale for one channel)."""
    return [Image.fromarray(p[..., 0] if p.shape[-1] == 1 else p) for p in to_uint8(images)]
