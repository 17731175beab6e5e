"""Speed of xar_infer against DiT-XL/2 and SiT-XL/2 (and the official xAR code), in one run.

    python benchmarks/run.py --quick                       # about a minute on a 2-core CPU
    python benchmarks/run.py --batch-sizes 1,8 --max-steps 2
    python benchmarks/run.py --device cuda --dtype bf16 --batch-sizes 1,8,64,256
    python benchmarks/run.py --official-repo ~/src/xAR     # adds the official code, same weights

Every (contender, batch) is measured in a fresh subprocess (its peak memory is its own), after a
warm-up, as the median of --repeats runs; on CUDA with synchronisation and CUDA events. With
--max-steps K a sampler is timed at K steps and scaled to the official step count: linearly for DiT
and SiT (every step costs the same), on the line through 1 and K steps for xAR (a cell's first step
also re-runs the previous cell; every later one costs the same; the official xAR code is timed at 3
and max(K, 4), since its sampler fails below 3 steps). The results say so wherever that
happened. The machine's dense matmul peak is measured in the same run.

--backends adds xar_infer rows on other backends (xar-b+triton; +graphs replays CUDA graphs, e.g.
triton+graphs, timed at the full step count after a capturing warm-up), --modes the opt-in modes that
change outputs (xar-b@taper, xar-b@interval), and a contender such as xar-b/bf16 runs in another dtype
than --dtype. Each rival (DiT, SiT, the official code) and each such variant
is also timed in --paired-rounds rounds back to back with xar_infer's plain path inside one process:
on a shared machine those ratios are the ones to quote.
Writes NAME.json, NAME.md and NAME.png to --out-dir.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
XAR_PRESETS = ("xar-b", "xar-l", "xar-h")
ALL_CONTENDERS = (*XAR_PRESETS, "dit", "sit")


# ---- timing ---------------------------------------------------------------------------------------

def timed(fn, device: str) -> tuple[float, object]:
    """Seconds ``fn()`` takes, synchronised (CUDA events on a GPU)."""
    if device.startswith("cuda"):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        out = fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000, out
    begin = time.perf_counter()
    out = fn()
    return time.perf_counter() - begin, out


def median_time(fn, device: str, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        seconds, out = timed(fn, device)
        times.append(seconds)
    return statistics.median(times), out


def matmul_peak(device: str, dtype: torch.dtype) -> dict:
    """Dense square matmul throughput (FLOP/s), the yardstick for every 'fraction of peak'. On a GPU
    the product is large (8192^3, about 1 ms on an H100) and timed 10 times after 3 warm-ups, so that
    clocks have ramped up and the peak is not underestimated (which would flatter every fraction).
    On a CPU the fastest of PyTorch's matmul (MKL in fp32) and oneDNN's (what xar_infer's linear
    layers use, ``backends.onednn_linear``) counts: on AMD processors the two differ by 2x or more."""
    cuda = device.startswith("cuda")
    n, warm_ups, repeats = (8192, 3, 10) if cuda else (2048, 1, 5)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    products = {"torch.matmul": lambda: a @ b}
    if not cuda:
        from xar_infer.backends import onednn_linear

        layer = torch.nn.Linear(n, n, bias=False, device=device, dtype=dtype).requires_grad_(False)
        layer.weight.copy_(b.T)
        products["oneDNN"] = lambda: onednn_linear(a, layer)
    by_kernel = {}
    for name, product in products.items():
        for _ in range(warm_ups):
            timed(product, device)
        by_kernel[name] = 2 * n**3 / median_time(product, device, repeats)[0]
    best = max(by_kernel, key=by_kernel.get)
    return {"size": n, "dtype": str(dtype).removeprefix("torch."), "flops_per_s": by_kernel[best], "kernel": best,
            "flops_per_s_by_kernel": by_kernel}


# ---- one measurement, in its own process ----------------------------------------------------------

def split_key(key: str) -> tuple[str, str, str, str]:
    """A contender key into (name, backend, mode, dtype), the missing parts empty:
    "xar-b+triton+graphs@taper/bf16" -> ("xar-b", "triton+graphs", "taper", "bf16")."""
    key, _, dtype = key.partition("/")
    key, _, mode = key.partition("@")
    name, _, backend = key.partition("+")
    return name, backend, mode, dtype


def make_contender(name: str, device: str, dtype: torch.dtype, official_repo: str | None, paired: bool):
    """The contender, and the plain xar_infer contender it is also timed against back to back (its
    xAR preset in exact mode; xar-b for DiT and SiT), or None."""
    from contenders import DiTContender, OfficialXARContender, SiTContender, XARContender

    preset, backend, mode, own_dtype = split_key(name)
    if preset in XAR_PRESETS:
        variant = bool(backend or mode or own_dtype)
        partner = XARContender(preset, device, dtype) if variant and paired else None
        return XARContender(preset, device, DTYPES[own_dtype] if own_dtype else dtype, backend or "torch",
                            mode or "exact", dtype_in_name=bool(own_dtype)), partner
    if name.startswith("official-"):
        reference = XARContender(name.removeprefix("official-"), device, dtype)
        return OfficialXARContender(official_repo, name.removeprefix("official-"), reference), reference
    return {"dit": DiTContender, "sit": SiTContender}[name](device, dtype), XARContender("xar-b", device, dtype) if paired else None


def measure(spec: dict) -> dict:
    device, dtype = spec["device"], DTYPES[spec["dtype"]]
    torch.manual_seed(0)
    with torch.inference_mode():
        contender, partner = make_contender(spec["contender"], device, dtype, spec.get("official_repo"),
                                            spec.get("paired_rounds", 0) > 0)
        official = spec["contender"].startswith("official-")
        batch, nominal, repeats = spec["batch"], contender.nominal_steps, spec["repeats"]
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        short, low = min(spec["max_steps"] or nominal, nominal), contender.min_steps
        warm_up_seconds, _ = timed(lambda: contender.generate(batch, nominal if contender.captures else low), device)
        if short >= nominal or not contender.extrapolable:
            timed_steps = nominal
            generate_seconds, latents = median_time(lambda: contender.generate(batch, nominal), device, repeats)
        elif contender.uniform_steps:
            timed_steps = short
            seconds, latents = median_time(lambda: contender.generate(batch, short), device, repeats)
            generate_seconds = seconds * nominal / short
        else:
            timed_steps = max(short, low + 1)
            t_low, _ = median_time(lambda: contender.generate(batch, low), device, repeats)
            t_high, latents = median_time(lambda: contender.generate(batch, timed_steps), device, repeats)
            generate_seconds = t_low + (nominal - low) / (timed_steps - low) * (t_high - t_low)
        decode_seconds, _ = median_time(lambda: contender.decode(latents), device, repeats)
        result = {
            "contender": contender.name,
            "key": spec["contender"],
            "description": contender.description,
            "batch": batch,
            "steps": nominal,
            "timed_steps": timed_steps,
            "timed_from_steps": low if timed_steps < nominal and not contender.uniform_steps else None,
            "extrapolated": timed_steps < nominal,
            "generate_seconds": generate_seconds,
            "decode_seconds": decode_seconds,
            "generate_flops_per_image": contender.flops_per_image(nominal),
            "decode_flops_per_image": contender.decode_flops_per_image(),
        }
        if contender.captures:  # the one-off cost, paid again only when the batch size or steps change
            result["first_call_seconds"] = warm_up_seconds
        if official:  # the official code against ours: same weights, seed and steps
            ours = partner.generate(batch, timed_steps)
            result["max_abs_diff_vs_xar_infer"] = (latents.float() - ours.float()).abs().max().item()
        if partner is not None and spec.get("paired_rounds", 0) > 0:
            # Which one is xar_infer's side: the plain path against a rival, a variant against the plain path.
            name, *variation = split_key(spec["contender"])
            is_variant = name in XAR_PRESETS and any(variation)
            xar, rival = (contender, partner) if is_variant else (partner, contender)
            result["paired"] = {
                "xar_infer": xar.name, "versus": rival.name,
                "generate_speedups": [round_seconds(rival, batch, spec["max_steps"], device)
                                      / round_seconds(xar, batch, spec["max_steps"], device)
                                      for _ in range(spec["paired_rounds"])],
            }
    if device.startswith("cuda"):
        result["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
        result["peak_memory_kind"] = "CUDA allocated"
    else:
        result["peak_memory_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        result["peak_memory_kind"] = "process RSS"
    return result


def round_seconds(contender, batch: int, max_steps: int | None, device: str) -> float:
    """One timing of ``contender``'s generation at its nominal steps, extrapolated as in ``measure``
    (no repeats: paired rounds alternate contenders so that both see the machine at the same speed;
    a shared machine's speed drifts by tens of percent between contenders timed minutes apart)."""
    nominal, low = contender.nominal_steps, contender.min_steps
    short = min(max_steps or nominal, nominal)
    if short >= nominal or not contender.extrapolable:
        return timed(lambda: contender.generate(batch, nominal), device)[0]
    if contender.uniform_steps:
        return timed(lambda: contender.generate(batch, short), device)[0] * nominal / short
    high = max(short, low + 1)
    t_low = timed(lambda: contender.generate(batch, low), device)[0]
    t_high = timed(lambda: contender.generate(batch, high), device)[0]
    return t_low + (nominal - low) / (high - low) * (t_high - t_low)


def run_in_subprocess(spec: dict) -> dict:
    process = subprocess.run([sys.executable, str(Path(__file__)), "--worker", json.dumps(spec)],
                             capture_output=True, text=True, cwd=HERE)
    if process.returncode != 0:
        raise RuntimeError(f"{spec['contender']} at batch {spec['batch']} failed:\n{process.stderr[-3000:]}")
    return json.loads(process.stdout.strip().splitlines()[-1])


# ---- the whole run --------------------------------------------------------------------------------

def machine_info(device: str) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"cpu": cpu, "cpu_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "platform": platform.platform()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.startswith("cuda"):
        info["device_name"] = torch.cuda.get_device_name(device)
    else:
        info["device_name"] = f"CPU: {cpu}"
    return info


def add_derived_figures(row: dict, peak: float) -> None:
    batch = row["batch"]
    total = row["generate_seconds"] + row["decode_seconds"]
    flops = row["generate_flops_per_image"] + row["decode_flops_per_image"]
    row.update({
        "generate_seconds_per_image": row["generate_seconds"] / batch,
        "end_to_end_seconds_per_image": total / batch,
        "generate_images_per_s": batch / row["generate_seconds"],
        "end_to_end_images_per_s": batch / total,
        "generate_flops_per_s": row["generate_flops_per_image"] * batch / row["generate_seconds"],
        "end_to_end_flops_per_s": flops * batch / total,
    })
    row["generate_fraction_of_peak"] = row["generate_flops_per_s"] / peak
    row["end_to_end_fraction_of_peak"] = row["end_to_end_flops_per_s"] / peak


def paired_median(row: dict, other: dict) -> float | None:
    """Median back-to-back speedup of xar_infer's ``row`` over ``other``, if that pair was timed so."""
    for r in (row, other):
        paired = r.get("paired")
        if paired and paired["xar_infer"] == row["contender"] and paired["versus"] == other["contender"]:
            return statistics.median(paired["generate_speedups"])
    return None


def ratios(rows: list[dict]) -> list[dict]:
    """Per batch size: how many times faster each xar_infer row is than DiT, SiT, the official code and
    (for the Triton rows) our plain PyTorch path."""
    out = []
    for row in (r for r in rows if split_key(r["key"])[0] in XAR_PRESETS):
        # Rivals of a variant (another backend, mode or dtype) include our plain exact PyTorch path.
        preset = split_key(row["key"])[0]
        rivals = {"dit", "sit", f"official-{preset}"} | ({preset} if row["key"] != preset else set())
        for other in (o for o in rows if o["batch"] == row["batch"] and o["key"] in rivals):
            out.append({
                "batch": row["batch"], "xar_infer": row["contender"], "versus": other["contender"],
                "end_to_end_speedup": other["end_to_end_seconds_per_image"] / row["end_to_end_seconds_per_image"],
                "generate_speedup": other["generate_seconds_per_image"] / row["generate_seconds_per_image"],
                "paired_generate_speedup": paired_median(row, other),
            })
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="xar-b, DiT and SiT at batch 1, 2 timed steps, 1 run")
    parser.add_argument("--contenders", default=",".join(ALL_CONTENDERS))
    parser.add_argument("--modes", default=None,
                        help="also time opt-in modes that change outputs: taper (fewer steps in later cells), interval "
                             "(guidance interval); always timed at full step counts")
    parser.add_argument("--backends", default=None,
                        help="xar_infer backends to time, e.g. torch,triton,triton+graphs "
                             "(default: those three on CUDA, torch on CPU)")
    parser.add_argument("--batch-sizes", default="1,8,64")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="time at most K sampling steps (K >= 2) and extrapolate to the official count")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--paired-rounds", type=int, default=None,
                        help="rounds timing a rival (DiT, SiT, the official code) or a variant (backend, mode) back to back "
                             "with xar_infer's plain path, for drift-free ratios (default: --repeats; 0 with --quick)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--official-repo", help="a checkout of github.com/OliverRensu/xAR to time as well")
    parser.add_argument("--out-dir", type=Path, default=HERE / "results")
    parser.add_argument("--name", help="output file stem (default: from the device)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(measure(json.loads(args.worker))))
        return

    if args.quick:
        args.contenders, args.batch_sizes, args.max_steps, args.repeats = "xar-b,dit,sit", "1", 2, 1
        args.paired_rounds = 0 if args.paired_rounds is None else args.paired_rounds
    paired_rounds = args.repeats if args.paired_rounds is None else args.paired_rounds
    if args.max_steps is not None and args.max_steps < 2:
        parser.error("--max-steps must be at least 2 (the line needs two points)")
    dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    modes = [m for m in (args.modes or "").split(",") if m]
    backends = (args.backends or ("torch,triton,triton+graphs" if args.device.startswith("cuda") else "torch")).split(",")
    contenders = []
    for name in args.contenders.split(","):
        # "xar-b" is the plain PyTorch path; "xar-b+triton" the same model on the Triton kernels.
        contenders += [name if b == "torch" else f"{name}+{b}" for b in backends] if name in XAR_PRESETS else [name]
    contenders += [f"{name}@{mode}" for name in args.contenders.split(",") if name in XAR_PRESETS for mode in modes]
    if args.official_repo:
        contenders += [f"official-{c}" for c in args.contenders.split(",") if c in XAR_PRESETS]
    batches = [int(b) for b in args.batch_sizes.split(",")]

    from report import write_outputs

    stem = args.name or ("quick" if args.quick else f"{args.device.split(':')[0]}-{dtype}")
    started = time.time()
    # A matmul peak for each dtype that runs: a row's fraction of peak is against its own dtype's.
    row_dtypes = {name: split_key(name)[3] or dtype for name in contenders}
    peaks = {d: matmul_peak(args.device, DTYPES[d]) for d in dict.fromkeys([dtype, *row_dtypes.values()])}
    # Rewritten after every row: a run cut short (a time-limited machine) keeps what it measured.
    report = {
        "machine": machine_info(args.device),
        "settings": {"device": args.device, "dtype": dtype, "batch_sizes": batches, "max_steps": args.max_steps,
                     "repeats": args.repeats, "paired_rounds": paired_rounds, "quick": args.quick,
                     "contenders": contenders, "backends": backends, "modes": modes,
                     "command": " ".join(["python", "benchmarks/run.py", *(argv or sys.argv[1:])])},
        "matmul_peak": peaks[dtype],
        "other_matmul_peaks": [peak for d, peak in peaks.items() if d != dtype],
        "rows": [],
    }
    rows = report["rows"]
    for batch in batches:
        for name in contenders:
            spec = {"contender": name, "batch": batch, "device": args.device, "dtype": dtype,
                    "max_steps": args.max_steps, "repeats": args.repeats, "official_repo": args.official_repo,
                    "paired_rounds": paired_rounds}
            row = run_in_subprocess(spec)
            row["dtype"] = row_dtypes[name]
            add_derived_figures(row, peaks[row["dtype"]]["flops_per_s"])
            rows.append(row)
            print(f"{row['contender']:<38} batch {batch:>3}: {row['end_to_end_seconds_per_image']:8.2f} s/image end to end"
                  f"{' (extrapolated from ' + str(row['timed_steps']) + ' steps)' if row['extrapolated'] else ''}", flush=True)
            report.update(ratios=ratios(rows), complete=len(rows) == len(batches) * len(contenders),
                          wall_seconds=time.time() - started)
            paths = write_outputs(report, args.out_dir, stem)
    print("wrote " + ", ".join(str(p) for p in paths))


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    main()
