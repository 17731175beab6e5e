"""CPU threads for tests that run many small operators, in the test process and in those it starts.

With two threads, each operator that torch runs in parallel ends in a barrier where OpenMP spins for
the other thread; when another process holds that core, the spin lasts until the scheduler runs the
other thread again. On a 2-core machine with one core busy, a tiny model's generation (thousands of
small operators) then took ten times longer, in CPU time too. One thread loses nothing on operators
this small. Tests of large operators keep both threads: they gain from them on a quiet machine.
"""

from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Import this into a test module to run all of its tests on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def subprocess_env(threads: int | None = 1, **extra: str) -> dict[str, str]:
    """The environment for a test's subprocess, plus ``extra``: OpenMP threads that sleep instead of
    spinning while they wait (OMP_WAIT_POLICY=PASSIVE: a shared core goes to whoever has work) and,
    unless ``threads`` is None, that many of them. Both are read when the process loads torch."""
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", **extra}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return env
