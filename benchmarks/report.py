"""Benchmark results as JSON (everything), a Markdown table and a PNG chart (end-to-end images/s)."""

from __future__ import annotations

import json
from pathlib import Path


def markdown(report: dict) -> str:
    m, s, peak = report["machine"], report["settings"], report["matmul_peak"]
    lines = [
        f"# Benchmark: {m['device_name']}",
        "",
        f"`{s['command']}`: torch {m['torch']}, {s['dtype']}, {m['cpu_threads']} CPU threads. Dense matmul peak "
        f"measured in the same run: {peak['flops_per_s'] / 1e9:.0f} GFLOP/s ({peak['size']}^3 {peak['dtype']}"
        + "".join(f"; {name} {flops / 1e9:.0f}" for name, flops in peak.get("flops_per_s_by_kernel", {}).items()) + ")"
        + "".join(f", {p['flops_per_s'] / 1e9:.0f} GFLOP/s in {p['dtype']} (for the rows in {p['dtype']})"
                  for p in report.get("other_matmul_peaks", [])) + ". "
        "Random weights of the real shapes; medians of "
        f"{s['repeats']} run(s) after a warm-up.",
        "",
        "| contender | sampler | batch | s/image (generate) | s/image (end to end) | images/s (end to end) "
        "| GFLOP/image | GFLOP/s (end to end) | % of matmul peak | peak memory |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        note = " ¹" if r["extrapolated"] else ""
        gflop = (r["generate_flops_per_image"] + r["decode_flops_per_image"]) / 1e9
        lines.append(
            f"| {r['contender']} | {r['description']}{note} | {r['batch']} | {r['generate_seconds_per_image']:.3f} "
            f"| {r['end_to_end_seconds_per_image']:.3f} | {r['end_to_end_images_per_s']:.3f} | {gflop:,.0f} "
            f"| {r['end_to_end_flops_per_s'] / 1e9:,.0f} | {100 * r['end_to_end_fraction_of_peak']:.0f}% "
            f"| {r['peak_memory_bytes'] / 2**30:.1f} GiB ({r['peak_memory_kind']}) |")
    if report.get("complete") is False:
        planned = len(s["batch_sizes"]) * len(s["contenders"])
        lines += ["", f"**Partial run:** {len(report['rows'])} of the {planned} planned rows were measured before the "
                      "run was cut short."]
    extrapolated = sorted({r["timed_steps"] for r in report["rows"] if r["extrapolated"]})
    if extrapolated:
        lows = sorted({str(r["timed_from_steps"]) for r in report["rows"] if r.get("timed_from_steps")})
        lines += ["", f"¹ extrapolated from {', '.join(map(str, extrapolated))} timed step(s) to the official count: DiT "
                      "and SiT scaled linearly (every step costs the same)"
                      + (f"; xAR on the line through its times at {', '.join(lows)} and that many steps per cell (a "
                         "cell's first step also re-runs the previous cell)" if lows else "") + "."]
    if report["ratios"]:
        lines += ["", "| xar_infer | versus | batch | end-to-end speedup | generate speedup | generate speedup, "
                      "back to back ² |", "|---|---|---:|---:|---:|---:|"]
        for q in report["ratios"]:
            paired = f"{q['paired_generate_speedup']:.2f}x" if q.get("paired_generate_speedup") else "-"
            lines.append(f"| {q['xar_infer']} | {q['versus']} | {q['batch']} | {q['end_to_end_speedup']:.1f}x "
                         f"| {q['generate_speedup']:.1f}x | {paired} |")
        lines += ["", "² median over rounds that time both contenders one after the other in one process (the "
                      "columns before compare medians measured minutes apart, and this shared machine's speed drifts "
                      "by tens of percent over minutes)."]
    captured = [r for r in report["rows"] if "first_call_seconds" in r]
    for r in captured:
        lines.append(f"\n{r['contender']} at batch {r['batch']}: the first call, which captures the CUDA graphs, took "
                     f"{r['first_call_seconds']:.2f} s; the times above are later calls, which only replay them.")
    official = [r for r in report["rows"] if "max_abs_diff_vs_xar_infer" in r]
    for r in official:
        lines.append(f"\n{r['contender']} at batch {r['batch']}: latents differ from xar_infer's by at most "
                     f"{r['max_abs_diff_vs_xar_infer']:.2e} (same weights, seed and steps).")
    return "\n".join(lines) + "\n"


def chart(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    names = list(dict.fromkeys(r["contender"] for r in rows))
    batches = list(dict.fromkeys(r["batch"] for r in rows))
    width = 0.8 / len(batches)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(names)), 4))
    for j, batch in enumerate(batches):
        values = [next((r["end_to_end_images_per_s"] for r in rows if r["contender"] == n and r["batch"] == batch), 0)
                  for n in names]
        ax.bar([i + j * width for i in range(len(names))], values, width, label=f"batch {batch}")
    ax.set_xticks([i + width * (len(batches) - 1) / 2 for i in range(len(names))])
    ax.set_xticklabels([n.replace(" (", "\n(") for n in names], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("images/s, end to end (log)")
    ax.set_title(report["machine"]["device_name"], fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(report: dict, out_dir: Path, name: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{name}.json", out_dir / f"{name}.md", out_dir / f"{name}.png"]
    paths[0].write_text(json.dumps(report, indent=2) + "\n")
    paths[1].write_text(markdown(report))
    chart(report, paths[2])
    return paths


def save_table(report: dict, table: str, out_dir: Path, name: str) -> None:
    """A benchmark's result as ``name.json`` (the numbers) and ``name.md`` (``table``, for reading);
    the table is printed too."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(report, indent=1) + "\n")
    (out_dir / f"{name}.md").write_text(table)
    print(table)
