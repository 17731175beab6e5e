"""Microbenchmark: xar_infer's block-causal attention kernel against SDPA and FlexAttention.

    python benchmarks/attention.py                      # CUDA, bf16, the xAR-B and xAR-H shapes
    python benchmarks/attention.py --sweep --batch-sizes 2,512   # the kernel's launch configurations
    TRITON_INTERPRET=1 python benchmarks/attention.py --device cpu --dtype fp32 --batch-sizes 1 --repeats 1 --name smoke

For each model shape, batch (rows of the doubled batch) and call kind (a cell's first step: 128 new
tokens of which 64 are committed to the cache; a later step: 64 new tokens) at cache lengths 0-192,
times, as medians after a warm-up:

* ``triton``: ``xar_infer.kernels.block_causal_attention``, which also rotates q/k and writes the cache;
* ``triton rope + sdpa``: ``xar_infer.kernels.sdpa_block_causal_attention``, the Triton backend's route
  for large bf16/fp16 batches: a Triton kernel rotates q/k and writes the cache, then SDPA per query cell;
* ``torch path``: ``model.cached_attention`` (RoPE, cache write, SDPA with a mask on first steps),
  what the PyTorch backend runs;
* ``sdpa``: ``scaled_dot_product_attention`` alone on already rotated q and cached k/v;
* ``flex``: compiled FlexAttention alone, with the block-causal rule as a block mask (CUDA only).

Outputs are checked against each other before timing. Writes NAME.json and NAME.md to --out-dir.
On CPU the kernel runs in Triton's interpreter: its times there say nothing about speed.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
import triton

from run import DTYPES

HERE = Path(__file__).resolve().parent
SHAPES = {"xar-b": (12, 64), "xar-h": (16, 80)}  # heads, head_dim
T = 64


def timed_median(fn, device: str, repeats: int) -> float:
    fn()  # warm-up (and compilation)
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            begin = time.perf_counter()
            fn()
            times.append(time.perf_counter() - begin)
    return statistics.median(times)


def case(heads: int, head_dim: int, batch: int, cache_len: int, first: bool, device: str, dtype: torch.dtype,
         with_flex: bool = True):
    from xar_infer.kernels import block_causal_attention, sdpa_block_causal_attention
    from xar_infer.model import KVCache, apply_rope, block_causal_mask, cached_attention

    num_new, num_commit = (2 * T, T) if first else (T, 0)
    q, k, v = torch.randn(batch, num_new, 3, heads, head_dim, device=device, dtype=dtype).unbind(2)
    angles = torch.rand(num_new, head_dim, device=device) * 6
    cos, sin = angles.cos(), angles.sin()
    config = SimpleNamespace(num_heads=heads, seq_len=cache_len + num_new, head_dim=head_dim, num_layers=1)
    cache = KVCache(config, batch, dtype, device)
    cache.keys[0][:, :, :cache_len].normal_()
    cache.values[0][:, :, :cache_len].normal_()
    cache.length = cache_len

    # Inputs of the attention-only contenders: rotated queries, keys/values already in the cache.
    q_rot = apply_rope(q.transpose(1, 2), cos, sin)
    end = cache_len + num_new
    cache.keys[0][:, :, cache_len:end] = apply_rope(k.transpose(1, 2), cos, sin)
    cache.values[0][:, :, cache_len:end] = v.transpose(1, 2)
    keys, values = cache.keys[0][:, :, :end], cache.values[0][:, :, :end]
    mask = block_causal_mask(T, cache_len, num_new).to(device) if first else None

    runs = {
        # A launch configuration can be passed as config= (the sweep does).
        "triton": functools.partial(block_causal_attention, q, k, v, cos, sin, cache.keys[0], cache.values[0], cache_len,
                                    num_commit, T),
        # Writes the same rotated keys and values into the cache rows that "sdpa" reads.
        "triton rope + sdpa": functools.partial(sdpa_block_causal_attention, q, k, v, cos, sin, cache.keys[0],
                                                cache.values[0], cache_len, T),
        "torch path": lambda: cached_attention(q, k, v, cos, sin, cache, 0, num_commit, T),
        "sdpa": lambda: F.scaled_dot_product_attention(q_rot, keys, values, attn_mask=mask).transpose(1, 2),
    }
    if device.startswith("cuda") and with_flex:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        def visible(b, h, q_idx, kv_idx):
            return kv_idx // T <= (q_idx + cache_len) // T

        block_mask = create_block_mask(visible, None, None, num_new, end, device=device)
        flex = torch.compile(flex_attention)
        runs["flex"] = lambda: flex(q_rot, keys, values, block_mask=block_mask).transpose(1, 2)
    return runs


def describe_device(device: str) -> str:
    return torch.cuda.get_device_name(device) if device.startswith("cuda") else "CPU (Triton interpreter)"


SWEEP = [{"BLOCK_M": m, "BLOCK_N": n, "num_warps": w, "num_stages": st}
         for m in (64, 128) for n in (32, 64, 128) for w in (4, 8) for st in (1, 2, 3)]


def sweep(args, dtype: torch.dtype, dtype_name: str) -> None:
    """Times the kernel under every launch configuration in SWEEP (those that fit the GPU) against
    ``launch_config``'s choice, at cache length 128: the data for choosing ``launch_config``."""
    from xar_infer.kernels.attention import launch_config

    rows = []
    with torch.inference_mode():
        for model in args.models.split(","):
            heads, head_dim = SHAPES[model]
            for batch in map(int, args.batch_sizes.split(",")):
                for first in (True, False):
                    runs = case(heads, head_dim, batch, 128, first, args.device, dtype, with_flex=False)
                    expected = runs["sdpa"]().float()
                    num_new = 2 * T if first else T
                    chosen = launch_config(num_new, head_dim, dtype, batch * heads)
                    times = {}
                    for config in [chosen] + [c for c in SWEEP if c["BLOCK_M"] <= max(64, num_new) and c != chosen]:
                        call = functools.partial(runs["triton"], config=config)
                        try:
                            if (call().float() - expected).abs().max().item() > 2e-2:
                                raise SystemExit(f"config {config} gives wrong results")
                        except triton.runtime.errors.OutOfResources:
                            continue
                        times[json.dumps(config)] = 1e6 * timed_median(call, args.device, args.repeats)
                    best = min(times, key=times.get)
                    row = {"model": model, "batch": batch, "step": "first" if first else "later",
                           "chosen": chosen, "chosen us": times[json.dumps(chosen)], "best": json.loads(best),
                           "best us": times[best], "all us": times}
                    rows.append(row)
                    print(f"{model} batch {batch} {row['step']}: chosen {row['chosen us']:.1f} us, best {row['best us']:.1f} us "
                          f"with {best}", flush=True)
    name = args.name or f"attention-sweep-{args.device.split(':')[0]}-{dtype_name}"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    device_name = describe_device(args.device)
    (args.out_dir / f"{name}.json").write_text(json.dumps({"device": device_name, "dtype": dtype_name, "rows": rows}, indent=2) + "\n")
    lines = [f"# Attention launch configurations: {device_name}, {dtype_name}, cache length 128", "",
             "| model | batch | step | chosen | us | best | us |", "|---|---:|---|---|---:|---|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['batch']} | {r['step']} | {r['chosen']} | {r['chosen us']:.1f} | {r['best']} "
                     f"| {r['best us']:.1f} |")
    (args.out_dir / f"{name}.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--models", default="xar-b,xar-h")
    parser.add_argument("--batch-sizes", default="2,16,128,512", help="rows, counting both guidance halves")
    parser.add_argument("--cache-lengths", default="0,64,128,192")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out-dir", type=Path, default=HERE / "results")
    parser.add_argument("--name", default=None)
    parser.add_argument("--sweep", action="store_true", help="time the kernel's launch configurations instead (CUDA)")
    args = parser.parse_args(argv)
    dtype_name = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    dtype = DTYPES[dtype_name]
    if args.sweep:
        return sweep(args, dtype, dtype_name)
    tolerance = 2e-5 if dtype == torch.float32 else 2e-2

    rows = []
    with torch.inference_mode():
        for model in args.models.split(","):
            heads, head_dim = SHAPES[model]
            for batch in map(int, args.batch_sizes.split(",")):
                for cache_len in map(int, args.cache_lengths.split(",")):
                    for first in (True, False):
                        runs = case(heads, head_dim, batch, cache_len, first, args.device, dtype)
                        outputs = {name: fn().float() for name, fn in runs.items()}
                        worst = max((out - outputs["sdpa"]).abs().max().item() for out in outputs.values())
                        if worst > tolerance:
                            raise SystemExit(f"{model} batch {batch} cache {cache_len}: outputs differ by {worst:.2e}")
                        row = {"model": model, "heads": heads, "head_dim": head_dim, "batch": batch,
                               "cache_len": cache_len, "step": "first" if first else "later", "max_difference": worst}
                        for name, fn in runs.items():
                            row[f"{name} us"] = 1e6 * timed_median(fn, args.device, args.repeats)
                        rows.append(row)
                        print(" ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)

    device_name = describe_device(args.device)
    report = {"device": device_name, "dtype": dtype_name, "torch": torch.__version__,
              "command": " ".join(["python", "benchmarks/attention.py", *(argv or sys.argv[1:])]), "rows": rows}
    name = args.name or f"attention-{args.device.split(':')[0]}-{dtype_name}"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    columns = [c for c in rows[0] if c.endswith(" us")]
    lines = [f"# Attention microbenchmark: {device_name}, {dtype_name}", "", f"`{report['command']}`, torch {torch.__version__}; "
             "median microseconds per call.", "",
             "| model | batch | cache | step | " + " | ".join(columns) + " | triton vs sdpa | rope + sdpa vs triton |",
             "|---|---:|---:|---|" + "---:|" * (len(columns) + 2)]
    for r in rows:
        lines.append(f"| {r['model']} | {r['batch']} | {r['cache_len']} | {r['step']} | "
                     + " | ".join(f"{r[c]:.1f}" for c in columns)
                     + f" | {r['sdpa us'] / r['triton us']:.2f}x | {r['triton us'] / r['triton rope + sdpa us']:.2f}x |")
    (args.out_dir / f"{name}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out_dir / name}.json and .md")


if __name__ == "__main__":
    main()
