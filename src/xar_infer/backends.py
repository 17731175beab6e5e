"""Which implementation runs each hot op: PyTorch (the reference) or the Triton kernels.

The ops that differ between backends are the ones inside a block (``model.BlockOps``: the attention of
a call's cells over their KV-cache slots, with RoPE, cache write and softmax; the RMSNorm
with its modulation; the gated residual; the MLP's GELU product) and the sampler's per-step state
update, ``sampling.flow_step``. Their torch versions in ``model`` and ``sampling`` define what both
compute; ``xar_infer.kernels`` holds the fused Triton ones, tested against them. ``resolve_backend``
is the one place that chooses.

Both backends run the linear layers through ``onednn_linear``: on a GPU that is cuBLAS as usual, and
in fp32 on a CPU it is oneDNN's matmul instead of the BLAS behind ``F.linear``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .errors import InvalidArgumentError
from .model import BlockOps
from .sampling import flow_step

BACKENDS = ("auto", "torch", "triton")


@dataclass(frozen=True)
class Backend:
    """The implementations of the hot ops: a block's (``model.BlockOps``) and the sampler step's
    (``sampling.flow_step`` defines its contract)."""

    name: str
    ops: BlockOps
    flow_step: Callable


@functools.cache
def _onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def onednn_linear(x: torch.Tensor, layer: torch.nn.Linear) -> torch.Tensor:
    """``layer(x)``, with fp32 products on CPUs computed by oneDNN rather than the BLAS behind ``F.linear``.

    Why: PyTorch's x86 wheels compute fp32 ``F.linear`` with MKL. On the 2-core AMD EPYC we develop on
    (AVX-512), MKL's matmul peaks at 130-180 GFLOP/s and oneDNN's at 300-430. oneDNN is bundled with
    PyTorch and already runs ``F.linear`` in bf16. With it, xAR-B generates about twice as fast
    (``benchmarks/results/cpu-fp32-onednn-b1.md``). It is still fp32 arithmetic, summed in another order,
    so results differ from ``F.linear`` at rounding level, as two BLAS libraries do. Anything else (other
    dtypes and devices, autograd, or ``torch.backends.mkldnn.enabled = False``) goes to ``F.linear``.

    A row's result does not depend on how many rows come with it, so that an image does not depend on
    its batch (``tests/test_batch_invariance.py`` checks this; it is how oneDNN's kernels behave, not a
    documented guarantee). From two rows on, oneDNN's matrix kernel computes every row alike; a lone
    row, which it would give to a matrix-vector kernel that sums in another order, is computed as two.
    MKL's ``F.linear`` has no such property: with few rows, the rows past a multiple of 4 take another
    kernel.
    """
    weight = layer.weight
    if (x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32
            or not torch.backends.mkldnn.enabled or not _onednn_available()
            or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
        return F.linear(x, weight, layer.bias)
    if x.numel() == x.shape[-1]:  # a lone row: computed as two, see above
        pair = x.reshape(1, -1).expand(2, -1)
        return torch.ops.mkldnn._linear_pointwise(pair, weight, layer.bias, "none", [], "")[:1].view(*x.shape[:-1], -1)
    return torch.ops.mkldnn._linear_pointwise(x, weight, layer.bias, "none", [], "")


TORCH = Backend("torch", BlockOps(linear=onednn_linear), flow_step)


@functools.cache  # one object, so that CUDA graphs captured with it are recognised at the next call
def _triton_backend() -> Backend:
    from . import kernels

    def attention(q, k, v, cos, sin, cache, layer, batch):
        return kernels.ragged_attention(q, k, v, cos, sin, cache.keys[layer], cache.values[layer], batch.slots,
                                        batch.cells, batch.row_starts, q.shape[1])

    ops = BlockOps(attention=attention, attention_uses_groups=False, linear=onednn_linear,
                   rms_norm_modulate=kernels.rms_norm_modulate, gated_residual=kernels.gated_residual,
                   gelu_mul=kernels.gelu_mul)
    return Backend("triton", ops, kernels.flow_step)


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(name: str, device: torch.device | str) -> Backend:
    """The backend to run on ``device``: ``"torch"``, ``"triton"``, or ``"auto"`` (Triton on CUDA when
    it is installed, PyTorch otherwise). Triton on CPU runs its kernels through Triton's interpreter,
    which must be switched on with ``TRITON_INTERPRET=1`` before xar_infer's kernels are imported."""
    if name not in BACKENDS:
        raise InvalidArgumentError(f"unknown backend {name!r}; choose one of {BACKENDS}")
    device = torch.device(device)
    if name == "torch" or (name == "auto" and not (device.type == "cuda" and triton_available())):
        return TORCH
    if not triton_available():
        raise InvalidArgumentError("backend='triton' needs the triton package (pip install triton, Linux); "
                         "use backend='torch' or 'auto'")
    if device.type != "cuda":
        from . import kernels

        if device.type != "cpu" or not kernels.runs_interpreted():
            raise InvalidArgumentError(f"backend='triton' runs on CUDA devices, not {device.type}; on CPU it runs only "
                             "under Triton's interpreter (set TRITON_INTERPRET=1 before starting Python, slow, "
                             "for testing): use backend='torch' or 'auto' here")
    return _triton_backend()
