"""Shared fixtures: tiny checkpoints in the released formats, made here, and the official parity files
(tests/fixtures/parity, made by tools/make_parity_fixtures.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run through Triton's interpreter, which must be chosen before the
# kernels are imported (at decoration time). With a GPU they compile for it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Where pipeline-level tests of the Triton backend run: compiled kernels need CUDA tensors.
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The dtypes the kernel tests cover (tests/kernels): bf16 on a GPU only, because Triton's interpreter
# casts fp32 to bf16 by truncation, where PyTorch and compiled kernels round to nearest (triton 3.9).
TRITON_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if TRITON_DEVICE == "cuda" else [])

from xar_infer.config import XARConfig
from xar_infer.loading import released_buffers
from xar_infer.model import XARTransformer
from xar_infer.vae import AutoencoderKLDecoder, VAEConfig

# The --require-parity option (re-exported hooks: pytest registers what this module defines).
from parity_gate import pytest_addoption, pytest_configure  # noqa: F401

PARITY_DIR = Path(__file__).resolve().parent / "fixtures" / "parity"

def pytest_collection_modifyitems(config, items):
    """triton is a Linux-only dependency: elsewhere its tests are reported as skipped, never as passed."""
    try:
        import triton  # noqa: F401
    except ImportError:
        skip = pytest.mark.skip(reason="triton is not installed (it is a dependency on Linux only)")
        for item in items:
            if "triton" in item.keywords:
                item.add_marker(skip)


TINY_CONFIG = XARConfig(dim=32, encoder_depth=1, decoder_depth=1, num_heads=2, mlp_hidden_dim=48)
TINY_VAE_CONFIG = VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1)


def random_transformer(config: XARConfig = TINY_CONFIG, seed: int = 0) -> XARTransformer:
    """A transformer whose every parameter is random (no zero biases or unit norms to hide mistakes)."""
    torch.manual_seed(seed)
    model = XARTransformer(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm = name.endswith(("_ln.weight", "_norm.weight"))
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if is_norm else 0.0))
    model.load_state_dict(model.state_dict())  # zero again the units that pad an MLP width (model.GatedMLP)
    return model.eval()


def released_state_dict(model: XARTransformer) -> dict[str, torch.Tensor]:
    """The model's weights laid out as the released .pth files are: flat, with the derived buffers."""
    return {**model.state_dict(), **released_buffers(model.config)}


def save_released(model: XARTransformer, path: Path) -> Path:
    torch.save(released_state_dict(model), path)
    return path


@pytest.fixture
def tiny_model() -> XARTransformer:
    return random_transformer()


@pytest.fixture
def tiny_checkpoint(tmp_path, tiny_model) -> Path:
    """A released-format .pth of the tiny model."""
    return save_released(tiny_model, tmp_path / "xar_tiny.pth")


@pytest.fixture
def tiny_vae_checkpoint(tmp_path) -> Path:
    """A kl16.ckpt-style file (weights under "model", encoder keys included) of a small decoder."""
    torch.manual_seed(1)
    vae = AutoencoderKLDecoder(TINY_VAE_CONFIG)
    state = {**vae.state_dict(), "encoder.conv_in.weight": torch.zeros(32, 3, 3, 3), "quant_conv.weight": torch.zeros(32, 32, 1, 1)}
    path = tmp_path / "kl_tiny.ckpt"
    torch.save({"model": state}, path)
    return path


@pytest.fixture(scope="session")
def parity_dir() -> Path:
    """The official fixtures ship with the repository: a missing one is an error, never a skip."""
    if not PARITY_DIR.is_dir():
        raise FileNotFoundError(f"{PARITY_DIR} is missing; it is part of the repository (git checkout it, or "
                                "regenerate it with tools/make_parity_fixtures.py)")
    return PARITY_DIR
