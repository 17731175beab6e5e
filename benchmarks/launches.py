"""Kernel launches per image: what bounds batch-1 generation on a GPU, counted without one.

    python benchmarks/launches.py                          # xar_infer eager and with CUDA graphs
    python benchmarks/launches.py --official-repo ~/src/xAR  # adds the official code

On a GPU every PyTorch op that is not a view launches at least one kernel, and at batch 1 a kernel of
xAR-B runs for less time than its launch costs: generation then takes (launches x launch time) however
fast the GPU is. This counts the ops each implementation dispatches for one image, on the CPU, with
the network's depth, the official step count and guidance of the preset but a narrow width (the count
does not depend on the width, and the narrow model runs in seconds). Calls replayed from a CUDA graph
count as one launch each; the ops inside them are reported separately. The Triton backend is counted
without running Triton: each of its kernel calls is one launch. Writes NAME.json and NAME.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from xar_infer import XARTransformer
from xar_infer.backends import TORCH, Backend
from xar_infer.model import TORCH_OPS, BlockOps
from xar_infer.config import PRESETS, _official_mlp_hidden
from xar_infer.cuda_graphs import CUDAGraphs, _Graph
from xar_infer.loading import released_buffers
from xar_infer.sampling import NoiseSource, flow_step, generate_tokens

HERE = Path(__file__).resolve().parent


def is_view(func) -> bool:
    return any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)


class LaunchCounter(TorchDispatchMode):
    """Counts dispatched ops that are not views (each a kernel launch on a GPU), split by whether they
    ran inside a replayed graph."""

    def __init__(self):
        super().__init__()
        self.launched, self.replayed, self.graph_replays = Counter(), 0, 0
        self.in_graph, self.counting = False, True

    def count(self, name: str, launches: int = 1) -> None:
        if self.in_graph:
            self.replayed += launches
        else:
            self.launched[name] += launches

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        # Views launch nothing, nor does allocating (empty*); the stand-ins for Triton count themselves.
        # Reading a number (item) is a launch and a sync on a GPU tensor, but here it reads the sampler's
        # time grid, which is a host tensor on a GPU too.
        name = func.overloadpacket.__name__
        if not is_view(func) and not name.startswith("empty") and name != "_local_scalar_dense" and self.counting:
            self.count(name)
        return func(*args, **(kwargs or {}))

    @contextmanager
    def paused(self):
        self.counting = False
        try:
            yield
        finally:
            self.counting = True


def triton_stand_ins(counter: LaunchCounter) -> Backend:
    """The Triton backend's launches without running Triton: each kernel call is one launch (plus the
    copy the step's launcher makes of a strided velocity), computed by the uncounted PyTorch reference."""

    def one_launch(reference, name: str):
        def kernel(*args):
            with counter.paused():
                out = reference(*args).contiguous()  # the kernels write dense outputs
            counter.count(f"triton {name}")
            return out
        return kernel

    def step(rule, x, velocity, *args, **kwargs):
        counter.count("triton flow_step", 1 + (not velocity.is_contiguous()))
        with counter.paused():
            return flow_step(rule, x, velocity, *args, **kwargs)

    ops = BlockOps(*(one_launch(getattr(TORCH_OPS, f.name), f.name) for f in dataclasses.fields(BlockOps)))
    return Backend("triton (counted)", ops, step)


@contextmanager
def graph_replays_counted(counter: LaunchCounter):
    """Off CUDA a "replay" reruns the captured function; count it as the one graph launch it would be."""
    original = _Graph.replay

    def replay(self):
        counter.graph_replays += 1
        counter.in_graph = True
        try:
            return original(self)
        finally:
            counter.in_graph = False

    _Graph.replay = replay
    try:
        yield
    finally:
        _Graph.replay = original


def narrow(config):
    """The preset's depth with a narrow width: the same ops, far fewer FLOPs."""
    # The presets' MLP width, as the official constructor derives it (so that its model loads our weights).
    return dataclasses.replace(config, dim=96, num_heads=4, mlp_hidden_dim=_official_mlp_hidden(96))


def count_xar_infer(preset_name: str, batch: int, steps: int, triton: bool, graphs: bool) -> LaunchCounter:
    preset = PRESETS[preset_name]
    model = XARTransformer(narrow(preset.config)).eval()
    labels = torch.arange(batch)
    counter = LaunchCounter()
    backend = triton_stand_ins(counter) if triton else TORCH
    cuda_graphs = CUDAGraphs(capture=False) if graphs else None
    run = lambda: generate_tokens(model, labels, steps, preset.guidance_scale,  # noqa: E731
                                  NoiseSource(torch.Generator().manual_seed(0), batch, torch.device("cpu")),
                                  backend=backend, cuda_graphs=cuda_graphs)
    with torch.no_grad():
        if graphs:
            run()  # the capturing call; the count is for the calls after it, which replay only
        counter.launched.clear()
        with graph_replays_counted(counter), counter:
            run()
    return counter


def count_official(repo: str, preset_name: str, batch: int, steps: int) -> LaunchCounter:
    sys.path.insert(0, repo)
    import models.xar as official  # noqa: the checkout's own module

    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # the official code calls .cuda() throughout
    preset = PRESETS[preset_name]
    c = narrow(preset.config)
    model = official.xAR(encoder_embed_dim=c.dim, encoder_depth=c.encoder_depth, encoder_num_heads=c.num_heads,
                         decoder_embed_dim=c.dim, decoder_depth=c.decoder_depth, decoder_num_heads=c.num_heads,
                         mlp_ratio=4).eval()
    ours = XARTransformer(c)
    model.load_state_dict({**ours.state_dict(), **released_buffers(c)}, strict=True)
    counter = LaunchCounter()
    torch.manual_seed(0)
    with torch.no_grad(), counter:
        model.sample_tokens(num_steps=steps, cfg=preset.guidance_scale, label=torch.arange(batch))
    return counter


def row(name: str, counter: LaunchCounter, evaluations: int, batch: int) -> dict:
    launches = sum(counter.launched.values()) + counter.graph_replays
    return {"implementation": name, "launches_per_image": launches / batch,
            "launches_per_network_call": launches / evaluations,
            "ops_inside_graphs_per_image": counter.replayed / batch,
            "most_launched": counter.launched.most_common(8)}


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = [f"# Kernel launches per image: {s['preset']}, batch {s['batch']}, {s['steps']} steps, cfg {s['cfg']}", "",
             f"`{s['command']}`, torch {report['torch']}. Non-view PyTorch ops dispatched (each at least one kernel "
             "launch on a GPU), counted on the CPU with the preset's depth at a narrow width; a graph replay counts "
             "as one launch.", "",
             "| implementation | launches per image | per network call | ops replayed inside graphs, per image |",
             "|---|---:|---:|---:|"]
    for r in report["rows"]:
        lines.append(f"| {r['implementation']} | {r['launches_per_image']:,.0f} | {r['launches_per_network_call']:,.1f} "
                     f"| {r['ops_inside_graphs_per_image']:,.0f} |")
    lines += ["", "Most launched ops:", ""]
    for r in report["rows"]:
        lines.append(f"- {r['implementation']}: " + ", ".join(f"{name} {n}" for name, n in r["most_launched"]))
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="xar-b", choices=[p for p in PRESETS if p != "xar-digits"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, help="steps per cell (default: the preset's)")
    parser.add_argument("--official-repo", help="a checkout of github.com/OliverRensu/xAR to count as well")
    parser.add_argument("--out-dir", type=Path, default=HERE / "results")
    parser.add_argument("--name", default=None, help="output file stem (default: launches-PRESET-bBATCH)")
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    steps = args.steps or preset.num_inference_steps
    # Network calls per generation: each step of each cell is one (the first also runs the previous cell).
    evaluations = steps * preset.config.num_cells

    torch.set_num_threads(1)  # counts do not depend on threads; one keeps the narrow model quick
    rows = []
    if args.official_repo:
        rows.append(row("official xAR", count_official(args.official_repo, args.preset, args.batch, steps), evaluations, args.batch))
    for triton in (False, True):
        for graphs in (False, True):
            name = f"xar_infer, {'triton' if triton else 'torch'} backend{', CUDA graphs' if graphs else ''}"
            rows.append(row(name, count_xar_infer(args.preset, args.batch, steps, triton, graphs), evaluations, args.batch))
    report = {"settings": {"preset": args.preset, "batch": args.batch, "steps": steps,
                           "cfg": preset.guidance_scale, "command": " ".join(["python benchmarks/launches.py", *(argv or sys.argv[1:])])},
              "torch": torch.__version__, "rows": rows}
    name = args.name or f"launches-{args.preset}-b{args.batch}"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{name}.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out_dir / f"{name}.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
