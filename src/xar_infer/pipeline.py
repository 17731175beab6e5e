"""XARPipeline: class labels in, images out, with diffusers' conventions."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .backends import resolve_backend
from .cuda_graphs import CUDAGraphs
from .errors import InvalidArgumentError, NumericalError
from .imagenet import resolve_class_labels
from .loading import load_pretrained
from .memory import require_memory
from .model import XARTransformer
from .engine import EagerNetwork, Engine
from .engine.engine import generate_latents
from .sampling import NoiseSource
from .settings import SamplingSettings
from .vae import AutoencoderKLDecoder, load_vae
from .vae_tiling import DEFAULT_TILE_OVERLAP

OUTPUT_TYPES = ("pil", "np", "pt", "latent")

# Measured on this project's CPU (AMD EPYC, AVX512-BF16), dense matmuls: float16 1 GFLOP/s, float32
# 168, bfloat16 783. Most CPUs have no fast float16 matmul; recent ones have a bfloat16 one.
CPU_FLOAT16_ADVICE = ("float16 matrix products are very slow on most CPUs (here 170x slower than float32); "
                      "on CPU use dtype=torch.bfloat16 (fast where the CPU has bfloat16 instructions) or torch.float32")


@dataclass
class XARPipelineOutput:
    """``images``: a list of PIL images, an array [B, H, W, 3] in [0, 1] (``np``), a tensor
    [B, 3, H, W] in [0, 1] (``pt``), or the latent [B, C, h, w] before VAE scaling (``latent``)."""

    images: list[Image.Image] | np.ndarray | torch.Tensor


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

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, vae: str | os.PathLike | AutoencoderKLDecoder | None = None, *,
                        dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                        revision: str | None = None, cache_dir: str | os.PathLike | None = None,
                        local_files_only: bool = False, backend: str = "auto", sha256: str | None = None) -> "XARPipeline":
        """Load a transformer and, optionally, the VAE.

        ``name_or_path``: a preset (``"xar-b"``, ``"xar-l"``, ``"xar-h"``: the released weights from the
        Hugging Face Hub), a local released ``.pth``, a ``.safetensors`` file or a directory made by
        ``xar-convert``, or a Hub repo id holding such a directory. ``vae``: MAR's ``kl16.ckpt`` (or a
        safetensors export) or an already loaded decoder; without it only ``output_type="latent"`` works,
        except for pixel-space models such as ``"xar-digits"``, which need none.
        The VAE stays fp32 unless you pass a decoder in another dtype. ``backend``: ``"auto"`` (the
        fused Triton kernels on CUDA when triton is installed, PyTorch otherwise), ``"torch"`` or
        ``"triton"``; it is resolved for the pipeline's device at each call, so ``.to("cuda")`` works.
        ``sha256``: the expected digest of the transformer's weights file (downloaded or local).
        """
        loaded = load_pretrained(name_or_path, dtype=dtype, device=device, revision=revision,
                                 cache_dir=cache_dir, local_files_only=local_files_only, sha256=sha256)
        if vae is not None and not isinstance(vae, AutoencoderKLDecoder):
            vae = load_vae(vae, device=device)
        return cls(loaded.model, vae, num_inference_steps=loaded.num_inference_steps,
                   guidance_scale=loaded.guidance_scale, backend=backend)

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

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "XARPipeline":
        """Move the transformer (and the VAE, which keeps its own dtype) to ``device``; cast the transformer to ``dtype``."""
        self.transformer.to(device=device, dtype=dtype)
        if self.vae is not None and device is not None:
            self.vae.to(device=device)
        return self

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
                 return_dict: bool = True) -> XARPipelineOutput | tuple:
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
        """
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
        with tqdm(**{"total": plan.num_evaluations, "unit": "eval", **self._progress_bar_config}) as progress:
            latent = generate_latents(self.transformer, labels, settings, noise, backend,
                                      on_evaluation=lambda: progress.update(1), network=self._network)
        images = self._postprocess(latent, output_type, vae_tile_size, vae_tile_overlap)
        return XARPipelineOutput(images) if return_dict else (images,)

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
