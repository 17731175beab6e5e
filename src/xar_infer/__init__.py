"""xar_infer: exact, fast inference for xAR class-conditional image generators."""

from .checkpoint_io import CheckpointError
from .config import PRESETS, XARConfig
from .loading import convert_checkpoint
from .model import KVCache, XARTransformer
from .pipeline import NumericalError, XARPipeline, XARPipelineOutput
from .vae import load_vae
from .vae_tiling import vae_tiling_backend

__all__ = [
    "CheckpointError",
    "KVCache",
    "NumericalError",
    "PRESETS",
    "XARConfig",
    "XARPipeline",
    "XARPipelineOutput",
    "XARTransformer",
    "convert_checkpoint",
    "load_vae",
    "vae_tiling_backend",
]
__version__ = "0.1.0"
