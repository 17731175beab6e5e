"""Where generation spends its time: one generation under torch.profiler, kernel time by category.

    python benchmarks/kernel_profile.py --preset xar-l --batch 256 --steps 2 --backend triton   # on a GPU
    python benchmarks/kernel_profile.py --preset xar-b --batch 1 --steps 2 --device cpu         # CPU ops instead

Random weights of the preset's shapes, as in run.py. On CUDA it sums the GPU kernels' own time; on CPU,
the operators' own CPU time. Categories come from the kernel or operator names (matrix products,
xar_infer's Triton kernels by name, PyTorch's attention, the rest). Writes NAME.json and NAME.md to --out-dir.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from run import DTYPES

HERE = Path(__file__).resolve().parent

# First match wins; names are lower-cased.
CATEGORIES = [
    ("attention (Triton)", ("_block_causal_attention_kernel", "_ragged_attention_kernel")),
    ("RoPE + cache write (Triton)", ("_rotate_into_cache",)),
    ("norm + modulation (Triton)", ("_rms_norm_modulate",)),
    ("gated residual (Triton)", ("_gated_residual",)),
    ("gelu product (Triton)", ("_gelu_mul",)),
    ("flow step (Triton)", ("_flow_step",)),
    ("attention (PyTorch)", ("flash", "fmha", "attention", "sdpa")),
    ("matrix products", ("gemm", "cutlass", "nvjet", "xmma", "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm",
                         "mkldnn::_linear_pointwise")),
]


def category(name: str) -> str:
    lowered = name.lower()
    return next((label for label, keys in CATEGORIES if any(k in lowered for k in keys)), "other")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="xar-b")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2, help="sampling steps per cell (the profile is per call, so few suffice)")
    parser.add_argument("--backend", default="triton", help="torch or triton")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--top", type=int, default=15, help="kernels listed by name")
    parser.add_argument("--out-dir", type=Path, default=HERE / "results")
    parser.add_argument("--name", default=None)
    args = parser.parse_args(argv)
    dtype_name = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    cuda = args.device.startswith("cuda")

    from contenders import XARContender

    with torch.inference_mode():
        contender = XARContender(args.preset, args.device, DTYPES[dtype_name], args.backend)
        contender.generate(args.batch, args.steps)  # warm-up: compilation, allocator
        if cuda:
            torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
            contender.generate(args.batch, args.steps)
            if cuda:
                torch.cuda.synchronize()

    kernels = {}
    for event in prof.key_averages():
        # On CPU: operators, which have a namespace (aten::, and mkldnn:: for the fp32 linear layers).
        is_kernel = event.device_type == torch.autograd.DeviceType.CUDA if cuda else "::" in event.key
        if not is_kernel:
            continue
        seconds = (event.self_device_time_total if cuda else event.self_cpu_time_total) / 1e6
        if seconds > 0:
            kernels[event.key] = {"seconds": seconds, "calls": event.count, "category": category(event.key)}
    total = sum(k["seconds"] for k in kernels.values())
    by_category = {}
    for k in kernels.values():
        by_category[k["category"]] = by_category.get(k["category"], 0.0) + k["seconds"]
    flops = contender.flops_per_image(args.steps) * args.batch

    device_name = torch.cuda.get_device_name(args.device) if cuda else "CPU"
    report = {"device": device_name, "torch": torch.__version__, "preset": args.preset, "batch": args.batch,
              "steps": args.steps, "backend": args.backend, "dtype": dtype_name, "kernel_seconds": total,
              "generate_flops": flops, "by_category": by_category, "kernels": kernels,
              "command": " ".join(["python", "benchmarks/kernel_profile.py", *(argv or sys.argv[1:])])}
    name = args.name or f"profile-{args.preset}-b{args.batch}-{args.backend}-{args.device.split(':')[0]}"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    unit = "GPU kernel" if cuda else "operator CPU"
    lines = [f"# Profile: {args.preset}, batch {args.batch}, {args.steps} steps per cell, {args.backend} backend, "
             f"{dtype_name}, {device_name}", "", f"`{report['command']}`, torch {torch.__version__}. One generation "
             f"after a warm-up: {total:.3f} s of {unit} time, {flops / total / 1e12:.3g} TFLOP/s over it.", "",
             "| category | seconds | share |", "|---|---:|---:|"]
    for label, seconds in sorted(by_category.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {label} | {seconds:.4f} | {100 * seconds / total:.1f}% |")
    lines += ["", "| kernel | category | calls | seconds | share |", "|---|---|---:|---:|---:|"]
    for key, k in sorted(kernels.items(), key=lambda kv: -kv[1]["seconds"])[:args.top]:
        lines.append(f"| `{key[:90]}` | {k['category']} | {k['calls']} | {k['seconds']:.4f} | {100 * k['seconds'] / total:.1f}% |")
    (args.out_dir / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
