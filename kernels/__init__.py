"""Triton kernels of xar_infer, installed as ``xar_infer.kernels``.

Each file holds one kernel family: the ``@triton.jit`` kernel next to the Python launcher that checks
its inputs. Each is tested against the package's own PyTorch path: ``model.cached_attention``,
``model.rms_norm_modulate``, ``model.gated_residual``, ``model.gelu_mul`` and ``sampling.flow_step``;
``xar_infer.backends`` chooses between them. Kernels are compiled for CUDA, or run by Triton's interpreter on CPU when ``TRITON_INTERPRET=1`` is set before
this package is imported.
"""

from .adaln import gated_residual, gelu_mul, rms_norm_modulate
from .attention import ragged_attention
from .flow_step import flow_step

__all__ = ["flow_step", "gated_residual", "gelu_mul", "ragged_attention", "rms_norm_modulate", "runs_interpreted"]


def runs_interpreted() -> bool:
    """Whether these kernels were set up for Triton's CPU interpreter (``TRITON_INTERPRET=1`` at import)."""
    from triton.runtime.interpreter import InterpretedFunction

    from .attention import _ragged_attention_kernel

    return isinstance(_ragged_attention_kernel, InterpretedFunction)
