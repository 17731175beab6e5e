"""What the fast modes cost in quality: FID, IS and seconds per image of each setting, scored with xar-fid.

    python benchmarks/quality.py --model xar-b --vae kl16.ckpt --ref fid_stats/adm_in256_stats.npz

Settings: the exact mode (fp32, the model's official steps), bf16, a per-cell step taper (--taper,
default 40,30,21,12) and a guidance interval (--guidance-interval, default 0.2,0.8). Every setting
makes the same images: image i has the released evaluation's label for --num-images images and seed
--seed + i, so the rows differ by the setting alone. Each set is written to WORK_DIR/SETTING.npz (the
ADM format, streamed: never all images in memory) and scored by xar-fid against --ref, which caches an
image reference's statistics after the first setting. Seconds per image time the generation, VAE
decode included, not the scoring. Needs the real weights (and the fid extra) to mean anything; the
test runs it on xar-digits with random Inception weights so that it keeps working. Writes NAME.json
and NAME.md to --out-dir.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def settings(taper: list[int], interval: tuple[float, float]) -> list[dict]:
    return [
        {"name": "exact", "description": "fp32, the official steps", "dtype": "fp32"},
        {"name": "bf16", "description": "bf16 weights and activations", "dtype": "bf16"},
        {"name": "taper", "description": f"steps per cell {','.join(map(str, taper))}", "dtype": "fp32",
         "num_inference_steps": taper},
        {"name": "guidance-interval", "description": f"guidance only for t in [{interval[0]:g}, {interval[1]:g}]",
         "dtype": "fp32", "guidance_interval": interval},
    ]


def generate_set(args, setting: dict, path: Path) -> float:
    """Write the images of ``setting`` to ``path`` (arr_0: uint8 [N, H, W, 3]); returns the generation seconds."""
    from xar_infer import XARPipeline
    from xar_infer.pipeline import to_uint8
    from xar_infer.sample_sets import fid_labels

    pipe = XARPipeline.from_pretrained(args.model, vae=args.vae, dtype=DTYPES[setting["dtype"]], device=args.device)
    pipe.set_progress_bar_config(disable=True)
    labels = fid_labels(args.num_images, pipe.transformer.config.num_classes)
    height, width, channels = pipe.image_shape
    options = {key: setting[key] for key in ("num_inference_steps", "guidance_interval") if key in setting}
    header = _npy_header((len(labels), height, width, 3))
    seconds = 0.0
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive, \
            archive.open("arr_0.npy", "w", force_zip64=True) as member:
        member.write(header)
        for start in range(0, len(labels), args.batch_size):
            batch = range(start, min(start + args.batch_size, len(labels)))
            generators = [torch.Generator().manual_seed(args.seed + i) for i in batch]
            began = time.perf_counter()
            images = pipe([int(labels[i]) for i in batch], generator=generators, output_type="pt", **options).images
            if pipe.device.type == "cuda":
                torch.cuda.synchronize(pipe.device)
            seconds += time.perf_counter() - began
            images = to_uint8(images.float().cpu())
            if channels == 1:  # the digits demo is grayscale; Inception reads RGB
                images = np.repeat(images, 3, axis=3)
            member.write(np.ascontiguousarray(images).tobytes())
    return seconds


def _npy_header(shape: tuple[int, ...]) -> bytes:
    """The ``.npy`` header of a C-ordered uint8 array of ``shape`` (what ``np.save`` writes first)."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "|u1", "fortran_order": False, "shape": shape})
    return buffer.getvalue()


def score_set(args, path: Path, json_path: Path) -> dict:
    from xar_infer.scoring.command import main as xar_fid

    argv = [str(path), "--ref", str(args.ref), "--json", str(json_path), "--overwrite", "--device", args.device,
            "--batch-size", str(args.fid_batch_size), "--quiet"]
    if args.inception_weights:
        argv += ["--inception-weights", str(args.inception_weights)]
    if args.inception_sha256:
        argv += ["--inception-sha256", args.inception_sha256]
    if xar_fid(argv) != 0:
        sys.exit(f"quality.py: xar-fid failed on {path} (its message is above)")
    return json.loads(json_path.read_text())


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    return next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "CPU")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="xar-b", help="preset or checkpoint (default: xar-b)")
    parser.add_argument("--vae", help="MAR's KL-16 VAE (kl16.ckpt); not needed by pixel-space models such as xar-digits")
    parser.add_argument("--ref", required=True, type=Path, help="reference for xar-fid (statistics or images)")
    parser.add_argument("--num-images", type=int, default=10_000)
    parser.add_argument("--batch-size", type=int, default=64, help="images per generation call")
    parser.add_argument("--fid-batch-size", type=int, default=64, help="images per Inception pass")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--taper", default="40,30,21,12", help="steps per cell of the taper setting")
    parser.add_argument("--guidance-interval", default="0.2,0.8", help="LO,HI of the guidance-interval setting")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--inception-weights", type=Path, help="passed to xar-fid (offline machines, tests)")
    parser.add_argument("--inception-sha256", help="passed to xar-fid")
    parser.add_argument("--work-dir", type=Path, default=Path("quality-samples"), help="where the sample sets go")
    parser.add_argument("--out-dir", type=Path, default=HERE / "results")
    parser.add_argument("--name", default=None)
    args = parser.parse_args(argv)

    taper = [int(part) for part in args.taper.split(",")]
    lo, hi = (float(part) for part in args.guidance_interval.split(","))
    args.work_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for setting in settings(taper, (lo, hi)):
        path = args.work_dir / f"{setting['name']}.npz"
        seconds = generate_set(args, setting, path)
        scores = score_set(args, path, args.work_dir / f"{setting['name']}.json")
        rows.append({**setting, "seconds_per_image": seconds / args.num_images,
                     "fid": scores["fid"], "inception_score": scores["inception_score"],
                     "inception_score_std": scores["inception_score_std"], "num_images": args.num_images})
        print(f"{setting['name']}: FID {scores['fid']:.3f}, IS {scores['inception_score']:.2f}, "
              f"{rows[-1]['seconds_per_image']:.3f} s/image", flush=True)

    exact = rows[0]
    for row in rows:
        row["speedup_vs_exact"] = exact["seconds_per_image"] / row["seconds_per_image"]
        row["fid_minus_exact"] = row["fid"] - exact["fid"]
    name = args.name or f"quality-{args.model}-{args.device.split(':')[0]}"
    report = {"device": device_name(args.device), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "model": args.model, "reference": str(args.ref), "num_images": args.num_images,
              "inception_sha256": scores["inception_sha256"], "command": " ".join(["python", "benchmarks/quality.py",
                                                                                   *(argv or sys.argv[1:])]),
              "rows": rows}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    official = scores["inception_sha256"] == _official_sha256()
    lines = [f"# Quality of the fast modes: {args.model} on {report['device']}", "",
             f"`{report['command']}`, torch {torch.__version__}; {args.num_images:,} images per setting (labels in the "
             f"released order, image i from seed {args.seed} + i), scored by xar-fid against `{args.ref}`"
             + ("" if official else " with Inception weights other than the official ones (the numbers are not FIDs "
                                    "comparable with anything)") + ". Seconds per image: generation and decoding.", "",
             "| setting | FID | FID - exact | IS | s/image | speed vs exact |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['name']} ({r['description']}) | {r['fid']:.3f} | {r['fid_minus_exact']:+.3f} "
                     f"| {r['inception_score']:.2f} ± {r['inception_score_std']:.2f} | {r['seconds_per_image']:.3f} "
                     f"| {r['speedup_vs_exact']:.2f}x |")
    (args.out_dir / f"{name}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out_dir / name}.json and .md")


def _official_sha256() -> str:
    from xar_infer.scoring.inception import INCEPTION_SHA256
    return INCEPTION_SHA256


if __name__ == "__main__":
    main()
