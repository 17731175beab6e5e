"""Continuous batching: many generation requests on one transformer, one packed network call at a time.

``requests`` holds what is asked (``GenerationRequest``) and what is tracked (``Job``); ``scheduler``
decides which jobs run; ``engine`` runs the network calls and moves each job's sampler;
``modulations`` keeps the jobs' adaLN modulations.
"""

from .engine import EagerNetwork, Engine, generate_latents
from .requests import GenerationFuture, GenerationRequest

__all__ = ["EagerNetwork", "Engine", "generate_latents", "GenerationFuture", "GenerationRequest"]
