"""xar-serve under load: continuous against static batching, over real HTTP, open-loop Poisson arrivals.

    python benchmarks/serve.py                 # xar-digits on this machine's CPU: a few minutes
    python benchmarks/serve.py --quick         # a smoke run: a few requests, seconds
    python benchmarks/serve.py --random-weights xar-b --max-rows 128 \
        --server-args "--device cuda --dtype bf16 --backend triton --cuda-graphs" --name h100-serve-xar-b

Two servers run side by side (``xar-serve --batching continuous`` and ``--batching static``, same
model, same --max-rows), each in its own process, idle while the other is measured.

1. **Capacity.** Each server gets a burst of --burst-batches full batches at once (max_rows / 2
   guided requests per batch) and its images/s is timed; the capacity is the larger of the two.
2. **Open loop.** Requests arrive as a Poisson process at 50% and 90% of the capacity (the same
   seeded trace for both servers), each sent at its arrival time whatever the others are doing,
   through ``POST /v1/generate/stream``. Each trace runs --repeats times, the order of the two
   servers alternating. Per request: latency (arrival to the ``done`` event) and time to the first
   cell preview (arrival to the first ``cell`` event). Reported per load and policy: mean, p50, p95,
   p99 of both (pooled over repeats), and throughput (images over first arrival to last result,
   averaged over repeats).

The client runs in this process (asyncio, httpx), on the same machine as the servers: its CPU time is
part of the load, and the CPU's other users too (the load average is recorded). Results go to
results/cpu-serve-<cpu>.json and .md.

``--random-weights PRESET`` serves a model of a released model's shapes with random weights (and a
random KL-16 VAE), written to a scratch folder: speed does not depend on the values, and a GPU machine
without network has no released weights. ``--server-args`` passes more options to both servers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import re
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from report import save_table  # noqa: E402

POLICIES = ("continuous", "static")


def percentile(values: list[float], p: float) -> float:
    """Nearest rank: the smallest value with at least p% of the values at or below it."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return "unknown CPU"


def write_random_model(preset: str, folder: Path, seed: int) -> None:
    """A model folder of ``preset``'s shapes and sampling defaults, random weights and (for a latent
    model) a random VAE."""
    import torch
    from xar_infer import XARTransformer
    from xar_infer.config import PRESETS
    from xar_infer.hub import save_model_folder
    from xar_infer.vae import AutoencoderKLDecoder

    torch.manual_seed(seed)
    settings = PRESETS[preset]
    vae = None if settings.config.pixel_space else AutoencoderKLDecoder()
    save_model_folder(folder, XARTransformer(settings.config), settings.num_inference_steps, settings.guidance_scale, vae)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``xar-serve`` in a subprocess with the given batching policy."""

    def __init__(self, policy: str, args, log_dir: Path):
        self.policy, self.port = policy, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log_dir / f"serve-{policy}.log"
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "OMP_WAIT_POLICY": "PASSIVE"}
        command = [sys.executable, "-m", "xar_infer.serving.cli", "--port", str(self.port), "--batching", policy,
                   "--max-rows", str(args.max_rows), "--max-queue", "100000", "--log-level", "warning"]
        command += ["--checkpoint", args.checkpoint] if args.checkpoint else ["--model", args.model]
        command += shlex.split(args.server_args)
        with open(self.log, "w") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the {self.policy} server stopped: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/healthz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the {self.policy} server did not start in {timeout} s")
            time.sleep(0.2)

    def metrics(self) -> dict[str, float]:
        text = httpx.get(self.url + "/metrics").text
        return {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line and line[0] != "#"}

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)


async def one_request(client: httpx.AsyncClient, url: str, body: dict, arrival: float, start: float) -> dict:
    """Send ``body`` at ``start + arrival`` (loop time); times are from that moment."""
    loop = asyncio.get_running_loop()
    await asyncio.sleep(max(0.0, start + arrival - loop.time()))
    sent = start + arrival
    first_cell = done = None
    async with client.stream("POST", url + "/v1/generate/stream", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{response.status_code}: {(await response.aread())[:200]!r}")
        async for line in response.aiter_lines():
            if line == "event: cell" and first_cell is None:
                first_cell = loop.time() - sent
            elif line == "event: done":
                done = loop.time() - sent
            elif line == "event: error":
                raise RuntimeError("the server answered an error event")
    return {"latency_s": done, "first_cell_s": first_cell, "arrival_s": arrival}


async def run_trace(url: str, trace: list[dict]) -> dict:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        start = asyncio.get_running_loop().time() + 0.2
        results = await asyncio.gather(*(one_request(client, url, r["body"], r["arrival"], start) for r in trace))
    last = max(r["arrival_s"] + r["latency_s"] for r in results)
    return {"latencies_s": [r["latency_s"] for r in results], "first_cell_s": [r["first_cell_s"] for r in results],
            "throughput_images_per_s": len(results) / (last - min(r["arrival_s"] for r in results))}


def requests_for(count: int, steps: int, seed: int, rate: float | None) -> list[dict]:
    """``count`` requests (classes and seeds varied), arriving as a Poisson process of ``rate`` per
    second (all at 0 when None)."""
    rng = random.Random(seed)
    arrival, trace = 0.0, []
    for i in range(count):
        trace.append({"arrival": arrival, "body": {"class_label": rng.randrange(10), "seed": rng.randrange(2**31),
                                                   "num_inference_steps": steps}})
        if rate is not None:
            arrival += rng.expovariate(rate)
    return trace


def summary(passes: list[dict]) -> dict:
    latencies = [v for p in passes for v in p["latencies_s"]]
    first = [v for p in passes for v in p["first_cell_s"]]
    out = {"mean_latency_s": statistics.mean(latencies), "mean_first_cell_s": statistics.mean(first),
           "throughput_images_per_s": statistics.mean(p["throughput_images_per_s"] for p in passes)}
    for p in (50, 95, 99):
        out[f"p{p}_latency_s"] = percentile(latencies, p)
        out[f"p{p}_first_cell_s"] = percentile(first, p)
    return out


def measure(servers: dict[str, Server], trace: list[dict], repeats: int) -> dict:
    passes: dict[str, list[dict]] = {policy: [] for policy in servers}
    for repeat in range(repeats):
        order = list(POLICIES) if repeat % 2 == 0 else list(reversed(POLICIES))
        for policy in order:
            server = servers[policy]
            calls_before = server.metrics()
            load = [os.getloadavg()[0]]
            result = asyncio.run(run_trace(server.url, trace))
            load.append(os.getloadavg()[0])
            after = server.metrics()
            calls = after["xar_network_calls_total"] - calls_before["xar_network_calls_total"]
            rows = after["xar_network_rows_total"] - calls_before["xar_network_rows_total"]
            passes[policy].append({**result, "load_average": load, "network_calls": calls,
                                   "rows_per_call": rows / calls if calls else 0.0})
    return {policy: {**summary(p), "passes": p} for policy, p in passes.items()}


def markdown(report: dict) -> str:
    a = report["args"]
    where = f"{report['cpu']}, {report['cpu_count']} CPU cores"
    if report.get("gpu"):
        where = f"{report['gpu']} (host: {where})"
    model = (f"random weights in the shapes of {a['random_weights']}" if a.get("random_weights")
             else f"model {a['checkpoint'] or a['model']}")
    server_args = f", xar-serve {a['server_args']}" if a.get("server_args") else ""
    lines = [f"# xar-serve under load, continuous against static batching: {where}", "",
             f"`python benchmarks/serve.py --burst-batches {a['burst_batches']}`: torch {report['torch']}, "
             f"{model}{server_args}, "
             f"{a['steps']} SDE steps per cell, guided (the model's default guidance), --max-rows {a['max_rows']} "
             f"(static batches of up to {a['max_rows'] // 2} images), {a['threads']} torch thread(s) per server; "
             f"client and servers on the same machine. Load average (1 min) before and after each pass in "
             f"brackets: the machine is shared.", "",
             "## Capacity: a burst of full batches at once", "",
             "| policy | requests | images/s | load |", "|---|---:|---:|---|"]
    for policy, c in report["capacity"].items():
        lines.append(f"| {policy} | {c['requests']} | {c['throughput_images_per_s']:.2f} | "
                     f"{c['load_average'][0]:.1f}-{c['load_average'][1]:.1f} |")
    lines += ["", f"Capacity: **{report['capacity_images_per_s']:.2f} images/s** (the larger).", "",
              "## Open-loop Poisson arrivals", "",
              f"{a['requests']} requests per pass, {a['repeats']} passes per load and policy, the order of the two "
              f"servers alternating; latencies pooled over the passes. *first cell*: arrival to the first cell "
              f"preview. Times in seconds.", "",
              "| load | arrivals/s | policy | mean | p50 | p95 | p99 | first cell p50 | first cell p99 | images/s "
              "| rows per call | load |",
              "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for run in report["open_loop"]:
        for policy in POLICIES:
            r = run["policies"][policy]
            loads = [v for p in r["passes"] for v in p["load_average"]]
            rows = statistics.mean(p["rows_per_call"] for p in r["passes"])
            lines.append(f"| {run['load']:.0%} | {run['rate']:.2f} | {policy} | {r['mean_latency_s']:.3f} | "
                         f"{r['p50_latency_s']:.3f} | {r['p95_latency_s']:.3f} | {r['p99_latency_s']:.3f} | "
                         f"{r['p50_first_cell_s']:.3f} | {r['p99_first_cell_s']:.3f} | "
                         f"{r['throughput_images_per_s']:.2f} | {rows:.1f} | {min(loads):.1f}-{max(loads):.1f} |")
    lines += ["", "Continuous against static (above 1: continuous better):", "",
              "| load | mean latency, static / continuous | p99 latency, static / continuous | "
              "first cell p50, static / continuous | throughput, continuous / static |",
              "|---:|---:|---:|---:|---:|"]
    for run in report["open_loop"]:
        c, s = run["policies"]["continuous"], run["policies"]["static"]
        lines.append(f"| {run['load']:.0%} | **{s['mean_latency_s'] / c['mean_latency_s']:.2f}x** | "
                     f"**{s['p99_latency_s'] / c['p99_latency_s']:.2f}x** | "
                     f"{s['p50_first_cell_s'] / c['p50_first_cell_s']:.2f}x | "
                     f"{c['throughput_images_per_s'] / s['throughput_images_per_s']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few requests and steps: a smoke run")
    parser.add_argument("--model", default="xar-digits")
    parser.add_argument("--checkpoint", help="serve these weights instead of --model")
    parser.add_argument("--random-weights", metavar="PRESET", help="serve random weights of this preset's shapes "
                        "(and a random VAE) instead of --model")
    parser.add_argument("--server-args", default="", help="more xar-serve options for both servers, e.g. "
                        "'--device cuda --dtype bf16 --backend triton --cuda-graphs'")
    parser.add_argument("--steps", type=int, default=10, help="SDE steps per cell (default: 10)")
    parser.add_argument("--max-rows", type=int, default=32)
    parser.add_argument("--requests", type=int, default=150, help="requests per open-loop pass")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--burst-batches", type=int, default=8)
    parser.add_argument("--loads", default="0.5,0.9")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per server (default: 1; the "
                                                                "client needs a core too)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=HERE / "results")
    parser.add_argument("--name", help="file name without extension (default: cpu-serve-<cpu>)")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.max_rows, args.requests, args.repeats, args.burst_batches = 2, 4, 6, 1, 1

    import torch

    cpu = cpu_name()
    gpu = torch.cuda.get_device_name() if "cuda" in args.server_args and torch.cuda.is_available() else None
    name = args.name or "cpu-serve-" + (re.sub(r"[^a-z0-9]+", "-", cpu.lower()).strip("-") or "cpu")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    logs = Path(tempfile.mkdtemp(prefix="xar-serve-bench-"))  # the servers' logs, for a failure's message
    if args.random_weights:
        write_random_model(args.random_weights, logs / "model", args.seed)
        args.checkpoint = str(logs / "model")
    servers = {policy: Server(policy, args, logs) for policy in POLICIES}
    try:
        for server in servers.values():
            server.wait_ready()
        warmup = requests_for(2, args.steps, args.seed + 99, None)
        for server in servers.values():
            asyncio.run(run_trace(server.url, warmup))
        capacity = {}
        burst = requests_for(args.burst_batches * (args.max_rows // 2), args.steps, args.seed + 1, None)
        for policy in POLICIES:
            load = [os.getloadavg()[0]]
            result = asyncio.run(run_trace(servers[policy].url, burst))
            capacity[policy] = {"requests": len(burst), "throughput_images_per_s": result["throughput_images_per_s"],
                                "load_average": [load[0], os.getloadavg()[0]]}
        rate_full = max(c["throughput_images_per_s"] for c in capacity.values())
        open_loop = []
        for i, load in enumerate(float(x) for x in args.loads.split(",")):
            trace = requests_for(args.requests, args.steps, args.seed + 10 + i, load * rate_full)
            open_loop.append({"load": load, "rate": load * rate_full, "policies": measure(servers, trace, args.repeats)})
    finally:
        for server in servers.values():
            server.stop()
    report = {"cpu": cpu, "gpu": gpu, "cpu_count": os.cpu_count(), "torch": torch.__version__, "args": {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "capacity": capacity, "capacity_images_per_s": rate_full, "open_loop": open_loop}
    save_table(report, markdown(report), args.out_dir, name)


if __name__ == "__main__":
    main()
