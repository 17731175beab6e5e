"""Memory checks before allocating: refuse a request that cannot fit, with the estimate, instead of
growing until the operating system kills the process.

Estimates count the large buffers a request must hold at once, not every small one, so a request
that passes may still run out, and then fails with the allocator's error.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .errors import ResourceError


def format_bytes(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def available_bytes(device: torch.device | str) -> int:
    """Memory a new allocation can still get on ``device``: free plus reclaimable on the host (within a
    container's limit), free plus PyTorch's cached blocks on a CUDA device."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return _host_available_bytes()


def _host_available_bytes() -> int:
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except OSError:
        pass
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):  # no sysconf (Windows): nothing to check against
            return 2**63
    try:  # a cgroup v2 limit (containers) can be far below the machine's memory
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            available = min(available, max(int(limit) - used, 0))
    except (OSError, ValueError):
        pass
    return available


def require_memory(needed: float, device: torch.device | str, what: str, fix: str) -> None:
    """Raise :class:`ResourceError` if ``needed`` bytes cannot fit on ``device``."""
    have = available_bytes(device)
    if needed > have:
        where = "this machine" if torch.device(device).type != "cuda" else str(device)
        raise ResourceError(f"{what} needs about {format_bytes(needed)}, but {where} has {format_bytes(have)} "
                            f"available; {fix}")
