"""Continuous batching: many generation requests on one transformer, one packed network call at a time.

``requests`` holds what is asked (``GenerationRequest``) and what is tracked (``Job``); ``scheduler``
decides which jobs run; ``engine`` runs the network calls and moves each job's sampler.
"""

from .engine import Engine
from .requests import GenerationFuture, GenerationRequest

__all__ = ["Engine", "GenerationFuture", "GenerationRequest"]
