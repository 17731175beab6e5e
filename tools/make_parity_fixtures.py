"""Regenerate tests/fixtures/parity/ by running the official xAR and MAR code on CPU in fp32.

The fixtures are what the released code computes for small random weights: a tiny xAR checkpoint in
the released format with the sampler's tokens and three single network evaluations, and a narrow KL
VAE decoder with its decode. tests/fixtures/parity/README.md says what each file holds.

The official modules are imported from the two checkouts, never copied. They assume CUDA and a few
packages that xar_infer does not depend on, so run this in a scratch environment outside the
repository (timm 0.9.12 is the version MAR's environment.yaml pins; torchvision is not installed
because no build of it loads beside this CPU torch, see _cpu_shims)::

    python3 -m venv /tmp/official-venv
    /tmp/official-venv/bin/pip install torch==2.13.0 numpy scipy einops safetensors pillow pyyaml huggingface_hub
    /tmp/official-venv/bin/pip install --no-deps timm==0.9.12
    git clone https://github.com/OliverRensu/xAR /tmp/xar-official   # then check out XAR_COMMIT
    git clone https://github.com/LTH14/mar /tmp/mar-official         # then check out MAR_COMMIT
    /tmp/official-venv/bin/python tools/make_parity_fixtures.py \\
        --xar-repo /tmp/xar-official --mar-repo /tmp/mar-official --out tests/fixtures/parity

A git checkout at another commit than the pinned one, or with changes to the official files used, is
refused unless --allow-other-commit is given. The output is the same bytes for the same --seed, torch
version and CPU (everything runs on one thread); xar_infer itself is not imported.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.abc
import importlib.machinery
import importlib.metadata
import json
import subprocess
import sys
import types
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import save_file

XAR_COMMIT = "121e9c93df32295ebe79a52b4402a86a63f321f9"  # github.com/OliverRensu/xAR, its only code commit
MAR_COMMIT = "fe470ac24afbee924668d8c5c83e9fec60af3a73"  # github.com/LTH14/mar, whose KL-16 VAE xAR uses
XAR_FILES = ("models/xar.py", "models/rope.py", "models/sampler.py", "models/flow.py")
MAR_FILES = ("models/vae.py",)

# The tiny transformer: the released architecture (16x16 tokens of 16 channels, 8x8 cells, RoPE
# tables [256, 16] as at head dim 16) at width 32 with two heads and two blocks on each side, so
# that every per-layer and per-head path is exercised; the MLP width int(32 * 4 * 2/3) = 85 is odd.
XAR_SIZE = {"width": 32, "depth": 2, "heads": 2}
LABELS = (207, 999)  # 999 is the last real class; the sampler adds the null class 1000 itself
STEPS, CFG = 6, 2.5  # several SDE steps per cell and a guidance ramp over the four cells
WEIGHT_NOISE = 0.05  # moves every bias off zero and every norm weight off one
# Encoder block 0's cos table is stored off by up to ROPE_PERTURBATION in the rows of cells 2 and 3
# (rows 128-255); the official code uses the stored table, xar_infer recomputes it and warns. The
# three single evaluations touch only cells 0 and 1, so they do not see it; the sampled tokens do.
ROPE_PERTURBATION = 1.5e-4
FORWARD_TIMES = (0.7, 0.55, 0.3)

# The VAE decoder: MAR's class at ch=32 instead of 128 (GroupNorm's 32 groups need a multiple of 32),
# stride 4, two upsamplings, a width change between levels and the middle attention at 64 channels.
VAE_SIZE = {"embed_dim": 16, "ch": 32, "ch_mult": (1, 1, 2)}
VAE_WEIGHT_NOISE = 0.02
VAE_LATENT_SHAPE = (2, 16, 8, 8)


def git_commit(repo: Path, files: tuple[str, ...]) -> str | None:
    """The checkout's HEAD, or None when it is not a git checkout; a change to `files` is reported as
    its own state, so that it is never mistaken for the pinned commit."""
    top = subprocess.run(["git", "-C", str(repo), "rev-parse", "--show-toplevel"], capture_output=True, text=True)
    if top.returncode != 0 or Path(top.stdout.strip()).resolve() != repo:  # not one, or a folder inside another
        return None
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
    dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--", *files],
                           capture_output=True, text=True, check=True).stdout.strip()
    return head.stdout.strip() + ("+local-changes" if dirty else "")


def check_checkout(repo: Path, files: tuple[str, ...], pinned: str, allow_other: bool) -> str:
    missing = [f for f in files if not (repo / f).is_file()]
    if missing:
        sys.exit(f"{repo}: {', '.join(missing)} not found; pass the root of the official checkout")
    commit = git_commit(repo, files)
    if commit is None:
        print(f"warning: {repo} is not a git checkout; its commit cannot be checked", file=sys.stderr)
        return "unknown (not a git checkout)"
    if commit != pinned and not allow_other:
        sys.exit(f"{repo} is at {commit}, not the pinned {pinned}; check out the pinned commit "
                 "or pass --allow-other-commit")
    return commit


class _Absent(type):
    """A stand-in for a torchvision name: reading attributes works (module-level tables in timm do),
    using it raises, so a path that really needed torchvision cannot pass unnoticed."""

    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Absent(f"{cls.__name__}.{name}", (), {})

    def __call__(cls, *args, **kwargs):
        raise RuntimeError(f"{cls.__name__} was used, but torchvision is only a stand-in here")


class _AbsentModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Absent(f"{self.__name__}.{name}", (), {})


class _AbsentFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, package: str):
        self.package = package

    def find_spec(self, fullname, path, target=None):
        if fullname == self.package or fullname.startswith(self.package + "."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _AbsentModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


def _no_flash_attn(*args, **kwargs):
    raise RuntimeError("flash_attn_func was called; the official sampling path is expected not to use it")


@contextlib.contextmanager
def _cpu_shims() -> Iterator[None]:
    """What the official code needs to run on a CPU without its GPU-only packages:
    - `.cuda()` on tensors (the sampler moves its noise and labels) becomes the identity, so all
      randomness comes from the global CPU generator in the official order;
    - models/xar.py imports flash_attn_func but its attention calls scaled_dot_product_attention; the
      stub raises if it is ever called;
    - timm imports torchvision at import time (FrozenBatchNorm2d, transforms, datasets) although the
      SwiGLU MLP that xAR takes from it needs none of it; the stand-ins raise if used.
    """
    saved_cuda = torch.Tensor.cuda
    saved_modules = {name: sys.modules.get(name) for name in ("flash_attn",)}
    finder = _AbsentFinder("torchvision")
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    sys.modules["flash_attn"] = types.SimpleNamespace(flash_attn_func=_no_flash_attn)
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        torch.Tensor.cuda = saved_cuda
        sys.meta_path.remove(finder)
        for name, module in saved_modules.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def import_official(repo: Path, name: str) -> types.ModuleType:
    """Import `name` (e.g. models.xar) from a checkout. Both repositories call their package `models`,
    so it is dropped from sys.modules afterwards; the returned module keeps what it imported."""
    sys.path.insert(0, str(repo))
    try:
        module = importlib.import_module(name)
    finally:
        sys.path.remove(str(repo))
        for key in [k for k in sys.modules if k == "models" or k.startswith("models.")]:
            del sys.modules[key]
    return module


def tiny_xar(official: types.ModuleType, seed: int) -> torch.nn.Module:
    """The official xAR class at XAR_SIZE with its own initialisation, then every parameter moved by
    noise and encoder block 0's cos table perturbed in the rows of cells 2 and 3."""
    width, depth, heads = XAR_SIZE["width"], XAR_SIZE["depth"], XAR_SIZE["heads"]
    torch.manual_seed(seed)
    model = official.xAR(encoder_embed_dim=width, encoder_depth=depth, encoder_num_heads=heads,
                         decoder_embed_dim=width, decoder_depth=depth, decoder_num_heads=heads,
                         mlp_ratio=4, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(WEIGHT_NOISE * torch.randn_like(p))
        table = model.encoder_blocks[0].attn.rope.freqs_cos  # [256, head_dim], channels in rotated pairs
        rows, pairs = table.shape[0] // 2, table.shape[1] // 2
        noise = (2 * torch.rand(rows, pairs) - 1) * ROPE_PERTURBATION
        table[rows:] += noise.repeat_interleave(2, dim=1)  # both channels of a pair share one angle
    return model


def forward_evaluations(model: torch.nn.Module, labels: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    """Three single network calls as the sampler makes them, conditional branch only: cell 0 at
    t=0.7 with an empty cache; cell 1's first call, [clean cell 0 at t=0 ; cell 1 at t=0.55] under the
    block-causal mask, which caches cell 0; a later call of cell 1 at t=0.3 against that cache."""
    B = len(labels)
    g = torch.Generator().manual_seed(seed)
    x0, x1, x2 = (torch.randn(B, 64, 16, generator=g) for _ in range(3))
    for blk in [*model.encoder_blocks, *model.decoder_blocks]:
        blk.attn.k = blk.attn.v = None
    t0, t1, t2 = (torch.full((B,), t, dtype=torch.float32) for t in FORWARD_TIMES)
    with torch.no_grad():
        v0 = model.sample_inference(x0, labels, t0, True, 0, model.mask[:, :, :64, :64])
        v1 = model.sample_inference(torch.cat([x0, x1], dim=1), labels, torch.cat([torch.zeros(B, dtype=torch.float64), t1]),
                                    True, 1, model.mask[:, :, :128, :128])
        v2 = model.sample_inference(x2, labels, t2, False, 1)
    return {"fwd.x0": x0, "fwd.v0": v0, "fwd.x1": x1, "fwd.v1": v1, "fwd.x2": x2, "fwd.v2": v2}


def small_vae(official: types.ModuleType, seed: int) -> torch.nn.Module:
    """MAR's AutoencoderKL with its decoder rebuilt by MAR's Decoder class at VAE_SIZE's width (the
    AutoencoderKL constructor always builds ch=128); the encoder is dropped, decode() never uses it.
    Weights: MAR's initialisation plus noise, rounded to fp16 so that the fp16 file is exact."""
    torch.manual_seed(seed)
    vae = official.AutoencoderKL(embed_dim=VAE_SIZE["embed_dim"], ch_mult=VAE_SIZE["ch_mult"])
    vae.decoder = official.Decoder(ch=VAE_SIZE["ch"], ch_mult=VAE_SIZE["ch_mult"], z_channels=VAE_SIZE["embed_dim"])
    del vae.encoder, vae.quant_conv
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(VAE_WEIGHT_NOISE * torch.randn_like(p))
            p.copy_(p.half().float())
    return vae.eval()


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """safetensors.save_file, with the metadata in sorted order: the library writes it in hash order,
    which changes from run to run, and the fixtures should be the same bytes for the same inputs."""
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata=metadata)
    with open(path, "r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, separators=(",", ":")).encode()
        if len(text) > size:
            raise RuntimeError(f"{path}: the safetensors header grew when its metadata was sorted")
        f.seek(8)
        f.write(text.ljust(size))  # same length, padded with spaces as the format allows


def file_metadata(xar_commit: str, mar_commit: str, seed: int) -> dict[str, str]:
    return {"xar_commit": xar_commit, "mar_commit": mar_commit, "seed": str(seed), "torch": torch.__version__,
            "timm": importlib.metadata.version("timm"), "made_by": "tools/make_parity_fixtures.py"}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--xar-repo", type=Path, required=True, help=f"checkout of OliverRensu/xAR at {XAR_COMMIT}")
    parser.add_argument("--mar-repo", type=Path, required=True, help=f"checkout of LTH14/mar at {MAR_COMMIT}")
    parser.add_argument("--out", type=Path, required=True, help="output folder (tests/fixtures/parity)")
    parser.add_argument("--seed", type=int, default=0, help="weights, inputs and sampling noise derive from it")
    parser.add_argument("--allow-other-commit", action="store_true",
                        help="accept checkouts at other commits (recorded in the files' metadata)")
    args = parser.parse_args(argv)

    xar_commit = check_checkout(args.xar_repo.resolve(), XAR_FILES, XAR_COMMIT, args.allow_other_commit)
    mar_commit = check_checkout(args.mar_repo.resolve(), MAR_FILES, MAR_COMMIT, args.allow_other_commit)
    torch.set_num_threads(1)  # one summation order, so that a rerun reproduces the bytes
    args.out.mkdir(parents=True, exist_ok=True)
    meta = file_metadata(xar_commit, mar_commit, args.seed)

    with _cpu_shims():
        xar = import_official(args.xar_repo.resolve(), "models.xar")
        vae_module = import_official(args.mar_repo.resolve(), "models.vae")

        model = tiny_xar(xar, args.seed)
        torch.save(model.state_dict(), args.out / "xar_tiny.pth")

        labels = torch.tensor(LABELS)
        expected = {"labels": labels, **forward_evaluations(model, labels, args.seed + 1)}
        sample_seed = args.seed + 2
        torch.manual_seed(sample_seed)
        with torch.no_grad():
            expected["tokens"] = model.sample_tokens(num_steps=STEPS, cfg=CFG, label=labels)
        config = {**XAR_SIZE, "B": len(LABELS), "steps": STEPS, "cfg": CFG}
        save_safetensors(expected, args.out / "xar_tiny_expected.safetensors",
                         {**meta, "config": json.dumps(config), "sample_seed": str(sample_seed),
                          "rope_perturbation": str(ROPE_PERTURBATION)})

        vae = small_vae(vae_module, args.seed + 3)
        z = torch.randn(VAE_LATENT_SHAPE, generator=torch.Generator().manual_seed(args.seed + 4))
        with torch.no_grad():
            image = vae.decode(z)
        weights = {f"model.{k}": v.half() for k, v in vae.state_dict().items()}
        save_safetensors({**weights, "z": z, "image": image}, args.out / "vae_small.safetensors",
                         {**meta, "embed_dim": str(VAE_SIZE["embed_dim"]), "ch": str(VAE_SIZE["ch"]),
                          "ch_mult": json.dumps(list(VAE_SIZE["ch_mult"]))})

    for name in ("xar_tiny.pth", "xar_tiny_expected.safetensors", "vae_small.safetensors"):
        print(f"{args.out / name}: {(args.out / name).stat().st_size} bytes")


if __name__ == "__main__":
    main()
