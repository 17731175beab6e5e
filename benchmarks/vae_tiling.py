"""Peak memory and time of the KL-16 decoder, untiled against tiled, on batches of latents.

    python benchmarks/vae_tiling.py                               # CPU: 16x16 and 32x32 latents, batch 4
    python benchmarks/vae_tiling.py --device cuda --batch 16

Every setting runs in a fresh subprocess (on CPU its peak resident memory is its own; on CUDA the
peak allocated memory is read), random weights of the real shapes, median time of --repeats runs
after a warm-up. Writes NAME.json and NAME.md to --out-dir.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def measure(spec: dict) -> dict:
    from xar_infer import vae_tiling_backend
    from xar_infer.vae import AutoencoderKLDecoder, VAEConfig

    device = spec["device"]
    torch.manual_seed(0)
    vae = AutoencoderKLDecoder(VAEConfig()).to(device).eval()
    z = torch.randn(spec["batch"], 16, spec["size"], spec["size"], device=device)
    tile = spec["tile"]

    def run():
        with torch.inference_mode():
            out = vae.decode(z, tile_size=tile, tile_overlap=spec["overlap"])
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return out

    run()  # warm-up
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(spec["repeats"]):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() if device.startswith("cuda")
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {**spec, "seconds": statistics.median(times), "peak_memory_bytes": peak,
            "peak_memory_kind": "CUDA allocated" if device.startswith("cuda") else "process RSS",
            "gather_blend": vae_tiling_backend(device) if tile else None}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--sizes", default="16,32", help="latent sizes (16 -> 256 px, 32 -> 512 px)")
    parser.add_argument("--tiles", default="none,8", help="tile sizes in latent cells ('none': untiled)")
    parser.add_argument("--overlap", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out-dir", type=Path, default=HERE / "results")
    parser.add_argument("--name", default=None)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(measure(json.loads(args.worker))))
        return
    rows = []
    for size in map(int, args.sizes.split(",")):
        for tile in args.tiles.split(","):
            spec = {"device": args.device, "batch": args.batch, "size": size, "repeats": args.repeats,
                    "tile": None if tile == "none" else int(tile), "overlap": args.overlap}
            done = subprocess.run([sys.executable, str(Path(__file__)), "--worker", json.dumps(spec)],
                                  capture_output=True, text=True, check=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"{size}x{size} tile {tile}: {r['seconds']:.2f} s, {r['peak_memory_bytes'] / 2**30:.2f} GiB", flush=True)
    device_name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else \
        next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "CPU")
    report = {"device": device_name, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "command": " ".join(["python", "benchmarks/vae_tiling.py", *(argv or sys.argv[1:])]), "rows": rows}
    name = args.name or f"vae-tiling-{args.device.split(':')[0]}"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# Tiled VAE decoding: {device_name}", "", f"`{report['command']}`, torch {torch.__version__}, "
             f"{report['threads']} threads; KL-16 decoder, random weights, batch {args.batch}, halo {args.overlap} "
             f"latent cells, median of {args.repeats} after a warm-up.", "",
             "| latent | image | tiling | gather/blend | seconds | peak memory |", "|---|---|---|---|---:|---:|"]
    for r in rows:
        tiling = f"{r['tile']}x{r['tile']} windows" if r["tile"] else "untiled"
        lines.append(f"| {r['size']}x{r['size']} | {r['size'] * 16} px | {tiling} | {r['gather_blend'] or '-'} "
                     f"| {r['seconds']:.2f} | {r['peak_memory_bytes'] / 2**30:.2f} GiB ({r['peak_memory_kind']}) |")
    (args.out_dir / f"{name}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out_dir / name}.json and .md")


if __name__ == "__main__":
    main()
