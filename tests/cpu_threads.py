"""CPU threads for tests that run many small operators, in the test process and in those it starts.

With two threads, each operator that torch runs in parallel ends in a barrier where OpenMP spins for
the other thread; when another process holds that core, the spin lasts until the scheduler runs the
other thread again. On a 2-core machine with one core busy, a tiny model's generation (thousands of
small operators) then took ten times longer, in CPU time too. One thread loses nothing on operators
this small, and less than it saves under load where large ones alternate with many small ones (a
full-size VAE decode: convolutions, then norms and activations). The benchmark run of real-size
models keeps both threads in its subprocesses, told to sleep rather than spin while they wait.
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch


@contextlib.contextmanager
def one_thread():
    """torch on one intra-op thread inside the block, on as many as before after it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Import this into a test module to run all of its tests on one thread."""
    with one_thread():
        yield


def subprocess_env(threads: int | None = 1, **extra: str) -> dict[str, str]:
    """The environment for a test's subprocess, plus ``extra``: OpenMP threads that sleep instead of
    spinning while they wait (OMP_WAIT_POLICY=PASSIVE: a shared core goes to whoever has work) and,
    unless ``threads`` is None, that many of them. Both are read when the process loads torch."""
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", **extra}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return env
