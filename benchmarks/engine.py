"""The continuous-batching engine against static batching and against the lockstep sampler, in one run.

    git worktree add /tmp/xar-lockstep 9d58fcb                    # the lockstep sampler, before the engine
    python benchmarks/engine.py --lockstep-tree /tmp/xar-lockstep  # the full run: about 20 min on 2 CPU cores
    python benchmarks/engine.py --quick --lockstep-tree ...        # a tiny model, seconds: a smoke run

Three parts, all with random weights (speed does not depend on the values), fp32, the torch backend:

a. **One static batch.** ``pipe(...)``, which runs its batch as one job on the engine
   (``generate_latents``), against the same ``pipe(...)`` of the lockstep tree, on xAR-B shapes at
   batch 1 and 8, with --static-steps SDE steps per cell. Each side runs in its own worker process that
   imports its own tree's xar_infer; the rounds alternate between them (and which goes first), and
   the speed ratio is the median of the rounds' ratios. The two sides' latents are compared too.
b. **Open-loop arrivals.** Requests arrive as a Poisson process at 50% and 90% of the capacity, the
   images/s of full static batches of --max-rows rows. *Continuous*: an engine in its background
   thread, each request submitted at its arrival time. *Static*: a batch starts when the previous one
   ends and takes whatever has arrived, up to max_rows / 2 images (guided: two rows each), run by
   ``pipe(...)`` with one generator per image. Both see the same arrival trace, --serve-repeats times
   with the order alternating; latency is from arrival to result. Reported: mean, p50, p99 latency
   (pooled over the repeats) and throughput (images over the time from the first arrival to the last
   result). Also what the engine sustains: images/s with many single-image requests submitted at once.
c. **Mixed settings.** Half the images at --mixed-steps steps per cell, half at --mixed-taper (one
   count per cell), all submitted at once to one engine, against the two groups as two static batches
   one after the other. Alternating rounds; images/s, and the largest latent difference between the
   two ways (a request's image equals ``pipe`` with its own generator).

b and c run on each of --serve-models: "small" (xAR-B's token grid and cells at width 128, depth 2+2,
so that a run of many requests takes minutes on a CPU), "tiny" (width 32, depth 1+1: a call costs
little more than its fixed overhead, as small batches on a GPU do) or a preset. How much continuous
batching gains depends on how a call's time grows with its rows, so the file reports both. Results
go to results/cpu-engine-<cpu>.json and .md, with the CPU named and the load average during each part.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning: the engine's thread, the thread that submits and the
# idle worker of part a share the cores. OpenMP reads this when torch loads it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent

# xAR-B's 16x16 grid of 8x8 cells (4 cells, 16 channels), narrow and shallow: the same sampler and
# engine work per call, far fewer FLOPs.
SMALL = {"dim": 128, "encoder_depth": 2, "decoder_depth": 2, "num_heads": 4, "mlp_hidden_dim": 256}
TINY = {"dim": 32, "encoder_depth": 1, "decoder_depth": 1, "num_heads": 2, "mlp_hidden_dim": 48}
GUIDANCE = 2.7  # xAR-B's, with the released linear schedule: every image is two rows


# ---- the model, built alike in both trees ---------------------------------------------------------

def random_pipeline(config_fields: dict, steps, seed: int = 0, device: str = "cpu", dtype: str = "fp32",
                    backend: str = "torch", cuda_graphs: bool = False):
    """An ``XARPipeline`` (latents only) on a transformer of ``config_fields`` with random weights drawn
    from ``seed`` in name order, so both trees build the same model; then moved to ``device`` and
    ``dtype`` (the lockstep tree of part a only takes the defaults)."""
    from xar_infer import XARPipeline, XARTransformer
    from xar_infer.cli import DTYPES
    from xar_infer.config import XARConfig

    model = XARTransformer(XARConfig(**config_fields)).eval().requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
    model.load_state_dict(model.state_dict())  # zero again the units that pad an MLP width
    pipe = XARPipeline(model.to(device, DTYPES[dtype]), None, num_inference_steps=steps, guidance_scale=GUIDANCE,
                       backend=backend)
    if cuda_graphs:
        pipe.enable_cuda_graphs()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def on_host(latents: torch.Tensor) -> torch.Tensor:
    """The latents copied to the host: on a GPU, a result counts once it is there (this waits for it)."""
    return latents.cpu()


def config_of(name: str) -> dict:
    """The fields of the XARConfig called ``name``: "small", "tiny" or a preset."""
    from xar_infer.config import PRESETS, XARConfig

    fields = {"small": SMALL, "tiny": TINY}.get(name)
    return dataclasses.asdict(XARConfig(**fields) if fields else PRESETS[name].config)


def worker(args) -> None:
    """Part a's side in a process of its own: one line in, ``B PATH``, one JSON line out."""
    import xar_infer

    pipe = random_pipeline(json.loads(args.config_json), args.static_steps)
    print(json.dumps({"xar_infer": xar_infer.__file__}), flush=True)
    for line in sys.stdin:
        batch, path = line.split()
        begin = time.perf_counter()
        latent = pipe(list(range(int(batch))), generator=torch.Generator().manual_seed(0), output_type="latent").images
        seconds = time.perf_counter() - begin
        if path != "-":
            torch.save(latent, path)
        print(json.dumps({"seconds": seconds}), flush=True)


class Worker:
    """A worker process on ``tree``'s xar_infer."""

    def __init__(self, tree: Path, config: dict, steps: int, threads: int):
        env = {**os.environ, "PYTHONPATH": str(tree / "src"), "OMP_WAIT_POLICY": "PASSIVE",
               "OMP_NUM_THREADS": str(threads)}
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--config-json", json.dumps(config),
                   "--static-steps", str(steps)]
        self.process = subprocess.Popen(command, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.module = self._answer()["xar_infer"]
        if not Path(self.module).resolve().is_relative_to(tree.resolve()):
            raise SystemExit(f"the worker for {tree} imported xar_infer from {self.module}")

    def _answer(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise SystemExit(f"a worker died (exit code {self.process.wait()}); its error is above")
        return json.loads(line)

    def generate(self, batch: int, path: Path | None = None) -> float:
        self.process.stdin.write(f"{batch} {path or '-'}\n")
        self.process.stdin.flush()
        return self._answer()["seconds"]

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


def static_batch(args, scratch: Path) -> dict:
    """Part a: engine and lockstep workers, alternating rounds at each batch size."""
    config = config_of(args.static_model)
    trees = {"engine": HERE.parent, "lockstep": args.lockstep_tree}
    workers = {name: Worker(tree, config, args.static_steps, args.threads) for name, tree in trees.items()}
    rows = []
    try:
        for batch in args.static_batches:
            load = [os.getloadavg()[0]]
            latents = {name: scratch / f"{name}-b{batch}.pt" for name in workers}
            for name, w in workers.items():
                w.generate(batch, latents[name])  # warm-up, and the latents to compare
            difference = (torch.load(latents["engine"]) - torch.load(latents["lockstep"])).abs().max().item()
            seconds = {name: [] for name in workers}
            for round_ in range(args.rounds):
                for name in (("engine", "lockstep") if round_ % 2 == 0 else ("lockstep", "engine")):
                    seconds[name].append(workers[name].generate(batch))
            load.append(os.getloadavg()[0])
            ratios = [lock / eng for eng, lock in zip(seconds["engine"], seconds["lockstep"])]
            rows.append({"batch": batch, "engine_seconds": seconds["engine"], "lockstep_seconds": seconds["lockstep"],
                         "engine_median_seconds": statistics.median(seconds["engine"]),
                         "lockstep_median_seconds": statistics.median(seconds["lockstep"]),
                         "engine_speed_over_lockstep": statistics.median(ratios), "round_ratios": ratios,
                         "max_abs_latent_difference": difference, "load_average": load})
            print(f"a. batch {batch}: engine {rows[-1]['engine_median_seconds']:.2f} s, lockstep "
                  f"{rows[-1]['lockstep_median_seconds']:.2f} s, engine speed / lockstep {rows[-1]['engine_speed_over_lockstep']:.3f}",
                  flush=True)
    finally:
        for w in workers.values():
            w.close()
    return {"model": args.static_model, "steps_per_cell": args.static_steps, "rounds": args.rounds,
            "lockstep_tree": str(args.lockstep_tree), "lockstep_commit": git_commit(args.lockstep_tree), "rows": rows}


def git_commit(tree: Path) -> str | None:
    """The commit checked out at ``tree`` when it is a checkout or worktree (not inside another one)."""
    if not (tree / ".git").exists():
        return None
    done = subprocess.run(["git", "-C", str(tree), "rev-parse", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() or None


# ---- b: open-loop arrivals ------------------------------------------------------------------------

def generators(seeds) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


def percentile(values: list[float], p: float) -> float:
    """Nearest rank: the smallest value with at least p% of the values at or below it."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def summary(latencies: list[float], throughputs: list[float]) -> dict:
    return {"mean_latency_s": statistics.mean(latencies), "p50_latency_s": percentile(latencies, 50),
            "p99_latency_s": percentile(latencies, 99), "throughput_images_per_s": statistics.mean(throughputs),
            "latencies_s": latencies}


def finished(requests: list[dict], done: list[float]) -> dict:
    """One pass over a trace: each request's latency, and images over the first arrival to the last result."""
    arrivals = [r["arrival"] for r in requests]
    return {"latencies_s": [d - a for a, d in zip(arrivals, done)],
            "throughput_images_per_s": len(done) / (max(done) - min(arrivals))}


def serve_continuous(pipe, requests: list[dict], max_rows: int) -> dict:
    """Each request submitted to the engine's background thread at its arrival time."""
    from xar_infer import GenerationRequest

    done = [0.0] * len(requests)
    with pipe.engine(max_rows=max_rows) as engine:
        start = time.perf_counter()
        futures = []
        for i, r in enumerate(requests):
            time.sleep(max(0.0, start + r["arrival"] - time.perf_counter()))
            future = engine.submit(GenerationRequest(r["label"], seed=r["seed"], output_type="latent"))

            def record(future, i=i):
                on_host(future.result())
                done[i] = time.perf_counter() - start

            future.add_done_callback(record)
            futures.append(future)
        for f in futures:
            f.result()
        calls, rows = engine.num_calls, engine.num_rows
    return {**finished(requests, done), "network_calls": calls, "mean_rows_per_call": rows / calls}


def serve_static(pipe, requests: list[dict], max_images: int) -> dict:
    """A batch starts when the previous one ends and takes what has arrived, up to ``max_images``."""
    done, waiting, batches = [0.0] * len(requests), list(range(len(requests))), []
    start = time.perf_counter()
    while waiting:
        time.sleep(max(0.0, start + requests[waiting[0]]["arrival"] - time.perf_counter()))
        now = time.perf_counter() - start
        batch = [i for i in waiting if requests[i]["arrival"] <= now][:max_images]
        on_host(pipe([requests[i]["label"] for i in batch], generator=generators(requests[i]["seed"] for i in batch),
                     output_type="latent").images)
        end = time.perf_counter() - start
        for i in batch:
            done[i] = end
        waiting = waiting[len(batch):]
        batches.append(len(batch))
    return {**finished(requests, done), "batches": len(batches), "mean_images_per_batch": statistics.mean(batches)}


def arrival_trace(rate: float, count: int, num_classes: int, seed: int) -> list[dict]:
    rng, t, trace = random.Random(seed), 0.0, []
    for i in range(count):
        t += rng.expovariate(rate)
        trace.append({"arrival": t, "label": rng.randrange(num_classes), "seed": 1000 + i})
    return trace


def capacities(args, pipe) -> dict:
    """Images/s of full static batches (what the loads are fractions of), and of the engine kept full
    by single-image requests all submitted at once (its cells then at every stage: what it sustains)."""
    from xar_infer import GenerationRequest

    images = args.max_rows // 2
    labels = list(range(images))
    on_host(pipe(labels, generator=generators(labels), output_type="latent").images)  # warm-up
    times = []
    for _ in range(args.capacity_repeats):
        begin = time.perf_counter()
        on_host(pipe(labels, generator=generators(labels), output_type="latent").images)
        times.append(time.perf_counter() - begin)
    count = 3 * images
    with pipe.engine(max_rows=args.max_rows) as engine:
        begin = time.perf_counter()
        futures = [engine.submit(GenerationRequest(i % 1000, seed=i, output_type="latent")) for i in range(count)]
        for f in futures:
            on_host(f.result())
        engine_seconds = time.perf_counter() - begin
    return {"static_images_per_s": images / statistics.median(times), "static_batch_seconds": times,
            "engine_images_per_s": count / engine_seconds, "engine_requests": count}


def continuous_advantage(run: dict) -> dict:
    """How much better continuous batching did (above 1: better): latencies static / continuous,
    throughput continuous / static."""
    c, s = run["continuous"], run["static"]
    return {"mean_latency": s["mean_latency_s"] / c["mean_latency_s"], "p99_latency": s["p99_latency_s"] / c["p99_latency_s"],
            "throughput": c["throughput_images_per_s"] / s["throughput_images_per_s"]}


def open_loop(args, model: str, pipe) -> dict:
    """Part b: the capacities, then both policies at each load on one trace per load, repeated with
    the order alternating; latencies pooled over the repetitions."""
    images = args.max_rows // 2
    capacity = capacities(args, pipe)
    rate = capacity["static_images_per_s"]
    print(f"b. {model}: capacity {rate:.3f} images/s static, {capacity['engine_images_per_s']:.3f} engine", flush=True)
    runs = []
    for load in args.loads:
        trace = arrival_trace(load * rate, args.requests, pipe.transformer.config.num_classes, seed=round(100 * load))
        serve = {"continuous": lambda: serve_continuous(pipe, trace, args.max_rows),
                 "static": lambda: serve_static(pipe, trace, images)}
        passes = {name: [] for name in serve}
        for repeat in range(args.serve_repeats):
            for name in (("continuous", "static") if repeat % 2 == 0 else ("static", "continuous")):
                before = os.getloadavg()[0]
                passes[name].append({**serve[name](), "load_average": [before, os.getloadavg()[0]]})
        run = {"load": load, "arrival_rate_per_s": load * rate, "requests": args.requests, "passes": passes}
        for name, done in passes.items():
            run[name] = summary([t for d in done for t in d["latencies_s"]], [d["throughput_images_per_s"] for d in done])
            run[name]["load_average"] = [min(x for d in done for x in d["load_average"]),
                                         max(x for d in done for x in d["load_average"])]
            print(f"b. {model}, load {load:.0%} {name}: mean {run[name]['mean_latency_s']:.2f} s, "
                  f"p99 {run[name]['p99_latency_s']:.2f} s, {run[name]['throughput_images_per_s']:.3f} images/s", flush=True)
        run["continuous_advantage"] = continuous_advantage(run)
        runs.append(run)
    return {"model": model, "steps_per_cell": args.serve_steps, "max_rows": args.max_rows,
            "images_per_static_batch": images, "capacity_images_per_s": rate, "capacity": capacity,
            "repeats": args.serve_repeats, "runs": runs}


# ---- c: mixed settings ----------------------------------------------------------------------------

def mixed(args, model: str, pipe) -> dict:
    """Part c: both step settings in one engine against two static batches, alternating rounds."""
    from xar_infer import GenerationRequest

    half = args.mixed_images // 2
    groups = [(args.mixed_steps, list(range(half))), (args.mixed_taper, list(range(half, 2 * half)))]

    def engine_run() -> tuple[float, list[torch.Tensor]]:
        with pipe.engine(max_rows=args.max_rows) as engine:
            begin = time.perf_counter()
            futures = [engine.submit(GenerationRequest(i % 1000, seed=i, num_inference_steps=steps, output_type="latent"))
                       for steps, images in groups for i in images]
            latents = [on_host(f.result()) for f in futures]
            return time.perf_counter() - begin, latents

    def static_run() -> tuple[float, list[torch.Tensor]]:
        begin, latents = time.perf_counter(), []
        for steps, images in groups:
            out = pipe([i % 1000 for i in images], num_inference_steps=steps, generator=generators(images),
                       output_type="latent").images
            latents += list(on_host(out))
        return time.perf_counter() - begin, latents

    runs = {"engine": engine_run, "static": static_run}
    seconds, difference = {name: [] for name in runs}, 0.0
    load = [os.getloadavg()[0]]
    for round_ in range(args.rounds):
        latents = {}
        for name in (("engine", "static") if round_ % 2 == 0 else ("static", "engine")):
            s, latents[name] = runs[name]()
            seconds[name].append(s)
        difference = max(difference, max((a - b).abs().max().item() for a, b in zip(latents["engine"], latents["static"])))
    load.append(os.getloadavg()[0])
    ratios = [s / e for e, s in zip(seconds["engine"], seconds["static"])]
    result = {"model": model, "images": 2 * half, "steps": [args.mixed_steps, args.mixed_taper],
              "max_rows": args.max_rows, "engine_seconds": seconds["engine"], "static_seconds": seconds["static"],
              "engine_images_per_s": 2 * half / statistics.median(seconds["engine"]),
              "static_images_per_s": 2 * half / statistics.median(seconds["static"]),
              "engine_speed_over_static": statistics.median(ratios), "round_ratios": ratios,
              "max_abs_latent_difference": difference, "load_average": load}
    print(f"c. {model}: engine {result['engine_images_per_s']:.3f} images/s, static {result['static_images_per_s']:.3f}; "
          f"engine / static {result['engine_speed_over_static']:.3f}", flush=True)
    return result


# ---- report ---------------------------------------------------------------------------------------

def markdown(report: dict) -> str:
    m, s = report["machine"], report["settings"]
    where = (f"{m['cpu']}, {m['cores']} CPU cores" if s.get("device", "cpu") == "cpu"
             else f"{m['device_name']} (host: {m['cpu']}, {m['cores']} cores)")
    graphs = ", CUDA graphs" if s.get("cuda_graphs") else ""
    lines = [f"# The engine against static batching and the lockstep sampler: {where}", "",
             f"`{s['command']}`: torch {m['torch']}, parts b and c {s.get('dtype', 'fp32')}, {s.get('backend', 'torch')} "
             f"backend{graphs} (part a: fp32, torch backend), {m['cpu_threads']} CPU threads, random weights, "
             f"guidance {GUIDANCE} (linear schedule: two rows per image). Load average (1 min) before and after each "
             "part in brackets: the machine is shared.", ""]
    a = report.get("static_batch")
    if a:
        commit = (a["lockstep_commit"] or "?")[:7]
        lines += [f"## a. One static batch: `pipe(...)` on the engine against the lockstep sampler ({commit})", "",
                  f"{a['model']} shapes, {a['steps_per_cell']} SDE steps per cell, {a['rounds']} alternating rounds in two "
                  "worker processes; the ratio is the median of the rounds' ratios (above 1: the engine is faster).", "",
                  "| batch | lockstep s (median) | engine s (median) | engine speed / lockstep | largest latent difference | load |",
                  "|---:|---:|---:|---:|---:|---|"]
        for r in a["rows"]:
            lines.append(f"| {r['batch']} | {r['lockstep_median_seconds']:.2f} | {r['engine_median_seconds']:.2f} "
                         f"| **{r['engine_speed_over_lockstep']:.3f}x** | {r['max_abs_latent_difference']:.1e} "
                         f"| {r['load_average'][0]:.1f}-{r['load_average'][1]:.1f} |")
        lines.append("")
    for b in report.get("open_loop", []):
        lines += [f"## b. Open-loop Poisson arrivals, {b['model']} model: continuous (engine) against static batching", "",
                  f"{b['model']} model ({config_text(b['model'])}), {b['steps_per_cell']} SDE steps per cell, max_rows {b['max_rows']} (static batches of "
                  f"up to {b['images_per_static_batch']} images). Capacity: {b['capacity_images_per_s']:.3f} images/s in full static "
                  f"batches; the engine kept full by {b['capacity']['engine_requests']} single-image requests made "
                  f"{b['capacity']['engine_images_per_s']:.3f}. Each trace ran {b['repeats']} times, the order of the two "
                  "policies alternating; latencies pooled, throughput (images over first arrival to last result) "
                  "averaged.", "",
                  "| load | requests | policy | mean latency s | p50 s | p99 s | images/s | calls or batches, last pass | load |",
                  "|---:|---:|---|---:|---:|---:|---:|---|---|"]
        for run in b["runs"]:
            for name in ("continuous", "static"):
                r, last = run[name], run["passes"][name][-1]
                shape = (f"{last['network_calls']} calls, {last['mean_rows_per_call']:.1f} rows each" if name == "continuous"
                         else f"{last['batches']} batches, {last['mean_images_per_batch']:.1f} images each")
                lines.append(f"| {run['load']:.0%} | {run['requests']} x {b['repeats']} | {name} | {r['mean_latency_s']:.2f} "
                             f"| {r['p50_latency_s']:.2f} | {r['p99_latency_s']:.2f} | {r['throughput_images_per_s']:.3f} "
                             f"| {shape} | {r['load_average'][0]:.1f}-{r['load_average'][1]:.1f} |")
        lines += ["", "Continuous against static (above 1: continuous better):", "",
                  "| load | mean latency, static / continuous | p99 latency, static / continuous "
                  "| throughput, continuous / static |", "|---:|---:|---:|---:|"]
        for run in b["runs"]:
            q = run["continuous_advantage"]
            lines.append(f"| {run['load']:.0%} | **{q['mean_latency']:.2f}x** | **{q['p99_latency']:.2f}x** "
                         f"| {q['throughput']:.2f}x |")
        lines.append("")
    for c in report.get("mixed", []):
        steps = " and ".join(",".join(map(str, x)) if isinstance(x, list) else str(x) for x in c["steps"])
        lines += [f"## c. Mixed settings, {c['model']} model: one engine against two static batches", "",
                  f"{c['model']} model ({config_text(c['model'])}), {c['images']} images: half at {steps} steps per cell, all submitted at once "
                  f"(max_rows {c['max_rows']}), against one `pipe(...)` batch per setting, one after the other; "
                  f"{len(c['engine_seconds'])} alternating rounds.", "",
                  "| way | s (median) | images/s |", "|---|---:|---:|",
                  f"| engine, all at once | {statistics.median(c['engine_seconds']):.2f} | {c['engine_images_per_s']:.3f} |",
                  f"| two static batches | {statistics.median(c['static_seconds']):.2f} | {c['static_images_per_s']:.3f} |",
                  "", f"Engine speed / static: **{c['engine_speed_over_static']:.3f}x** (median of the rounds' ratios); "
                      f"largest latent difference between the two ways {c['max_abs_latent_difference']:.1e}; load "
                      f"{c['load_average'][0]:.1f}-{c['load_average'][1]:.1f}.", ""]
    return "\n".join(lines)


def config_text(model: str) -> str:
    c = config_of(model)
    return (f"width {c['dim']}, depth {c['encoder_depth']}+{c['decoder_depth']}, {c['grid_size']}x{c['grid_size']} tokens "
            f"in cells of {c['cell_size']}x{c['cell_size']}")


def cpu_slug(cpu: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", cpu.lower()).strip("-") or "cpu"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny model and a few requests: a smoke run in seconds")
    parser.add_argument("--lockstep-tree", type=Path, help="a checkout of the lockstep sampler (9d58fcb) for part a; "
                        "without it, part a is left out")
    parser.add_argument("--parts", default="a,b,c")
    parser.add_argument("--static-model", default="xar-b")
    parser.add_argument("--static-batches", default="1,8")
    parser.add_argument("--static-steps", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--serve-models", default="small,tiny")
    parser.add_argument("--serve-steps", type=int, default=10)
    parser.add_argument("--max-rows", type=int, default=32)
    parser.add_argument("--capacity-repeats", type=int, default=3)
    parser.add_argument("--loads", default="0.5,0.9")
    parser.add_argument("--requests", type=int, default=150)
    parser.add_argument("--serve-repeats", type=int, default=2)
    parser.add_argument("--mixed-images", type=int, default=16)
    parser.add_argument("--mixed-steps", default="40")
    parser.add_argument("--mixed-taper", default="40,30,21,12")
    parser.add_argument("--device", default="cpu", help="parts b and c (default: cpu)")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"), help="parts b and c")
    parser.add_argument("--backend", default="torch", help="parts b and c: torch (default), triton or auto")
    parser.add_argument("--cuda-graphs", action="store_true", help="parts b and c: replay CUDA graphs")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out-dir", type=Path, default=HERE / "results")
    parser.add_argument("--name", default=None, help="output file stem (default: cpu-engine-<cpu>, or <gpu>-engine)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--config-json", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.quick:
        args.static_model, args.serve_models = "tiny", "tiny"
        args.static_batches, args.static_steps, args.rounds = "1,2", 1, 2
        args.serve_steps, args.max_rows, args.capacity_repeats, args.requests, args.serve_repeats = 1, 8, 1, 6, 2
        args.mixed_images, args.mixed_steps, args.mixed_taper = 4, "2", "2,2,1,1"
    args.static_batches = [int(b) for b in args.static_batches.split(",")]
    args.loads = [float(x) for x in args.loads.split(",")]
    args.mixed_steps = int(args.mixed_steps)
    args.mixed_taper = [int(n) for n in args.mixed_taper.split(",")]
    parts = set(args.parts.split(","))
    torch.set_num_threads(args.threads)

    import xar_infer
    from run import machine_info

    if not Path(xar_infer.__file__).resolve().is_relative_to(HERE.parent.resolve()):
        raise SystemExit(f"xar_infer is imported from {xar_infer.__file__}, not from this tree: "
                         f"PYTHONPATH={HERE.parent / 'src'}:{HERE.parent}")
    machine = machine_info(args.device)
    machine["cores"] = os.cpu_count()
    report = {"machine": machine, "settings": {**{k: v for k, v in vars(args).items() if k not in ("worker", "config_json")},
                                               "command": " ".join(["python benchmarks/engine.py", *(argv or sys.argv[1:])])}}
    report["settings"]["lockstep_tree"] = str(args.lockstep_tree) if args.lockstep_tree else None
    report["settings"]["out_dir"] = str(args.out_dir)
    began = time.perf_counter()
    if "a" in parts and args.lockstep_tree:
        scratch = args.out_dir / ".engine-latents"
        scratch.mkdir(parents=True, exist_ok=True)
        try:
            report["static_batch"] = static_batch(args, scratch)
        finally:
            for f in scratch.glob("*.pt"):
                f.unlink()
            scratch.rmdir()
    for model in args.serve_models.split(",") if parts & {"b", "c"} else []:
        pipe = random_pipeline(config_of(model), args.serve_steps, device=args.device, dtype=args.dtype,
                               backend=args.backend, cuda_graphs=args.cuda_graphs)
        if "b" in parts:
            report.setdefault("open_loop", []).append(open_loop(args, model, pipe))
        if "c" in parts:
            report.setdefault("mixed", []).append(mixed(args, model, pipe))
    report["seconds"] = time.perf_counter() - began
    name = args.name or (f"cpu-engine-{cpu_slug(machine['cpu'])}" if args.device == "cpu"
                         else f"{cpu_slug(machine['device_name'])}-engine")
    from report import save_table  # beside this file

    save_table(report, markdown(report), args.out_dir, name)


if __name__ == "__main__":
    main()
