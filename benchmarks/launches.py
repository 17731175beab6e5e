"""Kernel launches per image and per network call: what bounds batch-1 generation on a GPU, counted without one.

    python benchmarks/launches.py                                  # the engine: both backends, eager and graphed
    python benchmarks/launches.py --lockstep-tree /tmp/xar-lockstep  # adds the lockstep sampler (9d58fcb)
    python benchmarks/launches.py --official-repo ~/src/xAR         # adds the official code

On a GPU every PyTorch op that is not a view launches at least one kernel, and at batch 1 a kernel of
xAR-B runs for less time than its launch costs: generation then takes (launches x launch time) however
fast the GPU is. This counts the ops each implementation dispatches for one image, on the CPU, with
the network's depth, the official step count and guidance of the preset but a narrow width (the count
does not depend on the width, and the narrow model runs in seconds). The Triton backend is counted
without running Triton: each of its kernel calls is one launch. A row's "tensors from host data"
counts the tensors made from Python values (``torch.tensor``, ``as_tensor``): on a GPU each is a copy
from the host, which costs the host about what a launch does, but on the CPU it dispatches no op.

Calls replayed from a CUDA graph (``cuda_graphs.CUDAGraphs``, run off CUDA without capturing) count
as one launch each; the ops inside them are reported separately.

``--lockstep-tree`` counts the sampler that ran before the engine (one lockstep batch, its KV cache
grown by the model) from a checkout of it, e.g. ``git worktree add /tmp/xar-lockstep 9d58fcb``, in a
subprocess that imports that tree's xar_infer: the same counter, so the numbers compare. Writes
NAME.json and NAME.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Only names that the lockstep tree has too: this file also runs there (--worker).
from xar_infer import XARTransformer
from xar_infer.backends import TORCH, Backend
from xar_infer.config import PRESETS, _official_mlp_hidden
from xar_infer.loading import released_buffers
from xar_infer.model import TORCH_OPS, BlockOps
from xar_infer.sampling import NoiseSource, flow_step

HERE = Path(__file__).resolve().parent


NOT_LAUNCHES = ("_local_scalar_dense", "item", "detach_")


def is_view(func) -> bool:
    return any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)


def writes_in_place(func) -> bool:
    return any(r.alias_info is not None and r.alias_info.is_write for r in func._schema.returns)


class LaunchCounter(TorchDispatchMode):
    """Counts dispatched ops that are not views (each a kernel launch on a GPU), split by whether they
    ran inside a replayed graph, and the tensors made from host data."""

    def __init__(self):
        super().__init__()
        self.launched, self.replayed, self.graph_replays, self.from_host = Counter(), 0, 0, 0
        self.in_graph, self.counting = False, True

    def count(self, name: str, launches: int = 1) -> None:
        if self.in_graph:
            self.replayed += launches
        else:
            self.launched[name] += launches

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        # Views launch nothing, nor does allocating (empty*) or detaching (detach_: metadata); the
        # stand-ins for Triton count themselves. Reading a number (item) is a launch and a sync on a GPU
        # tensor, but here it reads the sampler's time grid, which is a host tensor on a GPU too.
        # lift_fresh marks a tensor made from Python data.
        # An op that hands back one of its inputs unchanged (type_as or to, to the dtype it has) launches
        # nothing; one that writes into it (copy_, fill_) does.
        name = func.overloadpacket.__name__
        out = func(*args, **(kwargs or {}))
        returned_input = not writes_in_place(func) and any(out is arg for arg in args)
        if self.counting and name == "lift_fresh":
            self.from_host += 1
        elif (self.counting and not is_view(func) and not name.startswith("empty") and name not in NOT_LAUNCHES
              and not returned_input):
            self.count(name)
        return out

    @contextmanager
    def paused(self):
        self.counting = False
        try:
            yield
        finally:
            self.counting = True


def triton_stand_ins(counter: LaunchCounter) -> Backend:
    """The Triton backend's launches without running Triton: each kernel call is one launch (plus the
    copy the step's launcher makes of a strided velocity), computed by the uncounted PyTorch reference.
    Where ``BlockOps`` has ``attention_uses_groups`` (the engine), attention is the ragged kernel,
    which reads the cells from the batch's device tensors; its stand-in rebuilds the batch from them."""

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

    def ragged_attention(q, k, v, cos, sin, cache, layer, batch):
        from xar_infer.model import CellBatch

        # A captured call's batch has no host-side groups: take the cells from its tensors, as the kernel does.
        rebuilt = CellBatch.build(batch.slots.tolist(), batch.cells.tolist(), batch.labels, batch.times, q.device)
        return TORCH_OPS.attention(q, k, v, cos, sin, cache, layer, rebuilt)

    references = {f.name: getattr(TORCH_OPS, f.name) for f in dataclasses.fields(BlockOps)}
    if "attention_uses_groups" in references:
        references.update(attention=ragged_attention, attention_uses_groups=False)
    ops = {name: one_launch(ref, name) if callable(ref) else ref for name, ref in references.items()}
    return Backend("triton (counted)", BlockOps(**ops), step)


@contextmanager
def graph_replays_counted(counter: LaunchCounter):
    """Off CUDA a "replay" reruns the captured function; count it as the one graph launch it would be."""
    from xar_infer.cuda_graphs import _Graph

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


def count_engine(preset_name: str, batch: int, steps: int, triton: bool, graphs: bool) -> LaunchCounter:
    """One ``pipe(...)`` batch on the engine (``generate_latents``), eagerly or replaying CUDA graphs."""
    from xar_infer.cuda_graphs import CUDAGraphs
    from xar_infer.engine import EagerNetwork, generate_latents
    from xar_infer.settings import SamplingSettings

    preset = PRESETS[preset_name]
    model = XARTransformer(narrow(preset.config)).eval()
    settings = SamplingSettings.build(model.config.num_cells, steps, preset.guidance_scale)
    labels = torch.arange(batch)
    counter = LaunchCounter()
    backend = triton_stand_ins(counter) if triton else TORCH
    network = CUDAGraphs(capture=False).network if graphs else EagerNetwork
    run = lambda: generate_latents(model, labels, settings,  # noqa: E731
                                   NoiseSource(torch.Generator().manual_seed(0), batch, torch.device("cpu")),
                                   backend, network=network)
    with torch.no_grad():
        if graphs:
            run()  # the capturing call; the count is for the calls after it, which replay only
        counter.launched.clear()
        with graph_replays_counted(counter), counter:
            run()
    return counter


def count_lockstep(preset_name: str, batch: int, steps: int, triton: bool, graphs: bool) -> LaunchCounter:
    """One batch of the lockstep sampler (``sampling.generate_tokens``, before the engine): run on its tree."""
    from xar_infer.cuda_graphs import CUDAGraphs
    from xar_infer.sampling import generate_tokens

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
        counter.from_host = 0
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


def row(name: str, counter: LaunchCounter, calls: int, batch: int) -> dict:
    launches = sum(counter.launched.values()) + counter.graph_replays
    return {"implementation": name, "launches_per_image": launches / batch, "launches_per_network_call": launches / calls,
            "host_tensors_per_network_call": counter.from_host / calls,
            "ops_inside_graphs_per_image": counter.replayed / batch, "most_launched": counter.launched.most_common(8)}


def lockstep_rows(args, calls: int) -> list[dict]:
    rows = []
    for triton in (False, True):
        for graphs in (False, True):
            name = f"lockstep, {'triton' if triton else 'torch'} backend{', CUDA graphs' if graphs else ''}"
            rows.append(row(name, count_lockstep(args.preset, args.batch, args.steps, triton, graphs), calls, args.batch))
    return rows


def run_lockstep_tree(tree: Path, args) -> list[dict]:
    """``lockstep_rows`` in a subprocess that imports ``tree``'s xar_infer."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree / "src"), str(HERE)])}
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--preset", args.preset,
               "--batch", str(args.batch), "--steps", str(args.steps)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"the lockstep count in {tree} failed:\n{done.stderr[-3000:]}")
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    if not Path(answer["xar_infer"]).resolve().is_relative_to(tree.resolve()):
        raise SystemExit(f"the worker imported xar_infer from {answer['xar_infer']}, not from {tree}")
    return answer["rows"]


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = [f"# Kernel launches per image: {s['preset']}, batch {s['batch']}, {s['steps']} steps, cfg {s['cfg']}", "",
             f"`{s['command']}`, torch {report['torch']}. Non-view PyTorch ops dispatched (each at least one kernel "
             "launch on a GPU), counted on the CPU with the preset's depth at a narrow width; a graph replay counts "
             "as one launch. \"Tensors from host data\" are made from Python values: on a GPU each is a copy from "
             "the host, which the launch count does not include.", "",
             "| implementation | launches per image | per network call | tensors from host data, per call "
             "| ops replayed inside graphs, per image |",
             "|---|---:|---:|---:|---:|"]
    for r in report["rows"]:
        lines.append(f"| {r['implementation']} | {r['launches_per_image']:,.0f} | {r['launches_per_network_call']:,.1f} "
                     f"| {r['host_tensors_per_network_call']:,.1f} | {r['ops_inside_graphs_per_image']:,.0f} |")
    lines += ["", "Most launched ops:", ""]
    for r in report["rows"]:
        lines.append(f"- {r['implementation']}: " + ", ".join(f"{name} {n}" for name, n in r["most_launched"]))
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="xar-b", choices=[p for p in PRESETS if p != "xar-digits"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, help="steps per cell (default: the preset's)")
    parser.add_argument("--lockstep-tree", type=Path, help="a checkout of the lockstep sampler (e.g. commit 9d58fcb) to count as well")
    parser.add_argument("--official-repo", help="a checkout of github.com/OliverRensu/xAR to count as well")
    parser.add_argument("--out-dir", type=Path, default=HERE / "results")
    parser.add_argument("--name", default=None, help="output file stem (default: launches-PRESET-bBATCH)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # count the lockstep rows here, print JSON
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    args.steps = args.steps or preset.num_inference_steps
    # Network calls per generation: one per step of each cell (the first also runs the previous cell).
    calls = args.steps * preset.config.num_cells

    torch.set_num_threads(1)  # counts do not depend on threads; one keeps the narrow model quick
    if args.worker:
        import xar_infer

        print(json.dumps({"xar_infer": xar_infer.__file__, "rows": lockstep_rows(args, calls)}))
        return
    rows = []
    if args.official_repo:
        rows.append(row("official xAR", count_official(args.official_repo, args.preset, args.batch, args.steps), calls, args.batch))
    if args.lockstep_tree:
        rows += run_lockstep_tree(args.lockstep_tree, args)
    for triton in (False, True):
        for graphs in (False, True):
            name = f"engine, {'triton' if triton else 'torch'} backend{', CUDA graphs' if graphs else ''}"
            rows.append(row(name, count_engine(args.preset, args.batch, args.steps, triton, graphs), calls, args.batch))
    report = {"settings": {"preset": args.preset, "batch": args.batch, "steps": args.steps,
                           "cfg": preset.guidance_scale, "command": " ".join(["python benchmarks/launches.py", *(argv or sys.argv[1:])])},
              "torch": torch.__version__, "rows": rows}
    name = args.name or f"launches-{args.preset}-b{args.batch}"
    from report import save_table  # beside this file

    save_table(report, markdown(report), args.out_dir, name)


if __name__ == "__main__":
    main()
