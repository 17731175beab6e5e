"""What the attention kernel compiles to on a GPU, without a GPU: registers, spills, shared memory and
how global memory is read, for the continuous-batching kernel (``ragged_attention``, cells of 64
tokens) in each launch configuration that ``launch_config`` picks (few or many programs).

    python benchmarks/kernel_resources.py                          # sm_90 (H100/H200), bf16, head dims 64 and 80
    python benchmarks/kernel_resources.py --arch 80 --dtype fp32   # another GPU or dtype

Triton compiles for the named architecture with the LLVM and ptxas that ship in its wheel, so this
runs on a machine with no GPU (the kernel is compiled, never launched). Pointers and strides are
assumed 16-byte aligned, which is how Triton specialises a real launch on xar_infer's tensors. Time
on a GPU is what counts (benchmarks/attention.py); this is the cheap check between GPU sessions:
spills, scalar loads or a blown register budget show up here first. Writes NAME.json and NAME.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

# Compiled, never interpreted: the kernels must be decorated as real JIT functions.
os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from run import DTYPES  # noqa: E402

HERE = Path(__file__).resolve().parent
CELL = 64  # tokens per cell: the queries of one segment


def compile_kernel(kernel, arch: int, dtype: str, constexprs: dict, launch: dict):
    """``kernel`` compiled for ``arch``: its tensors of ``dtype`` (the RoPE tables fp32), the named
    constexprs, and ``launch``'s warps and stages."""
    signature, aligned = {}, []
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in ("COS", "SIN"):
            signature[name], aligned = "*fp32", aligned + [name]
        elif name in ("SLOTS", "CELLS", "ROW_STARTS"):  # ragged_attention's segment tables (int32 or int64)
            signature[name], aligned = "*i32", aligned + [name]
        elif name.isupper():  # the other tensors: q, k, v, the cache, the output
            signature[name], aligned = f"*{dtype}", aligned + [name]  # run.py's dtype names are Triton's
        elif name == "qk_scale":
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if name.startswith("stride"):
                aligned.append(name)
    names = list(signature)
    source = ASTSource(fn=kernel, signature=signature,
                       constexprs={(names.index(k),): v for k, v in constexprs.items()},
                       attrs={(names.index(n),): [["tt.divisibility", 16]] for n in aligned})
    options = {"num_warps": launch["num_warps"], "num_stages": launch["num_stages"], "enable_fp_fusion": False}
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def compile_ragged_attention(arch: int, dtype: str, head_dim: int, config: dict):
    """The continuous-batching attention kernel compiled for ``arch`` with ``config``, int32 segment tables."""
    from xar_infer.kernels.attention import _ragged_attention_kernel, channel_block

    constexprs = {"HEAD_DIM": head_dim, "BLOCK_D": channel_block(head_dim), "BLOCK_M": config["BLOCK_M"], "BLOCK_N": config["BLOCK_N"],
                  "DOT_PRECISION": "ieee" if dtype == "fp32" else "tf32"}
    return compile_kernel(_ragged_attention_kernel, arch, dtype, constexprs, config)


def ptxas_report(compiled, arch: int) -> dict:
    """Registers and spills, from ptxas's own report on the kernel's PTX (the ptxas Triton uses)."""
    from triton.backends.nvidia.compiler import get_ptxas

    suffix = "a" if arch >= 90 else ""
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "kernel.ptx"
        ptx.write_text(compiled.asm["ptx"])
        log = subprocess.run([get_ptxas(arch).path, f"-arch=sm_{arch}{suffix}", "-v", str(ptx), "-o", str(Path(tmp) / "k.cubin")],
                             capture_output=True, text=True, check=True).stderr
    number = lambda pattern: int(re.search(pattern, log).group(1))  # noqa: E731
    return {"registers": number(r"Used (\d+) registers"), "spill_store_bytes": number(r"(\d+) bytes spill stores"),
            "spill_load_bytes": number(r"(\d+) bytes spill loads")}


def global_loads(ptx: str) -> dict:
    """How the kernel reads global memory: vector loads (16 bytes) against narrower ones."""
    kinds = re.findall(r"ld\.global(?:\.[a-z]+)*\.(v[248]\.)?([bfsu]\d+)", ptx)
    vector = sum(1 for v, _ in kinds if v)
    return {"vector_loads": vector, "scalar_loads": len(kinds) - vector,
            "ptx_instructions": sum(1 for line in ptx.splitlines() if re.match(r"\s+[a-z]", line))}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability as a number: 90 for Hopper, 80 for A100")
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    parser.add_argument("--head-dims", default="64,80", help="64: xAR-B/L; 80: xAR-H")
    parser.add_argument("--programs", default="few,many", help="launch families: few (batch 1) or many (batch-heads >= 1024)")
    parser.add_argument("--out-dir", type=Path, default=HERE / "results")
    parser.add_argument("--name", default=None)
    args = parser.parse_args(argv)
    from xar_infer.kernels.attention import launch_config

    def describe(compiled) -> dict:
        return {"shared_bytes": compiled.metadata.shared, **ptxas_report(compiled, args.arch), **global_loads(compiled.asm["ptx"])}

    rows = []
    for head_dim in map(int, args.head_dims.split(",")):
        # One segment's queries per program, whatever the call: a cell's first and later calls are the same kernel.
        for programs in args.programs.split(","):
            config = launch_config(CELL, head_dim, DTYPES[args.dtype], 2 if programs == "few" else 4096)
            row = {"kernel": "ragged attention", "head_dim": head_dim, "programs": programs, "config": config,
                   **describe(compile_ragged_attention(args.arch, args.dtype, head_dim, config))}
            rows.append(row)
            print(json.dumps(row), flush=True)

    name = args.name or f"kernel-resources-sm{args.arch}-{args.dtype}"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    report = {"arch": args.arch, "dtype": args.dtype, "triton": triton.__version__, "rows": rows,
              "command": " ".join(["python", "benchmarks/kernel_resources.py", *(argv or sys.argv[1:])])}
    (args.out_dir / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# Attention kernels compiled for sm_{args.arch}, {args.dtype} (no GPU involved)", "",
             f"`{report['command']}`, triton {triton.__version__}.", "",
             "| kernel | head dim | programs | tiles, warps, stages | registers | spilled bytes (store/load) "
             "| shared memory | vector / scalar global loads | PTX instructions |",
             "|---|---:|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        c = r["config"]
        tiles = f"{c['BLOCK_M']} x {c['BLOCK_N']}" if "BLOCK_M" in c else f"{c['BLOCK_T']} rows"
        lines.append(f"| {r['kernel']} | {r['head_dim']} | {r['programs']} | {tiles}, {c['num_warps']}, "
                     f"{c['num_stages']} | {r['registers']} | {r['spill_store_bytes']} / {r['spill_load_bytes']} "
                     f"| {r['shared_bytes']} | {r['vector_loads']} / {r['scalar_loads']} | {r['ptx_instructions']} |")
    (args.out_dir / f"{name}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out_dir / name}.json and .md")


if __name__ == "__main__":
    main()
