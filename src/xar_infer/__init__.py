"""xar_infer: exact, fast inference for xAR class-conditional image generators."""

from .errors import CheckpointError, InvalidArgumentError, NumericalError, ResourceError, XARError
from .config import PRESETS, XARConfig
from .engine import Engine, GenerationFuture, GenerationRequest
from .hub import convert_checkpoint
from .model import KVCache, XARTransformer
from .pipeline import XARPipeline, XARPipelineOutput
from .settings import SamplingSettings
from .vae import load_vae
from .vae_tiling import vae_tiling_backend

__all__ = [
    "CheckpointError",
    "Engine",
    "GenerationFuture",
    "GenerationRequest",
    "InvalidArgumentError",
    "KVCache",
    "NumericalError",
    "PRESETS",
    "ResourceError",
    "SamplingSettings",
    "XARConfig",
    "XARError",
    "XARPipeline",
    "XARPipelineOutput",
    "XARTransformer",
    "convert_checkpoint",
    "load_vae",
    "vae_tiling_backend",
]
__version__ = "0.1.0"
