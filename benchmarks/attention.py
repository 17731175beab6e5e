"""Microbenchmark: the attention of one network call, xar_infer's kernels against its PyTorch path, SDPA and FlexAttention.

    python benchmarks/attention.py                      # CUDA, bf16, the xAR-B and xAR-H shapes
    python benchmarks/attention.py --sweep --batch-sizes 2,512   # a kernel's launch configurations
    TRITON_INTERPRET=1 python benchmarks/attention.py --device cpu --dtype fp32 --batch-sizes 1 --repeats 1 --name smoke

For each model shape, batch (KV-cache slots: rows of the doubled batch) and call kind at cache lengths
0-192 (the context before the call, in whole cells): a cell's first call runs the previous cell, clean,
and the noisy one (two cells per slot, 128 new tokens), a later call the noisy cell alone (64). Times,
as medians after a warm-up:

* ``torch path``: ``model.cached_attention`` on the call's ``CellBatch`` (RoPE, cache write, SDPA per
  cell index), the reference, which the PyTorch backend runs;
* ``triton ragged``: ``xar_infer.kernels.ragged_attention``, the engine's kernel for packed cells (when
  it exists), which also rotates q/k and writes the cache;
* ``triton lockstep``: ``kernels.block_causal_attention``, the kernel of the lockstep sampler before the
  engine, on the same call laid out as [slots, new tokens] (when it exists);
* ``triton rope + sdpa``: ``kernels.sdpa_block_causal_attention``, the lockstep Triton backend's route
  for large bf16/fp16 batches: a Triton kernel rotates q/k and writes the cache, then SDPA per query cell;
* ``sdpa``: ``scaled_dot_product_attention`` alone on already rotated q and cached k/v;
* ``flex``: compiled FlexAttention alone, with the block-causal rule as a block mask (CUDA only).

Outputs are checked against each other before timing. Writes NAME.json and NAME.md to --out-dir.
On CPU the kernels run in Triton's interpreter: their times there say nothing about speed.
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
from xar_infer.config import PRESETS

HERE = Path(__file__).resolve().parent
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


def case(model: str, batch: int, cache_len: int, first: bool, device: str, dtype: torch.dtype, with_flex: bool = True):
    """The contenders for one network call's attention, each returning [cells, T, heads, head_dim].

    ``batch`` slots each hold ``cache_len`` tokens (whole cells) of context. A later call evaluates one
    cell per slot, the next; a first call also runs the previous cell: cells ``cache_len / T`` and the
    one after, packed one after the other in the engine's order.
    """
    from xar_infer import kernels
    from xar_infer.config import PRESETS
    from xar_infer.model import CellBatch, KVCache, apply_rope, block_causal_mask, cached_attention, rope_tables

    config = PRESETS[model].config
    heads, head_dim = config.num_heads, config.head_dim
    cells_per_slot = 2 if first else 1
    start = cache_len // T
    num_new, end = cells_per_slot * T, cache_len + cells_per_slot * T
    cells = batch * cells_per_slot
    batch_cells = CellBatch.build([b for b in range(batch) for _ in range(cells_per_slot)],
                                  [start + i for _ in range(batch) for i in range(cells_per_slot)],
                                  [0] * cells, [0.0] * cells, device)
    q, k, v = torch.randn(cells, T, 3, heads, head_dim, device=device, dtype=dtype).unbind(2)
    cos, sin = (table.to(device) for table in rope_tables(config))
    cache = KVCache(SimpleNamespace(num_heads=heads, seq_len=config.seq_len, head_dim=head_dim, num_layers=1),
                    batch, dtype, device)
    cache.keys[0][:, :, :cache_len].normal_()
    cache.values[0][:, :, :cache_len].normal_()

    # The lockstep layout of the same call: [slots, new tokens, heads, head_dim], a view.
    q_rows, k_rows, v_rows = (t.view(batch, num_new, heads, head_dim) for t in (q, k, v))
    new_cos, new_sin = cos[cache_len:end], sin[cache_len:end]
    # Inputs of the attention-only contenders: rotated queries, keys/values already in the cache.
    q_rot = apply_rope(q_rows.transpose(1, 2), new_cos, new_sin)
    cache.keys[0][:, :, cache_len:end] = apply_rope(k_rows.transpose(1, 2), new_cos, new_sin)
    cache.values[0][:, :, cache_len:end] = v_rows.transpose(1, 2)
    keys, values = cache.keys[0][:, :, :end], cache.values[0][:, :, :end]
    mask = block_causal_mask(T, cache_len, num_new).to(device) if first else None

    def cells_of(out_rows: torch.Tensor) -> torch.Tensor:  # [slots, new tokens, ...] -> [cells, T, ...]
        return out_rows.reshape(cells, T, heads, head_dim)

    runs = {
        "torch path": lambda: cached_attention(q, k, v, cos, sin, cache, 0, batch_cells),
        "sdpa": lambda: cells_of(F.scaled_dot_product_attention(q_rot, keys, values, attn_mask=mask).transpose(1, 2)),
    }
    # Each kernel writes the same rotated keys and values into the cache rows that "sdpa" reads. A
    # launch configuration can be passed as config= (the sweep does).
    if hasattr(kernels, "ragged_attention"):
        runs["triton ragged"] = functools.partial(kernels.ragged_attention, q, k, v, cos, sin, cache.keys[0],
                                                  cache.values[0], batch_cells.slots, batch_cells.cells,
                                                  batch_cells.row_starts, T)
    if hasattr(kernels, "block_causal_attention"):  # the lockstep path's kernel, on the same call
        runs["triton lockstep"] = lambda config=None: cells_of(kernels.block_causal_attention(
            q_rows, k_rows, v_rows, new_cos, new_sin, cache.keys[0], cache.values[0], cache_len, num_new, T, config=config))
    if hasattr(kernels, "sdpa_block_causal_attention"):
        runs["triton rope + sdpa"] = lambda: cells_of(kernels.sdpa_block_causal_attention(
            q_rows, k_rows, v_rows, new_cos, new_sin, cache.keys[0], cache.values[0], cache_len, T))
    if device.startswith("cuda") and with_flex:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        def visible(b, h, q_idx, kv_idx):
            return kv_idx // T <= (q_idx + cache_len) // T

        block_mask = create_block_mask(visible, None, None, num_new, end, device=device)
        flex = torch.compile(flex_attention)
        runs["flex"] = lambda: cells_of(flex(q_rot, keys, values, block_mask=block_mask).transpose(1, 2))
    return runs


def describe_device(device: str) -> str:
    return torch.cuda.get_device_name(device) if device.startswith("cuda") else "CPU (Triton interpreter)"


SWEEP = [{"BLOCK_M": m, "BLOCK_N": n, "num_warps": w, "num_stages": st}
         for m in (64, 128) for n in (32, 64, 128) for w in (4, 8) for st in (1, 2, 3)]


def sweep(args, dtype: torch.dtype, dtype_name: str) -> None:
    """Times a kernel under every launch configuration in SWEEP (those that fit the GPU) against its
    launcher's own choice, at cache length 128: the data for choosing launch configurations. The
    kernel is ``ragged_attention`` where it exists, else the lockstep ``block_causal_attention``."""
    from xar_infer.kernels.attention import launch_config

    rows = []
    with torch.inference_mode():
        for model in args.models.split(","):
            head_dim = PRESETS[model].config.head_dim
            for batch in map(int, args.batch_sizes.split(",")):
                for first in (True, False):
                    runs = case(model, batch, 128, first, args.device, dtype, with_flex=False)
                    kernel = "triton ragged" if "triton ragged" in runs else "triton lockstep"
                    expected = runs["sdpa"]().float()
                    num_new = 2 * T if first else T
                    # The lockstep launcher's choice; the ragged one's is its own.
                    chosen = (launch_config(num_new, head_dim, dtype, batch * PRESETS[model].config.num_heads)
                              if kernel == "triton lockstep" else "launcher's own")
                    times = {}
                    for config in [None] + [c for c in SWEEP if c["BLOCK_M"] <= max(64, num_new) and c != chosen]:
                        call = functools.partial(runs[kernel], config=config)
                        try:
                            if (call().float() - expected).abs().max().item() > 2e-2:
                                raise SystemExit(f"config {config} gives wrong results")
                        except triton.runtime.errors.OutOfResources:
                            continue
                        times[json.dumps(config)] = 1e6 * timed_median(call, args.device, args.repeats)
                    best = min(times, key=times.get)
                    row = {"model": model, "kernel": kernel, "batch": batch, "step": "first" if first else "later",
                           "chosen": chosen, "chosen us": times["null"], "best": json.loads(best) or chosen,
                           "best us": times[best], "all us": times}
                    rows.append(row)
                    print(f"{model} {kernel} batch {batch} {row['step']}: chosen {row['chosen us']:.1f} us, "
                          f"best {row['best us']:.1f} us with {best}", flush=True)
    name = args.name or f"attention-sweep-{args.device.split(':')[0]}-{dtype_name}"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    device_name = describe_device(args.device)
    (args.out_dir / f"{name}.json").write_text(json.dumps({"device": device_name, "dtype": dtype_name, "rows": rows}, indent=2) + "\n")
    lines = [f"# Attention launch configurations: {device_name}, {dtype_name}, cache length 128", "",
             "| model | kernel | batch | step | chosen | us | best | us |", "|---|---|---:|---|---|---:|---|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['kernel']} | {r['batch']} | {r['step']} | {r['chosen']} | {r['chosen us']:.1f} "
                     f"| {r['best']} | {r['best us']:.1f} |")
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
            config = PRESETS[model].config
            for batch in map(int, args.batch_sizes.split(",")):
                for cache_len in map(int, args.cache_lengths.split(",")):
                    for first in (True, False):
                        if cache_len % T or cache_len // T + (2 if first else 1) > config.num_cells:
                            continue  # not whole cells, or past the image's last cell
                        runs = case(model, batch, cache_len, first, args.device, dtype)
                        outputs = {name: fn().float() for name, fn in runs.items()}
                        worst = max((out - outputs["sdpa"]).abs().max().item() for out in outputs.values())
                        if worst > tolerance:
                            raise SystemExit(f"{model} batch {batch} cache {cache_len}: outputs differ by {worst:.2e}")
                        row = {"model": model, "heads": config.num_heads, "head_dim": config.head_dim, "batch": batch,
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
    kernels = [c.removesuffix(" us") for c in columns if c.startswith("triton")]
    lines = [f"# Attention microbenchmark: {device_name}, {dtype_name}", "", f"`{report['command']}`, torch {torch.__version__}; "
             "median microseconds per call; the last columns: how many times faster than the torch path.", "",
             "| model | batch | cache | step | " + " | ".join(columns) + "".join(f" | {k} vs torch path" for k in kernels) + " |",
             "|---|---:|---:|---|" + "---:|" * (len(columns) + len(kernels))]
    for r in rows:
        lines.append(f"| {r['model']} | {r['batch']} | {r['cache_len']} | {r['step']} | "
                     + " | ".join(f"{r[c]:.1f}" for c in columns)
                     + "".join(f" | {r['torch path us'] / r[f'{k} us']:.2f}x" for k in kernels) + " |")
    (args.out_dir / f"{name}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out_dir / name}.json and .md")


if __name__ == "__main__":
    main()
