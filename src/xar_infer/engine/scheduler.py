"""Which jobs run in the next network call: first come, first served, within the cache's slots.

The scheduler decides; the engine (``engine.py``) runs the calls. A job needs one KV-cache slot per
image and guidance half for its whole life. Waiting jobs are admitted in arrival order, at every
network call, while their slots fit; a job that does not fit waits, and so does everyone behind it
(no job is overtaken, so none starves). Slots return to the pool when a job finishes, fails or is
cancelled.
"""

from __future__ import annotations

import threading
from collections import deque

from .requests import Job


class SlotPool:
    """The free slots of a KV cache of ``num_slots`` slots, handed out around a ring.

    A job takes the first run of free slots at or after the end of the previous job's, so jobs
    admitted one after another hold consecutive slots. Jobs at the same cell then usually sit side by
    side, and attention reads their keys and values as one slice of the cache instead of gathering
    them (``model.cached_attention``). Without such a run, the next free slots around the ring.
    """

    def __init__(self, num_slots: int):
        self.num_slots = num_slots
        self._is_free = [True] * num_slots
        self._num_free = num_slots
        self._next = 0  # where the next search starts: just after the last slot handed out

    @property
    def num_free(self) -> int:
        return self._num_free

    def take(self, count: int) -> list[int]:
        if count > self._num_free:
            raise RuntimeError(f"{count} slots asked, {self._num_free} free")  # the scheduler checks first
        n, free = self.num_slots, self._is_free
        ring = [(self._next + i) % n for i in range(n)]
        start = next((s for s in ring if s + count <= n and all(free[s:s + count])), None)
        slots = list(range(start, start + count)) if start is not None else [s for s in ring if free[s]][:count]
        for s in slots:
            free[s] = False
        self._num_free -= count
        self._next = (slots[-1] + 1) % n
        return slots

    def give_back(self, slots: list[int]) -> None:
        for s in slots:
            self._is_free[s] = True
        self._num_free += len(slots)


class Scheduler:
    """Waiting and running jobs. ``add`` may be called from any thread; the rest from the engine's."""

    def __init__(self, num_slots: int):
        self.slots = SlotPool(num_slots)
        self.waiting: deque[Job] = deque()
        self.running: list[Job] = []
        self._lock = threading.Lock()

    def add(self, job: Job) -> None:
        with self._lock:
            self.waiting.append(job)

    def has_work(self) -> bool:
        with self._lock:
            return bool(self.running or self.waiting)

    def schedule(self) -> tuple[list[Job], list[Job]]:
        """Admit what fits and drop what was cancelled. Returns (the jobs of the next call, the jobs
        just admitted, which still need their first evaluation)."""
        for job in [j for j in self.running if j.future.cancelled()]:
            self.release(job)
        admitted = []
        with self._lock:
            while self.waiting:
                job = self.waiting[0]
                if job.future.cancelled():
                    self.waiting.popleft()
                    continue
                if job.num_slots > self.slots.num_free:
                    break
                self.waiting.popleft()
                job.slots = self.slots.take(job.num_slots)
                self.running.append(job)
                admitted.append(job)
        return list(self.running), admitted

    def release(self, job: Job) -> None:
        """The job left (finished, failed or cancelled): its slots are free again."""
        self.running.remove(job)
        self.slots.give_back(job.slots)
        job.slots = []

    def drain(self) -> list[Job]:
        """Every job, waiting or running, taken out (at shutdown)."""
        with self._lock:
            jobs = [*self.running, *self.waiting]
            self.waiting.clear()
        for job in list(self.running):
            self.release(job)
        return jobs
