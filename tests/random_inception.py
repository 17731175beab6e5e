"""A random-weight InceptionV3 state dict in torch-fidelity's layout, for offline scoring tests.

Its convolutions are drawn with He scaling and its batch norms are the identity, so activations keep
their size through the 20-odd layers and the features vary from image to image, as they do with the
real weights (PyTorch's default initialisation shrinks them layer by layer towards zero).
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import torch


def random_inception_state(seed: int = 0) -> dict[str, torch.Tensor]:
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Unloaded(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, *args, **kwargs):  # keep the freshly built layers
            return None

    empty = io.BytesIO()
    torch.save({}, empty)
    empty.seek(0)
    template = Unloaded("inception-v3-compat", ["2048"], feature_extractor_weights_path=empty).state_dict()
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, tensor in template.items():
        if name.endswith("running_var") or (name.endswith(".weight") and ".bn." in name):
            state[name] = torch.ones_like(tensor)
        elif name.endswith("running_mean") or name.endswith(".bias"):
            state[name] = torch.zeros_like(tensor)
        elif name.endswith("num_batches_tracked"):
            state[name] = tensor.clone()
        elif name == "fc.weight":
            state[name] = torch.randn(tensor.shape, generator=generator) * 80 / tensor.shape[1] ** 0.5
        else:  # convolution weights [out, in, kh, kw]
            fan_in = tensor[0].numel()
            state[name] = torch.randn(tensor.shape, generator=generator) * (2.0 / fan_in) ** 0.5
    return state


def save_random_inception(path: Path, seed: int = 0) -> str:
    """Write a random state dict to ``path``; returns its SHA-256."""
    torch.save(random_inception_state(seed), path)
    return hashlib.sha256(path.read_bytes()).hexdigest()
