"""What the benchmark runs: xar_infer's xAR-B/L/H, DiT-XL/2 and SiT-XL/2 as users run them (diffusers),
and optionally the official xAR code. All with random weights of the real shapes: speed does not
depend on the values.

Each contender builds its model once, then `generate(batch, steps)` makes latents for a batch with a
given number of sampling steps and `decode(latents)` turns them into images. `nominal_steps` is what
the model's official recipe uses; the runner may time fewer steps and extrapolate.
"""

from __future__ import annotations

import inspect
import sys

import torch

from flops import counted_flops, dit_xl2_flops_per_forward, xar_flops_per_image
from xar_infer import XARPipeline, XARTransformer
from xar_infer.config import PRESETS
from xar_infer.loading import released_buffers
from xar_infer.engine import Engine
from xar_infer.engine.modulations import ModulationStore
from xar_infer.settings import SamplingSettings
from xar_infer.vae import AutoencoderKLDecoder, VAEConfig


def fill_pseudo_random(module: torch.nn.Module, std: float = 0.02, seed: int = 0) -> torch.nn.Module:
    """Give every parameter random-looking values fast: tiles of one random block (drawing fresh normals
    for a billion parameters takes longer than the benchmark itself)."""
    block = torch.randn(1 << 20, generator=torch.Generator().manual_seed(seed)) * std
    with torch.no_grad():
        for p in module.parameters():
            flat = p.view(-1)
            for start in range(0, flat.numel(), block.numel()):
                part = flat[start:start + block.numel()]
                part.copy_(block[:part.numel()].to(p.dtype))
    return module


def build_on(device: str, dtype: torch.dtype, make) -> torch.nn.Module:
    """Construct without the (slow) default init, then fill pseudo-randomly."""
    with torch.device("meta"):
        module = make()
    module = module.to_empty(device="cpu")
    fill_pseudo_random(module)
    module.load_state_dict(module.state_dict())  # zero again the units that pad an MLP width (model.GatedMLP)
    return module.to(device=device, dtype=dtype).eval().requires_grad_(False)


class Contender:
    """Interface: ``name``, ``description`` (sampler and guidance), ``nominal_steps``;
    ``generate(batch, steps)`` -> latents, ``decode(latents)`` -> images, and their FLOPs per image."""

    name: str
    description: str
    nominal_steps: int
    # Every sampling step costs the same (DiT, SiT): time K steps and scale. xAR's first evaluation of
    # a cell also runs the previous cell, so it is timed at 1 and K steps and extrapolated on a line.
    uniform_steps: bool = False
    min_steps: int = 1  # the fewest sampling steps the sampler handles
    extrapolable: bool = True  # False: always timed at the full step count
    captures: bool = False  # True: the first call at a step count captures CUDA graphs (warm up at the full count)

    def generate(self, batch: int, steps: int) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def flops_per_image(self, steps: int) -> float:
        raise NotImplementedError

    def decode_flops_per_image(self) -> float:
        raise NotImplementedError


# Opt-in modes that change the images (labelled as such): fewer steps in later cells, as in DiSA
# (50/38/26/15 for 50 steps, scaled here to the preset's count), and guidance only at flow times in
# the interval below (the middle of the noise range, after Kynkaanniemi et al. 2024).
TAPER = (1.0, 0.76, 0.52, 0.3)
GUIDANCE_INTERVAL = (0.2, 0.8)


class XARContender(Contender):
    """xar_infer's pipeline on a preset's architecture, with MAR's KL-16 decoder.

    ``backend``: ``torch`` or ``triton``, with ``+graphs`` to replay the network calls from CUDA graphs,
    or ``+mkl`` for fp32 linear layers by F.linear on CPU (what ``backends.onednn_linear`` gains).
    ``mode``: ``exact`` (the released sampler's results), ``taper`` (per-cell step counts) or
    ``interval`` (guidance interval); the last two change the outputs and are always timed in full.
    """

    def __init__(self, preset_name: str, device: str, dtype: torch.dtype, backend: str = "torch", mode: str = "exact",
                 dtype_in_name: bool = False):
        preset = PRESETS[preset_name]
        self.preset, self.device, self.mode = preset, device, mode
        precision = f"{str(dtype).removeprefix('torch.')}, " if dtype_in_name else ""
        self.name = f"xar_infer {preset_name} ({backend}, {precision}{mode if mode == 'exact' else mode + ', changes outputs'})"
        kernels, _, extra = backend.partition("+")
        if extra not in ("", "graphs", "mkl"):
            raise ValueError(f"unknown backend {backend!r}: torch or triton, optionally with +graphs (CUDA graphs) "
                             "or +mkl (fp32 linear layers by torch's BLAS instead of oneDNN, on CPU)")
        self.blas_linears = extra == "mkl"
        self.nominal_steps = preset.num_inference_steps
        steps = self.steps(preset.num_inference_steps)
        steps_text = "/".join(map(str, steps)) if isinstance(steps, list) else str(steps)
        self.description = f"{steps_text} SDE steps per cell, cfg {preset.guidance_scale}"
        if mode == "interval":
            self.description += f" at t in {list(GUIDANCE_INTERVAL)}"
        # Graphs are captured per step count: alternating counts to extrapolate would recapture each time.
        self.captures = extra == "graphs"
        self.extrapolable = mode == "exact" and not self.captures
        transformer = build_on(device, dtype, lambda: XARTransformer(preset.config))
        vae = build_on(device, torch.float32, lambda: AutoencoderKLDecoder(VAEConfig()))
        self.pipe = XARPipeline(transformer, vae, num_inference_steps=preset.num_inference_steps,
                                guidance_scale=preset.guidance_scale, backend=kernels)
        self.pipe.set_progress_bar_config(disable=True)
        if self.captures:
            self.pipe.enable_cuda_graphs()
        self.batch = 1

    def steps(self, steps: int) -> int | list[int]:
        return [max(1, round(f * steps)) for f in TAPER] if self.mode == "taper" else steps

    def generate(self, batch: int, steps: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(0)
        self.batch = batch
        # Read at every call by backends.onednn_linear.
        onednn = torch.backends.mkldnn.enabled
        torch.backends.mkldnn.enabled = onednn and not self.blas_linears
        try:
            return self.pipe(list(range(batch)), num_inference_steps=self.steps(steps), generator=generator,
                             output_type="latent",
                             guidance_interval=GUIDANCE_INTERVAL if self.mode == "interval" else None).images
        finally:
            torch.backends.mkldnn.enabled = onednn

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.pipe.decode(latents)

    def flops_per_image(self, steps: int) -> float:
        # Whether the engine kept the job's modulations (it does up to a size, by default in pipe()) decides the count.
        config, interval = self.preset.config, GUIDANCE_INTERVAL if self.mode == "interval" else None
        plan = SamplingSettings.build(config.num_cells, self.steps(steps), self.preset.guidance_scale,
                                      guidance_interval=interval).plan(config.num_cells)
        rows = self.batch * (2 if plan.guided else 1)
        table_bytes = inspect.signature(Engine).parameters["modulation_table_bytes"].default
        table = ModulationStore.nbytes(self.pipe.transformer, rows, len(plan.modulation_times)) <= table_bytes
        return xar_flops_per_image(config, self.steps(steps), self.preset.guidance_scale, modulation_table=table,
                                   guidance_interval=interval)

    def decode_flops_per_image(self) -> float:
        return counted_flops(lambda: self.decode(torch.zeros(1, 16, 16, 16, device=self.device)))


def dit_backbone(out_channels: int = 8):
    """DiT-XL/2 in diffusers' implementation (SiT-XL/2 has the same backbone and output shape)."""
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(num_attention_heads=16, attention_head_dim=72, in_channels=4,
                                 out_channels=out_channels, num_layers=28, sample_size=32, patch_size=2,
                                 num_embeds_ada_norm=1000)


def sd_vae():
    """The Stable Diffusion VAE (sd-vae-ft-ema shapes) that DiT and SiT decode with."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4,
                         sample_size=256)


class DiTFamily(Contender):
    """Shared by DiT and SiT: the XL/2 backbone, guidance by batch doubling, the SD VAE."""

    guidance_scale = 1.5  # DiT's and SiT's FID-50k setting
    uniform_steps = True
    scaling_factor = 0.18215

    def __init__(self, device: str, dtype: torch.dtype):
        self.device, self.dtype = device, dtype
        self.model = build_on(device, dtype, dit_backbone)
        self.vae = build_on(device, torch.float32, sd_vae)

    def velocity_or_eps(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Guided prediction (first 4 output channels; the other 4 are the learned variance)."""
        doubled = torch.cat([x, x]).to(self.dtype)
        both_labels = torch.cat([labels, torch.full_like(labels, 1000)])
        out = self.model(doubled, timestep=t.expand(len(doubled)), class_labels=both_labels).sample[:, :4].float()
        cond, uncond = out.chunk(2)
        return uncond + self.guidance_scale * (cond - uncond)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents / self.scaling_factor).sample

    def flops_per_image(self, steps: int) -> float:
        return 2 * steps * dit_xl2_flops_per_forward()

    def decode_flops_per_image(self) -> float:
        return counted_flops(lambda: self.decode(torch.zeros(1, 4, 32, 32, device=self.device)))


class DiTContender(DiTFamily):
    name = "DiT-XL/2 (diffusers)"
    nominal_steps = 250
    description = "250 DDPM steps, cfg 1.5"

    def generate(self, batch: int, steps: int) -> torch.Tensor:
        from diffusers import DDPMScheduler

        scheduler = DDPMScheduler(num_train_timesteps=1000)
        scheduler.set_timesteps(steps)
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(batch, 4, 32, 32, generator=generator).to(self.device)
        labels = torch.arange(batch, device=self.device)
        for t in scheduler.timesteps:
            eps = self.velocity_or_eps(x, t.to(self.device)[None], labels)
            x = scheduler.step(eps, t, x, generator=generator).prev_sample
        return x


class SiTContender(DiTFamily):
    name = "SiT-XL/2 (diffusers backbone)"
    nominal_steps = 250
    description = "250 Euler-Maruyama SDE steps, cfg 1.5"

    def generate(self, batch: int, steps: int) -> torch.Tensor:
        """SiT's SDE sampler on the linear path (t=1 noise, t=0 data here): drift v - t*score with
        diffusion 2t, noise on every step but the last; the network is fed t scaled to 1000 like DiT."""
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(batch, 4, 32, 32, generator=generator).to(self.device)
        labels = torch.arange(batch, device=self.device)
        times = torch.linspace(1.0, 0.04, steps + 1)
        for i in range(steps):
            t, dt = times[i], times[i + 1] - times[i]
            v = self.velocity_or_eps(x, (t * 1000).to(self.device)[None], labels)
            drift = v + (x + (1 - t) * v)  # v - t * score, score = -(x + (1 - t) v) / t
            x = x + drift * dt
            if i < steps - 1:
                x = x + torch.sqrt(2 * t * dt.abs()) * torch.randn(x.shape, generator=generator).to(self.device)
        return x


class OfficialXARContender(Contender):
    """The official xAR code from a user's checkout, with the same weights as xar_infer's contender."""

    min_steps = 3  # its sampler fails at 1 step and re-runs the previous cell at 2

    def __init__(self, repo: str, preset_name: str, reference: XARContender):
        sys.path.insert(0, repo)
        import models.xar as official  # noqa: the checkout's own module

        if reference.device == "cpu":  # the official code calls .cuda() throughout
            torch.Tensor.cuda = lambda self, *args, **kwargs: self
        constructor = {"xar-b": official.xar_base, "xar-l": official.xar_large, "xar-h": official.xar_huge}[preset_name]
        self.model = constructor().to(reference.device).eval()  # fp32, as the official code keeps it
        weights = {**reference.pipe.transformer.state_dict(), **released_buffers(reference.preset.config)}
        self.model.load_state_dict(weights, strict=True)
        self.reference = reference
        self.name = f"official xAR {preset_name}"
        self.nominal_steps = reference.nominal_steps
        self.description = reference.description

    def generate(self, batch: int, steps: int) -> torch.Tensor:
        torch.manual_seed(0)
        labels = torch.arange(batch, device=self.reference.device)
        # The official evaluation keeps fp32 weights and samples under autocast (engine_xar.py); in a
        # reduced-precision run it gets the same dtype as ours.
        dtype, on_gpu = self.reference.pipe.dtype, self.reference.pipe.device.type == "cuda"
        with torch.no_grad(), torch.autocast("cuda", dtype=dtype, enabled=on_gpu and dtype != torch.float32):
            return self.model.sample_tokens(num_steps=steps, cfg=self.reference.preset.guidance_scale, label=labels)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.reference.decode(latents)

    def flops_per_image(self, steps: int) -> float:
        return xar_flops_per_image(self.reference.preset.config, steps, self.reference.preset.guidance_scale, released=True)

    def decode_flops_per_image(self) -> float:
        return self.reference.decode_flops_per_image()
