"""The benchmark suite: its FLOP formulas against torch's own count, and a --quick smoke run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from xar_infer.backends import TORCH
from xar_infer.config import XARConfig
from xar_infer.engine import Engine, generate_latents
from xar_infer.sampling import NoiseSource
from xar_infer.settings import SamplingSettings

from conftest import random_transformer
from cpu_threads import one_torch_thread, subprocess_env  # noqa: F401  (autouse: this module runs on one thread)

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from flops import counted_flops, dit_xl2_flops_per_forward, xar_flops_per_image  # noqa: E402


def generate_counted(model, steps, guidance, interval=None, schedule="linear", modulation_table=True) -> float:
    """FLOPs counted while the engine makes one image (label 1), as ``pipe(...)`` would, or with no
    modulation table (each call then computes its cells' modulations)."""
    num_cells = model.config.num_cells
    settings = SamplingSettings.build(num_cells, steps, guidance, guidance_schedule=schedule, guidance_interval=interval)
    labels, noise = torch.tensor([1]), NoiseSource(None, 1, torch.device("cpu"))
    if modulation_table:
        return counted_flops(lambda: generate_latents(model, labels, settings, noise, TORCH))
    rows = 2 if settings.plan(num_cells).guided else 1
    engine = Engine(model, TORCH, rows, (settings.steps_per_cell, settings.guidance_scale), modulation_table_bytes=0)

    def run():
        engine.add_job(labels, settings, noise, finish=lambda latent: latent)
        engine.run_until_idle()

    return counted_flops(run)


@pytest.mark.parametrize("config", [
    XARConfig(dim=32, encoder_depth=1, decoder_depth=1, num_heads=2, mlp_hidden_dim=48),
    XARConfig(dim=48, encoder_depth=2, decoder_depth=1, num_heads=3, mlp_hidden_dim=40, token_channels=4,
              grid_size=8, cell_size=4, num_classes=10),
])
@pytest.mark.parametrize("steps, guidance, interval", [
    (3, 2.0, None), (1, 1.0, None), (4, 1.0, None), (2, 3.0, None),
    # Outside the interval a cell's first call runs only the previous cell for the unconditional half.
    (3, 2.0, (0.2, 0.8)), ([3, 2, 2, 1], 2.0, (0.2, 0.8)),
])
def test_xar_flop_formula_equals_the_counted_flops(config, steps, guidance, interval):
    model = random_transformer(config)
    counted = generate_counted(model, steps, guidance, interval)
    assert xar_flops_per_image(config, steps, guidance, guidance_interval=interval) == counted


@pytest.mark.parametrize("steps, guidance", [(3, 2.0), (2, 1.0)])
def test_xar_flop_formula_without_modulation_table_equals_the_counted_flops(monkeypatch, steps, guidance):
    """Each call computes its cells' modulations. A call of one cell has one condition, a lone row that
    backends.onednn_linear computes as two; the formula counts the work asked for, so here the linear
    layers run on F.linear."""
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    model = random_transformer(XARConfig(dim=32, encoder_depth=1, decoder_depth=1, num_heads=2, mlp_hidden_dim=48))
    counted = generate_counted(model, steps, guidance, modulation_table=False)
    assert xar_flops_per_image(model.config, steps, guidance, modulation_table=False) == counted


@pytest.mark.parametrize("steps", [1, 3])
def test_released_flop_formula_equals_the_counted_flops(steps):
    """The released sampler's work, counted on our engine run as the released code runs (every cell
    guided: the constant schedule; no modulation table), plus what only the released code computes:
    on a cell's first call it runs the previous cell's T queries against the noisy cell's keys too
    and masks them, 4 T^2 D per layer, for each guidance half of each cell after the first."""
    config = XARConfig(dim=32, encoder_depth=1, decoder_depth=1, num_heads=2, mlp_hidden_dim=48)
    counted = generate_counted(random_transformer(config), steps, 2.0, schedule="constant", modulation_table=False)
    T = config.tokens_per_cell
    masked = 2 * (config.num_cells - 1) * config.num_layers * 4 * T * T * config.dim
    assert xar_flops_per_image(config, steps, 2.0, released=True) == counted + masked


def test_dit_flop_formula_equals_the_counted_flops():
    """The counter needs shapes only: DiT-XL/2 and its inputs on the meta device, nothing computed."""
    pytest.importorskip("diffusers", reason="benchmark extra: pip install -e '.[bench]'")
    from contenders import dit_backbone

    with torch.device("meta"):
        dit = dit_backbone().eval()
        counted = counted_flops(lambda: dit(torch.zeros(1, 4, 32, 32), timestep=torch.tensor([5]),
                                            class_labels=torch.tensor([3])))
    assert dit_xl2_flops_per_forward() == counted


def test_quick_run_reports_every_contender(tmp_path):
    pytest.importorskip("diffusers", reason="benchmark extra: pip install -e '.[bench]'")
    # Real-size models: both threads, which sleep rather than spin while they wait on a busy machine.
    subprocess.run([sys.executable, str(BENCHMARKS / "run.py"), "--quick", "--out-dir", str(tmp_path)],
                   check=True, capture_output=True, timeout=900, env=subprocess_env(threads=None))
    report = json.loads((tmp_path / "quick.json").read_text())
    assert [row["key"] for row in report["rows"]] == ["xar-b", "dit", "sit"]
    for row in report["rows"]:
        for figure in ("generate_seconds", "decode_seconds", "end_to_end_images_per_s", "generate_flops_per_image",
                       "decode_flops_per_image", "end_to_end_flops_per_s", "peak_memory_bytes"):
            assert row[figure] > 0, (row["key"], figure)
        assert row["extrapolated"] and row["timed_steps"] == 2
    assert report["matmul_peak"]["flops_per_s"] > 0
    # On CPU the yardstick is the faster of torch's matmul and the oneDNN one the linear layers use.
    by_kernel = report["matmul_peak"]["flops_per_s_by_kernel"]
    assert set(by_kernel) == {"torch.matmul", "oneDNN"} and report["matmul_peak"]["flops_per_s"] == max(by_kernel.values())
    assert {(q["versus"], q["batch"]) for q in report["ratios"]} == {
        ("DiT-XL/2 (diffusers)", 1), ("SiT-XL/2 (diffusers backbone)", 1)}
    assert "extrapolated from 2 timed step(s)" in (tmp_path / "quick.md").read_text()
    assert (tmp_path / "quick.png").stat().st_size > 0


def _generate_with_op_names(contender):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        latents = contender.generate(1, 2)
    return latents, {event.name for event in prof.events()}


def test_mkl_contender_runs_the_linear_layers_by_f_linear():
    """``xar-b+torch+mkl`` measures what oneDNN gains: the same generation, its products by F.linear."""
    from contenders import XARContender

    generate = _generate_with_op_names
    plain, plain_ops = generate(XARContender("xar-digits", "cpu", torch.float32))
    mkl, mkl_ops = generate(XARContender("xar-digits", "cpu", torch.float32, backend="torch+mkl"))
    assert "mkldnn::_linear_pointwise" in plain_ops and "mkldnn::_linear_pointwise" not in mkl_ops
    assert torch.backends.mkldnn.enabled  # switched back on after the call
    assert torch.allclose(plain, mkl, atol=1e-4)  # the same fp32 model, summed in another order


@pytest.mark.triton
def test_attention_microbenchmark_runs(tmp_path):
    """Smoke run of the attention microbenchmark (on CPU the kernel is interpreted: times mean nothing,
    but every contender runs on the real xAR-B shapes and their outputs agree)."""
    env = subprocess_env(TRITON_INTERPRET=os.environ.get("TRITON_INTERPRET", "1"))
    device = ["--device", "cpu", "--dtype", "fp32"] if not torch.cuda.is_available() else []
    subprocess.run([sys.executable, str(BENCHMARKS / "attention.py"), *device, "--models", "xar-b", "--batch-sizes", "1",
                    "--cache-lengths", "64", "--repeats", "1", "--out-dir", str(tmp_path), "--name", "smoke"],
                   check=True, capture_output=True, timeout=600, env=env)
    report = json.loads((tmp_path / "smoke.json").read_text())
    assert [(r["step"], r["cache_len"]) for r in report["rows"]] == [("first", 64), ("later", 64)]
    from xar_infer import kernels

    # The kernels that exist: the engine's ragged one, and the lockstep ones while they are kept.
    expected = {"torch path", "sdpa"} | {name for name, fn in [("triton ragged", "ragged_attention"),
                                                               ("triton lockstep", "block_causal_attention"),
                                                               ("triton rope + sdpa", "sdpa_block_causal_attention")]
                                         if hasattr(kernels, fn)}
    for row in report["rows"]:
        assert row["max_difference"] < 2e-5
        assert {c.removesuffix(" us") for c in row if c.endswith(" us")} == expected
        assert all(row[f"{name} us"] > 0 for name in expected)
    assert "| xar-b | 1 | 64 | first |" in (tmp_path / "smoke.md").read_text()


def test_vae_tiling_benchmark_runs(tmp_path):
    """Smoke run on tiny latents: both rows, positive figures, the gather/blend implementation named."""
    subprocess.run([sys.executable, str(BENCHMARKS / "vae_tiling.py"), "--device", "cpu", "--batch", "1", "--sizes", "4",
                    "--tiles", "none,2", "--repeats", "1", "--out-dir", str(tmp_path), "--name", "smoke"],
                   check=True, capture_output=True, timeout=300, env=subprocess_env())
    report = json.loads((tmp_path / "smoke.json").read_text())
    assert [r["tile"] for r in report["rows"]] == [None, 2]
    assert all(r["seconds"] > 0 and r["peak_memory_bytes"] > 0 for r in report["rows"])
    assert report["rows"][1]["gather_blend"] in ("cpp", "torch")
    assert "| 4x4 | 64 px | 2x2 windows |" in (tmp_path / "smoke.md").read_text()


def test_launch_count_benchmark_runs(tmp_path):
    """Smoke run at 2 steps: every engine row, and the counts ordered as they must be (graphs launch
    fewer ops than eager calls; the Triton backend fewer than the PyTorch one); per network call is
    per image over the 8 calls (2 steps x 4 cells) of a batch of one."""
    subprocess.run([sys.executable, str(BENCHMARKS / "launches.py"), "--steps", "2", "--out-dir", str(tmp_path),
                    "--name", "smoke"], check=True, capture_output=True, timeout=600)
    rows = {r["implementation"]: r for r in json.loads((tmp_path / "smoke.json").read_text())["rows"]}
    launches = {name: r["launches_per_image"] for name, r in rows.items()}
    torch_eager, torch_graphs = launches["engine, torch backend"], launches["engine, torch backend, CUDA graphs"]
    triton_eager, triton_graphs = launches["engine, triton backend"], launches["engine, triton backend, CUDA graphs"]
    assert triton_graphs < torch_graphs < triton_eager < torch_eager
    assert rows["engine, triton backend, CUDA graphs"]["ops_inside_graphs_per_image"] > triton_eager / 2
    for r in rows.values():
        assert r["launches_per_network_call"] * 8 == r["launches_per_image"]
    # The engine packs each eager call's cells from Python lists.
    assert rows["engine, triton backend"]["host_tensors_per_network_call"] > 0
    assert "| engine, torch backend |" in (tmp_path / "smoke.md").read_text()


def test_launch_counter_counts_ops_that_run_kernels():
    """A new result or a write into a tensor is a launch; a view, or an op that hands back its input
    unchanged (type_as or to, to the dtype it already has), is none."""
    from launches import LaunchCounter

    x, y, double = torch.randn(4, 3), torch.randn(4, 3), torch.zeros(1, dtype=torch.float64)
    counter = LaunchCounter()
    with counter:
        x.type_as(y), x.to(torch.float32), x.view(3, 4), x.t(), x[1:]  # nothing
        x + y, x.type_as(double), x.clone().copy_(y), x.clone().fill_(1.0)
    assert counter.launched == {"add": 1, "_to_copy": 1, "clone": 2, "copy_": 1, "fill_": 1}


# The last commit before the engine: the lockstep sampler that benchmarks/engine.py compares against.
LOCKSTEP_COMMIT = "9d58fcb"


def test_engine_benchmark_quick_run(tmp_path):
    """Smoke run of all three parts on a tiny model, part a against the lockstep sampler's sources
    taken from git: every figure present and positive, the CPU named, and the engine's images equal to
    ``pipe`` with each image's own generator (bit for bit on CPU fp32, as the README promises)."""
    repo = BENCHMARKS.parent
    if subprocess.run(["git", "-C", str(repo), "cat-file", "-e", f"{LOCKSTEP_COMMIT}^{{commit}}"],
                      capture_output=True).returncode:
        pytest.skip(f"needs the git history with commit {LOCKSTEP_COMMIT} (the lockstep sampler)")
    tree = tmp_path / "lockstep"
    tree.mkdir()
    archive = subprocess.run(["git", "-C", str(repo), "archive", LOCKSTEP_COMMIT, "src"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    subprocess.run([sys.executable, str(BENCHMARKS / "engine.py"), "--quick", "--lockstep-tree", str(tree),
                    "--out-dir", str(tmp_path), "--name", "quick"], check=True, capture_output=True, timeout=300,
                   env=subprocess_env(threads=None))
    report = json.loads((tmp_path / "quick.json").read_text())
    a = report["static_batch"]
    assert [r["batch"] for r in a["rows"]] == [1, 2]
    for r in a["rows"]:
        assert r["engine_median_seconds"] > 0 and r["lockstep_median_seconds"] > 0 and r["engine_speed_over_lockstep"] > 0
        assert len(r["round_ratios"]) == 2 and r["max_abs_latent_difference"] >= 0
    [b] = report["open_loop"]
    assert b["capacity_images_per_s"] > 0 and b["capacity"]["engine_images_per_s"] > 0
    assert [run["load"] for run in b["runs"]] == [0.5, 0.9]
    for run in b["runs"]:
        for policy in ("continuous", "static"):
            r = run[policy]
            assert len(r["latencies_s"]) == 6 * 2 and all(t > 0 for t in r["latencies_s"])  # 6 requests, 2 passes
            assert 0 < r["p50_latency_s"] <= r["p99_latency_s"] and r["throughput_images_per_s"] > 0
    [c] = report["mixed"]
    assert c["engine_images_per_s"] > 0 and c["static_images_per_s"] > 0
    assert c["max_abs_latent_difference"] == 0
    text = (tmp_path / "quick.md").read_text()
    assert text.startswith(f"# The engine against static batching and the lockstep sampler: {report['machine']['cpu']}")
    for heading in ("## a. One static batch", "## b. Open-loop Poisson arrivals", "## c. Mixed settings"):
        assert heading in text


def test_kernel_profile_sorts_kernel_names_into_categories():
    from kernel_profile import category

    assert category("void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_bf16_256x128_64x3_tn_align2>") == "matrix products"
    assert category("nvjet_sm90_tst_192x192_64x4_2x1_v_bz_coopB_bias_TNN") == "matrix products"
    assert category("mkldnn::_linear_pointwise") == "matrix products"  # fp32 linear layers on CPU
    assert category("_block_causal_attention_kernel") == "attention (Triton)"
    assert category("_ragged_attention_kernel") == "attention (Triton)"
    assert category("_rotate_into_cache_kernel") == "RoPE + cache write (Triton)"
    assert category("pytorch_flash::flash_fwd_kernel<...>") == "attention (PyTorch)"
    assert category("_rms_norm_modulate_kernel") == "norm + modulation (Triton)"
    assert category("void at::native::vectorized_elementwise_kernel<8, at::native::FillFunctor<float>>") == "other"


def test_kernel_profile_runs_on_cpu(tmp_path):
    """Smoke run on the demo preset: every operator's time lands in one category, and the categories
    of a PyTorch-backend generation (matrix products, SDPA) are there."""
    subprocess.run([sys.executable, str(BENCHMARKS / "kernel_profile.py"), "--preset", "xar-digits", "--batch", "2", "--steps", "2",
                    "--backend", "torch", "--device", "cpu", "--out-dir", str(tmp_path), "--name", "smoke"],
                   check=True, capture_output=True, timeout=600, env=subprocess_env())
    report = json.loads((tmp_path / "smoke.json").read_text())
    assert report["kernel_seconds"] > 0
    assert sum(report["by_category"].values()) == pytest.approx(report["kernel_seconds"])
    assert {"matrix products", "attention (PyTorch)"} <= report["by_category"].keys()
    # The linear layers run as oneDNN operators (backends.onednn_linear), not aten ones: they count too.
    assert report["kernels"]["mkldnn::_linear_pointwise"]["category"] == "matrix products"
    assert "| category | seconds | share |" in (tmp_path / "smoke.md").read_text()


@pytest.mark.triton
def test_attention_kernels_compile_for_hopper_with_vector_loads_only(tmp_path):
    """Compiled for sm_90 without a GPU (Triton's own LLVM and ptxas): the continuous-batching kernel in
    the launch configuration for many programs reads its tiles with 16-byte vector loads only (its
    only scalar reads are its segment's four table entries) and spills nothing."""
    subprocess.run([sys.executable, str(BENCHMARKS / "kernel_resources.py"), "--head-dims", "64", "--programs", "many",
                    "--out-dir", str(tmp_path), "--name", "smoke"], check=True, capture_output=True, timeout=600)
    rows = json.loads((tmp_path / "smoke.json").read_text())["rows"]
    [ragged] = [r for r in rows if r["kernel"] == "ragged attention"]
    assert ragged["vector_loads"] > 0 and ragged["scalar_loads"] == 4  # slot, cell, row start, the row's first cell
    assert ragged["spill_store_bytes"] == 0 and 0 < ragged["registers"] <= 255


def test_serve_benchmark_quick_run(tmp_path):
    """Smoke run of benchmarks/serve.py: two xar-serve processes (continuous and static), a burst for
    the capacity, then Poisson arrivals at 50% and 90% of it over HTTP; every figure present and sane.
    The servers run random weights of xar-digits' shapes, with options passed on (as a GPU run would)."""
    pytest.importorskip("fastapi", reason="xar-serve needs the serve extra: pip install 'xar_infer[serve]'")
    subprocess.run([sys.executable, str(BENCHMARKS / "serve.py"), "--quick", "--out-dir", str(tmp_path),
                    "--name", "quick", "--random-weights", "xar-digits", "--server-args", "--device cpu --backend torch"],
                   check=True, capture_output=True, timeout=300, env=subprocess_env())
    report = json.loads((tmp_path / "quick.json").read_text())
    assert set(report["capacity"]) == {"continuous", "static"}
    assert report["capacity_images_per_s"] == max(c["throughput_images_per_s"] for c in report["capacity"].values()) > 0
    assert [run["load"] for run in report["open_loop"]] == [0.5, 0.9]
    for run in report["open_loop"]:
        assert run["rate"] == pytest.approx(run["load"] * report["capacity_images_per_s"])
        for policy in ("continuous", "static"):
            r = run["policies"][policy]
            [single_pass] = r["passes"]
            assert len(single_pass["latencies_s"]) == 6  # every request answered
            assert all(0 < first < latency for first, latency in zip(single_pass["first_cell_s"], single_pass["latencies_s"]))
            assert 0 < r["p50_latency_s"] <= r["p95_latency_s"] <= r["p99_latency_s"]
            assert r["throughput_images_per_s"] > 0 and single_pass["rows_per_call"] >= 1
    text = (tmp_path / "quick.md").read_text()
    assert text.startswith(f"# xar-serve under load, continuous against static batching: {report['cpu']}")
    assert "| 90% |" in text and "throughput, continuous / static" in text
    assert "random weights in the shapes of xar-digits, xar-serve --device cpu --backend torch" in text
    assert Path(report["args"]["checkpoint"]).name == "model"  # the scratch folder of random weights


def test_quality_benchmark_runs_on_the_demo_model(tmp_path):
    """benchmarks/quality.py end to end: xar-digits, three images per setting, a random-weight Inception
    (offline), reference images from the digits data set."""
    try:  # the fid extra (CI runs this test in the environment that has it, see .ci/run)
        import torch_fidelity  # noqa: F401
    except (ImportError, RuntimeError) as exc:
        pytest.skip(f"torch-fidelity is not usable here ({type(exc).__name__})")
    from random_inception import save_random_inception
    from sklearn.datasets import load_digits

    import numpy as np

    from xar_infer.pipeline import XARPipeline, to_uint8
    from xar_infer.sample_sets import fid_labels

    sha256 = save_random_inception(tmp_path / "inception.pth")
    digits = (load_digits().images[:5] * 255 / 16).round().astype(np.uint8)
    np.savez(tmp_path / "reference.npz", arr_0=np.repeat(digits[..., None], 3, axis=3))
    subprocess.run([sys.executable, str(BENCHMARKS / "quality.py"), "--model", "xar-digits", "--ref",
                    str(tmp_path / "reference.npz"), "--num-images", "3", "--batch-size", "2", "--taper", "6,4,3,2",
                    "--device", "cpu", "--inception-weights", str(tmp_path / "inception.pth"), "--inception-sha256",
                    sha256, "--work-dir", str(tmp_path / "work"), "--out-dir", str(tmp_path), "--name", "smoke"],
                   check=True, capture_output=True, timeout=900, env=subprocess_env(threads=None))
    report = json.loads((tmp_path / "smoke.json").read_text())
    rows = report["rows"]
    assert [r["name"] for r in rows] == ["exact", "bf16", "taper", "guidance-interval"]
    assert rows[2]["num_inference_steps"] == [6, 4, 3, 2] and rows[3]["guidance_interval"] == [0.2, 0.8]
    for r in rows:
        assert r["num_images"] == 3 and r["seconds_per_image"] > 0 and np.isfinite(r["fid"]) and r["fid"] > 0
    assert rows[0]["speedup_vs_exact"] == 1 and rows[0]["fid_minus_exact"] == 0
    # The exact set is what the pipeline makes for the released labels and seeds 0, 1, 2 (grey as RGB).
    pipe = XARPipeline.from_pretrained("xar-digits")
    labels = fid_labels(3, 10).tolist()
    expected = to_uint8(pipe(labels, generator=[torch.Generator().manual_seed(i) for i in range(3)],
                             output_type="pt").images)
    with np.load(tmp_path / "work" / "exact.npz") as data:
        np.testing.assert_array_equal(data["arr_0"], np.repeat(expected, 3, axis=3))
    # The reference's statistics were computed once and cached beside it for the other three settings.
    assert len(list(tmp_path.glob("reference.fid-stats-*.npz"))) == 1
    table = (tmp_path / "smoke.md").read_text()
    assert "| taper (steps per cell 6,4,3,2) |" in table and "not FIDs comparable" in table


def test_queueing_policies_on_a_trace_worked_by_hand():
    """Two images 2 calls long, arriving at 0 and 0.5, calls of 1 s whatever their rows. Static: the
    first batch runs 0-2, the second (the image that came at 0.5) 2-4. Continuous: the second joins the
    call at 1, so the two finish at 2 and 3."""
    from queueing import CallCost, simulate_continuous, simulate_static

    fixed = CallCost(1.0, 0.0)
    assert simulate_static([0.0, 0.5], 2, fixed, max_images=4) == [2.0, 3.5]
    assert simulate_continuous([0.0, 0.5], 2, fixed, max_images=4) == [2.0, 2.5]
    # With room for one image, continuous batching is first come first served: 0-2, then 2-4.
    assert simulate_continuous([0.0, 0.5], 2, fixed, max_images=1) == [2.0, 3.5]
    # Calls of 1 s per row and no fixed part: together (static, or sharing every call) both finish at 4...
    linear = CallCost(0.0, 1.0)
    assert simulate_static([0.0, 0.0], 2, linear, max_images=2, rows_per_image=1) == [4.0, 4.0]
    assert simulate_continuous([0.0, 0.0], 2, linear, max_images=2, rows_per_image=1) == [4.0, 4.0]
    # ...and an image that arrives alone after an idle gap takes exactly its own calls.
    assert simulate_static([0.0, 10.0], 2, fixed, max_images=4) == [2.0, 2.0]
    assert simulate_continuous([0.0, 10.0], 2, fixed, max_images=4) == [2.0, 2.0]


@pytest.mark.parametrize("load", [0.5, 0.9])
def test_queueing_fixed_cost_ceiling_is_half_again(load):
    """With calls of a fixed cost and room to spare, static batching's mean latency is at most 1.5 batch
    times (half a batch waiting on average, then its own) and continuous batching's at least one: the
    ratio stays below 1.5, and with 40 calls per image it comes close."""
    from queueing import CallCost, poisson_arrivals, simulate_continuous, simulate_static

    calls, cost = 40, CallCost(1.0, 0.0)
    arrivals = poisson_arrivals(load * 64 / calls, 3000, seed=5)  # a load of 64-image batches; room for 1000
    static = simulate_static(arrivals, calls, cost, max_images=1000)
    continuous = simulate_continuous(arrivals, calls, cost, max_images=1000)
    assert min(continuous) >= calls and max(static) <= 2 * calls + 1e-9
    ratio = (sum(static) / len(static)) / (sum(continuous) / len(continuous))
    assert 1.3 < ratio < 1.5


def test_queueing_benchmark_quick_run(tmp_path):
    """The tool measures the tiny model's call cost here and writes both files, the CPU named."""
    subprocess.run([sys.executable, str(BENCHMARKS / "queueing.py"), "--quick", "--out-dir", str(tmp_path),
                    "--name", "quick"], check=True, capture_output=True, timeout=300, env=subprocess_env(threads=None))
    report = json.loads((tmp_path / "quick.json").read_text())
    measured, *modelled = report["models"]
    assert measured["measured"]["calls_per_image"] == 4  # one step in each of the 4 cells
    assert [p["images"] for p in measured["measured"]["points"]] == [1, 2]
    assert [m["fixed_share"] for m in modelled] == [1.0, 0.75, 0.5]
    for model in report["models"]:
        assert [row["load"] for row in model["simulated"]] == [0.5, 0.9]
        assert all(row["mean_ratio"] > 0 and row["p99_ratio"] > 0 for row in model["simulated"])
    assert (tmp_path / "quick.md").read_text().startswith(
        f"# The ceiling of continuous batching against static batching: {report['machine']['cpu']}")
