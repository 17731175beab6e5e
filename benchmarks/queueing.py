"""How far continuous batching can lower latency below static batching's, for a given call cost.

    python benchmarks/queueing.py                 # measure the small and tiny models here, then simulate
    python benchmarks/queueing.py --quick         # a smoke run in seconds

``benchmarks/engine.py`` part b measures the two policies on real calls; this file asks what the best
continuous batcher could do on the same machine, so that a measured result can be read against its
ceiling. Both policies are simulated without any overhead of their own, on the same arrival traces:

* **static**: a batch starts when the previous one ends and takes every image that has arrived, up to
  ``max_images``; all of them finish when the batch does (``calls`` network calls of its rows).
* **continuous**: before every call, waiting images join, first come first served, while there are
  free rows; every image in flight advances by one call, and leaves after its ``calls``-th.

A call of ``rows`` rows takes ``a + b * rows`` seconds. Only the share of a full call's time that is
fixed, ``a / (a + b * max_rows)``, matters (the ratios do not depend on the time unit). The loads are
fractions of the capacity, ``max_images`` images per full static batch.

**The ceiling.** With a fixed cost (``b = 0``) every batch lasts ``B = calls * a``. An image that
arrives while a static batch runs waits for its end (``B / 2`` on average, for Poisson arrivals), then
takes its own batch: at most ``1.5 B`` on average unless it waits more than one batch for room. No
policy can finish an image in fewer than ``calls`` calls, which take ``B``. So continuous batching's
mean latency is at most about 1.5x lower than static batching's, whatever the load, unless static
batches overflow ``max_images``; and the more a call's time grows with its rows (``b > 0``), the less
continuous batching gains, because it runs every image in flight at every call (processor sharing).

The cost of a call here is measured: ``pipe(...)`` of k images (two rows each, guided), its time over
its network calls, for several k, fitted by least squares. Results go to
results/queueing-<cpu>.json and .md.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from engine import GUIDANCE, config_of, cpu_slug, generators, on_host, percentile, random_pipeline  # noqa: E402
from report import save_table  # noqa: E402
from run import machine_info  # noqa: E402


@dataclass(frozen=True)
class CallCost:
    """Seconds of one network call of ``rows`` rows: ``fixed + per_row * rows``."""

    fixed: float
    per_row: float

    def __call__(self, rows: int) -> float:
        return self.fixed + self.per_row * rows

    def fixed_share(self, rows: int) -> float:
        return self.fixed / self(rows)


def poisson_arrivals(rate: float, count: int, seed: int) -> list[float]:
    rng, t, out = random.Random(seed), 0.0, []
    for _ in range(count):
        t += rng.expovariate(rate)
        out.append(t)
    return out


def simulate_static(arrivals: list[float], calls: int, cost: CallCost, max_images: int,
                    rows_per_image: int = 2) -> list[float]:
    """Each image's latency under static batching (arrivals in increasing order)."""
    latencies, now, i = [], 0.0, 0
    while i < len(arrivals):
        now = max(now, arrivals[i])
        batch = 0
        while i + batch < len(arrivals) and arrivals[i + batch] <= now and batch < max_images:
            batch += 1
        now += calls * cost(rows_per_image * batch)
        latencies += [now - arrival for arrival in arrivals[i:i + batch]]
        i += batch
    return latencies


def simulate_continuous(arrivals: list[float], calls: int, cost: CallCost, max_images: int,
                        rows_per_image: int = 2) -> list[float]:
    """Each image's latency under continuous batching (in order of completion, which is arrival order)."""
    latencies, now, i = [], 0.0, 0
    running: list[list[float]] = []  # [arrival, calls left]
    while i < len(arrivals) or running:
        if not running:
            now = max(now, arrivals[i])
        while i < len(arrivals) and arrivals[i] <= now and len(running) < max_images:
            running.append([arrivals[i], calls])
            i += 1
        now += cost(rows_per_image * len(running))
        for image in running:
            image[1] -= 1
        latencies += [now - arrival for arrival, left in running if left == 0]
        running = [image for image in running if image[1] > 0]
    return latencies


def compare(cost: CallCost, calls: int, max_images: int, loads: list[float], requests: int, seeds: list[int]) -> list[dict]:
    """Both policies on the same traces at each load; latencies pooled over the seeds."""
    capacity = max_images / (calls * cost(2 * max_images))
    rows = []
    for load in loads:
        static, continuous = [], []
        for seed in seeds:
            arrivals = poisson_arrivals(load * capacity, requests, seed)
            static += simulate_static(arrivals, calls, cost, max_images)
            continuous += simulate_continuous(arrivals, calls, cost, max_images)
        s = {"mean": statistics.mean(static), "p99": percentile(static, 99)}
        c = {"mean": statistics.mean(continuous), "p99": percentile(continuous, 99)}
        rows.append({"load": load, "static_s": s, "continuous_s": c,
                     "mean_ratio": s["mean"] / c["mean"], "p99_ratio": s["p99"] / c["p99"]})
    return rows


def measure_cost(pipe, images: list[int], repeats: int) -> dict:
    """Median seconds per network call of ``pipe(...)`` at each batch of ``images``, and the fitted line."""
    calls = []
    pipe([0], generator=generators([0]), output_type="latent",
         callback_on_step_end=lambda p, step, t, kw: calls.append(step) or {})
    calls_per_image = len(calls)
    points = []
    for k in images:
        labels = list(range(k))
        seconds = []
        for _ in range(repeats + 1):  # the first is a warm-up
            begin = time.perf_counter()
            on_host(pipe(labels, generator=generators(labels), output_type="latent").images)
            seconds.append(time.perf_counter() - begin)
        points.append({"images": k, "rows": 2 * k, "seconds_per_call": statistics.median(seconds[1:]) / calls_per_image})
    x = [p["rows"] for p in points]
    y = [p["seconds_per_call"] for p in points]
    mx, my = statistics.mean(x), statistics.mean(y)
    per_row = sum((u - mx) * (v - my) for u, v in zip(x, y)) / sum((u - mx) ** 2 for u in x)
    return {"calls_per_image": calls_per_image, "points": points, "fixed_s": my - per_row * mx, "per_row_s": per_row}


def markdown(report: dict) -> str:
    m, s = report["machine"], report["settings"]
    where = (f"{m['cpu']}, {m['cores']} CPU cores" if s["device"] == "cpu"
             else f"{m['device_name']} (host: {m['cpu']}, {m['cores']} cores)")
    lines = [f"# The ceiling of continuous batching against static batching: {where}", "",
             f"`{s['command']}`: simulated policies without overheads (see `benchmarks/queueing.py`), "
             f"{s['requests']} requests x {len(s['seeds'])} traces per load, max_rows {2 * s['max_images']} "
             f"({s['max_images']} images of two rows). Call costs measured with torch {m['torch']}, {s['dtype']}, "
             f"{s['backend']} backend{', CUDA graphs' if s['cuda_graphs'] else ''}, {m['cpu_threads']} CPU threads, random weights, guidance {GUIDANCE}, {s['steps']} SDE steps per cell.", "",
             "Above 1: continuous batching's latency is lower.", "",
             "| call cost | fixed share of a full call | load | static mean ¹ | continuous mean ¹ | mean, static / continuous "
             "| p99, static / continuous |", "|---|---:|---:|---:|---:|---:|---:|"]
    for model in report["models"]:
        for row in model["simulated"]:
            lines.append(f"| {model['name']} | {model['fixed_share']:.0%} | {row['load']:.0%} | {row['static_s']['mean']:.3f} "
                         f"| {row['continuous_s']['mean']:.3f} | **{row['mean_ratio']:.2f}x** | {row['p99_ratio']:.2f}x |")
    lines += ["", "¹ Seconds for the measured costs; for the modelled ones, in units of a full call's time.", "",
              "Measured call costs (median seconds per call of a whole `pipe(...)`, over its network calls):", "",
              "| model | calls per image | images: ms per call | fitted: fixed ms + ms per row |", "|---|---:|---|---|"]
    for model in report["models"]:
        cost = model.get("measured")
        if cost:
            points = ", ".join(f"{p['images']}: {1e3 * p['seconds_per_call']:.1f}" for p in cost["points"])
            lines.append(f"| {model['name']} | {cost['calls_per_image']} | {points} "
                         f"| {1e3 * cost['fixed_s']:.2f} + {1e3 * cost['per_row_s']:.3f} x rows |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the tiny model, few requests: a smoke run")
    parser.add_argument("--models", default="small,tiny", help="models whose call cost is measured here")
    parser.add_argument("--fixed-shares", default="1.0,0.75,0.5",
                        help="also simulate these shares of a full call's time that do not grow with its rows")
    parser.add_argument("--steps", type=int, default=10, help="SDE steps per cell (as benchmarks/engine.py part b)")
    parser.add_argument("--max-rows", type=int, default=32)
    parser.add_argument("--images", default="1,2,4,8,16", help="batches timed to fit the call cost")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--loads", default="0.5,0.9")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--backend", default="torch", help="torch (default), triton or auto")
    parser.add_argument("--cuda-graphs", action="store_true")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out-dir", type=Path, default=HERE / "results")
    parser.add_argument("--name", help="output file stem (default: queueing-<cpu>, or <gpu>-queueing)")
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.steps, args.images, args.repeats, args.requests = "tiny", 1, "1,2", 1, 50
    torch.set_num_threads(args.threads)
    max_images = args.max_rows // 2
    loads = [float(x) for x in args.loads.split(",")]
    seeds = [int(x) for x in args.seeds.split(",")]
    models = []
    for name in filter(None, args.models.split(",")):
        pipe = random_pipeline(config_of(name), args.steps, device=args.device, dtype=args.dtype, backend=args.backend,
                               cuda_graphs=args.cuda_graphs)
        measured = measure_cost(pipe, [int(k) for k in args.images.split(",")], args.repeats)
        cost = CallCost(max(measured["fixed_s"], 0.0), max(measured["per_row_s"], 0.0))
        models.append({"name": f"{name} model, measured", "measured": measured, "calls_per_image": measured["calls_per_image"],
                       "fixed_share": cost.fixed_share(args.max_rows),
                       "simulated": compare(cost, measured["calls_per_image"], max_images, loads, args.requests, seeds)})
        print(f"{name}: {1e3 * cost.fixed:.2f} ms + {1e3 * cost.per_row:.3f} ms x rows per call", flush=True)
    calls = models[0]["calls_per_image"] if models else 4 * args.steps
    for share in (float(x) for x in filter(None, args.fixed_shares.split(","))):
        # A full call of max_rows rows takes 1 time unit, ``share`` of it fixed.
        cost = CallCost(share, (1 - share) / args.max_rows)
        models.append({"name": f"{share:.0%} fixed (modelled)", "fixed_share": share, "calls_per_image": calls,
                       "simulated": compare(cost, calls, max_images, loads, args.requests, seeds)})
    for model in models:
        for row in model["simulated"]:
            print(f"{model['name']}, load {row['load']:.0%}: mean {row['mean_ratio']:.2f}x, p99 {row['p99_ratio']:.2f}x", flush=True)

    machine = {**machine_info(args.device), "cores": os.cpu_count()}
    report = {"machine": machine,
              "settings": {"command": "python benchmarks/queueing.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                           "device": args.device, "dtype": args.dtype, "backend": args.backend,
                           "cuda_graphs": args.cuda_graphs, "steps": args.steps, "max_images": max_images, "requests": args.requests, "seeds": seeds},
              "models": models}
    name = args.name or (f"queueing-{cpu_slug(machine['cpu'])}" if args.device == "cpu"
                         else f"{cpu_slug(machine['device_name'])}-queueing")
    save_table(report, markdown(report), args.out_dir, name)


if __name__ == "__main__":
    main()
