"""xar-generate and xar-convert, run in-process on tiny random checkpoints (and once as a subprocess)."""

from __future__ import annotations

import os
import time
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import random_transformer, released_state_dict, save_released
from cpu_threads import one_torch_thread, subprocess_env  # noqa: F401  (autouse: this module runs on one thread)
from xar_infer import cli
from xar_infer.cli import convert_main, generate_main
from xar_infer.config import XARConfig
from xar_infer.pipeline import XARPipeline

SRC_DIR = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture
def base(tiny_checkpoint, tiny_vae_checkpoint):
    """Arguments every generating test shares: the tiny model and VAE, 2 steps, CPU, quiet."""
    return ["--checkpoint", str(tiny_checkpoint), "--vae", str(tiny_vae_checkpoint),
            "--steps", "2", "--device", "cpu", "--quiet"]


@pytest.fixture
def no_loading(monkeypatch):
    """Make loading the model fail the test: the error must come before it."""
    def refuse(*args, **kwargs):
        pytest.fail("the model was loaded although the arguments were already known to be bad")
    monkeypatch.setattr(cli.XARPipeline, "from_pretrained", refuse)


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def assert_one_line_error(code: int, err: str, *fragments: str) -> str:
    lines = err.splitlines()
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("xar-generate: error: ") or lines[0].startswith("xar-convert: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


def run(capsys, main, argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --------------------------------------------------------------------------------------------------
# Successful runs
# --------------------------------------------------------------------------------------------------

def test_images_cycle_through_classes_with_names_and_grid(base, tmp_path, capsys):
    out, grid = tmp_path / "d", tmp_path / "g.png"
    code, stdout, err = run(capsys, generate_main, base + [
        "--class", "1", "--class", "goldfish", "--class", "5", "--num-images", "4", "--batch-size", "3",
        "--output", out, "--grid", grid])
    assert (code, stdout, err) == (0, "", "")

    names = ["00000_1_goldfish.png", "00001_1_goldfish.png", "00002_5_electric_ray.png", "00003_1_goldfish.png"]
    assert sorted(p.name for p in out.iterdir()) == names
    images = [pixels(out / name) for name in names]
    assert all(image.shape == (32, 32, 3) for image in images)

    sheet = pixels(grid)
    assert sheet.shape == (64, 64, 3)
    for k, image in enumerate(images):  # row-major, 2 columns
        row, col = divmod(k, 2)
        np.testing.assert_array_equal(sheet[32 * row:32 * row + 32, 32 * col:32 * col + 32], image)
    # Different seeds give different images, even for the same class.
    assert not np.array_equal(images[0], images[1])


def test_grid_leaves_missing_cells_black(base, tmp_path, capsys):
    grid = tmp_path / "g.png"
    code, _, err = run(capsys, generate_main, base + ["--class", "3", "--num-images", "3",
                                                      "--output", tmp_path / "d", "--grid", grid])
    assert code == 0, err
    sheet = pixels(grid)
    assert sheet.shape == (64, 64, 3)
    assert not sheet[32:, 32:].any()


def test_default_class_and_summary_line(base, tmp_path, capsys):
    argv = [a for a in base if a != "--quiet"] + ["--output", tmp_path / "d"]
    code, stdout, err = run(capsys, generate_main, argv)
    assert code == 0, err
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["00000_207_golden_retriever.png"]
    assert stdout.startswith("wrote 1 image(s) to ") and stdout.count("\n") == 1
    assert "2 steps, cfg 1, sde sampler" in stdout  # the tiny model matches no preset: fallback cfg 1


def test_each_image_depends_only_on_its_own_seed(base, tmp_path, capsys):
    three = base + ["--class", "5", "--seed", "10", "--num-images", "3"]
    assert run(capsys, generate_main, three + ["--batch-size", "3", "--output", tmp_path / "b3"])[0] == 0
    assert run(capsys, generate_main, three + ["--batch-size", "1", "--output", tmp_path / "b1"])[0] == 0
    assert run(capsys, generate_main, base + ["--class", "5", "--seed", "12", "--output", tmp_path / "s12"])[0] == 0

    np.testing.assert_array_equal(pixels(tmp_path / "b3" / "00002_5_electric_ray.png"),
                                  pixels(tmp_path / "s12" / "00000_5_electric_ray.png"))
    for name in sorted(p.name for p in (tmp_path / "b3").iterdir()):
        np.testing.assert_array_equal(pixels(tmp_path / "b3" / name), pixels(tmp_path / "b1" / name), err_msg=name)


def test_latents_only_matches_the_pipeline(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "lat"
    code, _, err = run(capsys, generate_main, [
        "--checkpoint", tiny_checkpoint, "--latents-only", "--class", "1", "--class", "tench", "--num-images", "3",
        "--seed", "4", "--steps", "2", "--cfg", "1.5", "--sampler", "euler", "--guidance-schedule", "constant",
        "--batch-size", "3", "--device", "cpu", "--quiet", "--output", out])
    assert code == 0, err
    assert [p.name for p in out.iterdir()] == ["latents.safetensors"]

    saved = load_file(out / "latents.safetensors")
    assert saved["latents"].shape == (3, 16, 16, 16)
    assert saved["labels"].tolist() == [1, 0, 1]
    with safe_open(out / "latents.safetensors", "pt") as f:
        assert float(f.metadata()["latent_scale"]) == pytest.approx(0.2325)

    pipe = XARPipeline.from_pretrained(tiny_checkpoint)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe([1, 0, 1], num_inference_steps=2, guidance_scale=1.5, sampler="euler", guidance_schedule="constant",
                    generator=[torch.Generator().manual_seed(4 + i) for i in range(3)], output_type="latent").images
    torch.testing.assert_close(saved["latents"], expected.float(), rtol=0, atol=0)


def test_model_without_imagenet_classes_gets_plain_names(tmp_path, tiny_vae_checkpoint, capsys):
    checkpoint = save_released(random_transformer(XARConfig(dim=32, encoder_depth=1, decoder_depth=1, num_heads=2,
                                                            mlp_hidden_dim=48, num_classes=10)), tmp_path / "ten.pth")
    argv = ["--checkpoint", checkpoint, "--vae", tiny_vae_checkpoint, "--steps", "2", "--device", "cpu", "--quiet",
            "--output", tmp_path / "d", "--class", "3", "--num-images", "2"]
    code, _, err = run(capsys, generate_main, argv)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["00000_3.png", "00001_3.png"]

    # The names planned after loading are protected like the others.
    code, _, err = run(capsys, generate_main, argv)
    assert_one_line_error(code, err, "00000_3.png", "--overwrite")

    code, _, err = run(capsys, generate_main, argv[:-4] + ["--output", tmp_path / "e", "--class", "goldfish"])
    assert_one_line_error(code, err, "only available for ImageNet-1k models")
    code, _, err = run(capsys, generate_main, argv[:-4] + ["--output", tmp_path / "e", "--class", "10"])
    assert_one_line_error(code, err, "out of range", "0 to 9")


# --------------------------------------------------------------------------------------------------
# Overwriting
# --------------------------------------------------------------------------------------------------

def test_existing_image_is_kept_without_overwrite(base, tmp_path, capsys, monkeypatch):
    out = tmp_path / "d"
    out.mkdir()
    existing = out / "00001_1_goldfish.png"
    existing.write_bytes(b"precious")
    argv = base + ["--class", "goldfish", "--num-images", "2", "--output", out]

    with monkeypatch.context() as m:
        m.setattr(cli.XARPipeline, "from_pretrained", lambda *a, **k: pytest.fail("model loaded"))
        code, _, err = run(capsys, generate_main, argv)
    assert_one_line_error(code, err, str(existing), "--overwrite")
    assert existing.read_bytes() == b"precious"
    assert sorted(p.name for p in out.iterdir()) == ["00001_1_goldfish.png"]  # nothing else written

    code, _, err = run(capsys, generate_main, argv + ["--overwrite"])
    assert code == 0, err
    assert pixels(existing).shape == (32, 32, 3)


@pytest.mark.parametrize("which", ["grid", "latents"])
def test_existing_grid_or_latents_file_is_kept(base, tmp_path, capsys, no_loading, which):
    out = tmp_path / "d"
    out.mkdir()
    if which == "grid":
        target = tmp_path / "g.png"
        extra = ["--grid", target]
    else:
        target = out / "latents.safetensors"
        extra = ["--latents-only"]
    target.write_bytes(b"precious")
    code, _, err = run(capsys, generate_main, base + ["--output", out] + extra)
    assert_one_line_error(code, err, str(target), "--overwrite")
    assert target.read_bytes() == b"precious"


def test_a_directory_in_the_way_is_never_replaced(base, tmp_path, capsys, no_loading):
    (tmp_path / "d" / "00000_207_golden_retriever.png").mkdir(parents=True)
    code, _, err = run(capsys, generate_main, base + ["--output", tmp_path / "d", "--overwrite"])
    assert_one_line_error(code, err, "is a directory")


# --------------------------------------------------------------------------------------------------
# Errors: one line on stderr, exit status 2, nothing written
# --------------------------------------------------------------------------------------------------

EARLY_ERRORS = {
    "unknown class name": (["--class", "not a real animal"], ["unknown ImageNet class name", "not a real animal"]),
    "ambiguous class name": (["--class", "crane"], ["ambiguous", "134", "517"]),
    "negative class id": (["--class", "-1"], ["negative"]),
    "class id beyond int64": (["--class", "9" * 23], ["class id 99999999999999999999999 is beyond the range"]),
    "class id beyond int()": (["--class", "9" * 5000], ["class id 99999999999999999999... is beyond the range"]),
    "zero steps": (["--steps", "0"], ["--steps", "positive"]),
    "negative steps": (["--steps", "-3"], ["--steps", "-3"]),
    "zero steps in a cell": (["--steps", "3,0,2,1"], ["--steps", "positive"]),
    "cfg below 1": (["--cfg", "0.5"], ["--cfg", "0.5"]),
    "cfg nan": (["--cfg", "nan"], ["--cfg", "nan"]),
    "cfg inf": (["--cfg", "inf"], ["--cfg", "finite"]),
    "zero images": (["--num-images", "0"], ["--num-images"]),
    "zero batch size": (["--batch-size", "0"], ["--batch-size"]),
    "negative seed": (["--seed", "-1"], ["--seed"]),
    "grid not png": (["--grid", "grid.jpg"], ["--grid", ".png"]),
    "zero upscale": (["--upscale", "0"], ["--upscale"]),
    "missing vae": (["--vae", "nowhere/kl16.ckpt"], ["VAE checkpoint not found", "nowhere/kl16.ckpt"]),
    "unknown device": (["--device", "nonsense"], ["--device", "nonsense"]),
    "absent cuda device": (["--device", "cuda:99"], ["--device", "cuda:99"]),
    "meta device": (["--device", "meta"], ["--device", "meta"]),
    "cuda graphs on cpu": (["--cuda-graphs"], ["--cuda-graphs needs a CUDA device", "--device cpu"]),
    "hub option with checkpoint": (["--revision", "main"], ["--revision", "--checkpoint"]),
}


@pytest.mark.parametrize("extra, fragments", EARLY_ERRORS.values(), ids=EARLY_ERRORS.keys())
def test_bad_arguments_fail_before_loading(base, tmp_path, capsys, no_loading, extra, fragments):
    out = tmp_path / "out"
    code, stdout, err = run(capsys, generate_main, base + ["--output", out] + extra)
    assert_one_line_error(code, err, *fragments)
    assert stdout == ""
    assert not out.exists()


def test_missing_vae_explains_where_to_get_it(tmp_path, capsys, no_loading):
    # a preset: known to need a VAE before anything is loaded
    code, _, err = run(capsys, generate_main, ["--model", "xar-b", "--output", tmp_path / "out"])
    assert_one_line_error(code, err, "--vae", "kl16.ckpt", "MAR", "jadechoghari/mar", "--latents-only")
    assert not (tmp_path / "out").exists()


def test_missing_vae_for_a_checkpoint_fails_before_generating(tiny_checkpoint, tmp_path, capsys):
    # a checkpoint: known only once read, still before anything is generated or written
    code, _, err = run(capsys, generate_main, ["--checkpoint", tiny_checkpoint, "--output", tmp_path / "out"])
    assert_one_line_error(code, err, "--vae", "kl16.ckpt", "--latents-only")
    assert not list((tmp_path / "out").glob("*.png"))


def test_pixel_models_take_no_vae(tiny_vae_checkpoint, tmp_path, capsys, no_loading):
    code, _, err = run(capsys, generate_main, ["--model", "xar-digits", "--vae", tiny_vae_checkpoint,
                                               "--output", tmp_path / "out"])
    assert_one_line_error(code, err, "generates pixels directly", "--vae")


def test_digits_demo_upscaled_with_grid(tmp_path, capsys):
    code, _, err = run(capsys, generate_main, ["--model", "xar-digits", "--class", "7", "--class", "3",
                                               "--num-images", "3", "--steps", "3", "--upscale", "4",
                                               "--output", tmp_path / "out", "--grid", tmp_path / "grid.png",
                                               "--device", "cpu", "--quiet"])
    assert code == 0, err
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["00000_7.png", "00001_3.png", "00002_7.png"]
    image = Image.open(tmp_path / "out" / names[0])
    assert image.size == (32, 32) and image.mode == "L"
    assert Image.open(tmp_path / "grid.png").size == (64, 64)


def test_grid_with_latents_only_is_refused(tiny_checkpoint, tmp_path, capsys, no_loading):
    code, _, err = run(capsys, generate_main, ["--checkpoint", tiny_checkpoint, "--latents-only", "--grid", "g.png"])
    assert_one_line_error(code, err, "--grid", "--latents-only")


def test_missing_checkpoint(tiny_vae_checkpoint, tmp_path, capsys, no_loading):
    missing = tmp_path / "missing.pth"
    code, _, err = run(capsys, generate_main, ["--checkpoint", missing, "--vae", tiny_vae_checkpoint])
    assert_one_line_error(code, err, "checkpoint not found", str(missing))


def test_class_id_out_of_range(base, tmp_path, capsys):
    code, _, err = run(capsys, generate_main, base + ["--class", "1000", "--output", tmp_path / "out"])
    assert_one_line_error(code, err, "1000", "out of range", "0 to 999")
    assert not any((tmp_path / "out").glob("*.png"))


def test_corrupted_checkpoint(tiny_vae_checkpoint, tmp_path, capsys):
    corrupted = tmp_path / "corrupted.pth"
    corrupted.write_bytes(np.random.default_rng(0).bytes(4096))
    code, _, err = run(capsys, generate_main, ["--checkpoint", corrupted, "--vae", tiny_vae_checkpoint,
                                               "--device", "cpu", "--output", tmp_path / "out"])
    assert_one_line_error(code, err, str(corrupted))


def test_checkpoint_with_a_wrongly_shaped_tensor(tiny_model, tiny_vae_checkpoint, tmp_path, capsys):
    state = released_state_dict(tiny_model)
    state["decoder_blocks.0.attn.proj.weight"] = torch.zeros(32, 31)
    path = tmp_path / "bad_shape.pth"
    torch.save(state, path)
    code, _, err = run(capsys, generate_main, ["--checkpoint", path, "--vae", tiny_vae_checkpoint,
                                               "--device", "cpu", "--output", tmp_path / "out"])
    assert_one_line_error(code, err, "decoder_blocks.0.attn.proj.weight", "(32, 31)")


def test_wrong_vae_file_is_named(tiny_checkpoint, tmp_path, capsys, no_loading):
    # The VAE is read before the transformer, so a bad one fails before the model is loaded.
    code, _, err = run(capsys, generate_main, ["--checkpoint", tiny_checkpoint, "--vae", tiny_checkpoint,
                                               "--device", "cpu", "--output", tmp_path / "out"])
    assert_one_line_error(code, err, f"{tiny_checkpoint}: not a KL VAE decoder checkpoint")


def test_library_warnings_are_one_line(tiny_model, base, tmp_path, capsys):
    state = released_state_dict(tiny_model)
    state["encoder_blocks.0.attn.rope.freqs_cos"] = state["encoder_blocks.0.attn.rope.freqs_cos"] + 1e-4
    torch.save(state, tmp_path / "odd_rope.pth")
    argv = base + ["--output", tmp_path / "out"]
    argv[argv.index("--checkpoint") + 1] = str(tmp_path / "odd_rope.pth")
    code, _, err = run(capsys, generate_main, argv)
    assert code == 0, err
    assert len(err.splitlines()) == 1 and err.startswith("xar-generate: warning: ") and "RoPE" in err, err


def test_output_under_a_regular_file_is_not_writable(base, tmp_path, capsys, no_loading):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    code, _, err = run(capsys, generate_main, base + ["--output", blocker / "sub"])
    assert_one_line_error(code, err, "cannot write to output directory", str(blocker / "sub"))

    code, _, err = run(capsys, generate_main, base + ["--output", blocker])
    assert_one_line_error(code, err, str(blocker), "not a directory")

    code, _, err = run(capsys, generate_main, base + ["--output", tmp_path / "d", "--grid", blocker / "g.png"])
    assert_one_line_error(code, err, str(blocker), "not a directory")


def test_unknown_preset(tmp_path, capsys, no_loading):
    code, _, err = run(capsys, generate_main, ["--model", "xar-xxl", "--latents-only", "--output", tmp_path / "out"])
    assert_one_line_error(code, err, "xar-xxl", "xar-b", "--checkpoint")


def test_preset_not_in_an_empty_offline_cache(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    code, _, err = run(capsys, generate_main, ["--model", "xar-b", "--local-files-only", "--cache-dir", cache,
                                               "--latents-only", "--device", "cpu", "--output", tmp_path / "out"])
    assert_one_line_error(code, err, "xAR-B.pth", "--checkpoint")


@pytest.mark.parametrize("argv", [
    ["--model", "xar-b", "--checkpoint", "x.pth"],
    ["--steps", "two"],
    ["--steps", "3,x"],
    ["--guidance-interval", "0.5"],
    ["--guidance-interval", "0.8,0.2"],
    ["--sampler", "ddim"],
    ["--dtype", "fp8"],
])
def test_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        generate_main(argv)
    assert exc.value.code == 2
    assert "xar-generate: error:" in capsys.readouterr().err


def test_console_script_prints_no_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(SRC_DIR)}
    script = "import sys; from xar_infer.cli import generate_main; sys.exit(generate_main())"
    done = subprocess.run([sys.executable, "-c", script, "--checkpoint", str(tmp_path / "missing.pth"),
                           "--latents-only", "--output", str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert done.returncode == 2
    assert done.stdout == ""
    assert "Traceback" not in done.stderr
    assert done.stderr.splitlines() == [f"xar-generate: error: checkpoint not found: {tmp_path / 'missing.pth'}"]


# --------------------------------------------------------------------------------------------------
# xar-convert
# --------------------------------------------------------------------------------------------------

def test_convert_then_generate_from_the_directory(tiny_checkpoint, tmp_path, capsys):
    converted = tmp_path / "converted"
    code, stdout, err = run(capsys, convert_main, [tiny_checkpoint, converted])
    assert code == 0, err
    assert sorted(p.name for p in converted.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert str(converted) in stdout

    latents = {}
    for name, source in (("pth", tiny_checkpoint), ("dir", converted)):
        code, _, err = run(capsys, generate_main, ["--checkpoint", source, "--latents-only", "--steps", "2",
                                                   "--class", "7", "--num-images", "2", "--device", "cpu",
                                                   "--quiet", "--output", tmp_path / name])
        assert code == 0, err
        latents[name] = load_file(tmp_path / name / "latents.safetensors")["latents"]
    torch.testing.assert_close(latents["dir"], latents["pth"], rtol=0, atol=0)


def test_convert_refuses_to_overwrite_a_different_save(tiny_checkpoint, tmp_path, capsys):
    """The same conversion again keeps the identical files; another model's is refused without --overwrite,
    before any file is replaced."""
    converted = tmp_path / "converted"
    assert run(capsys, convert_main, [tiny_checkpoint, converted])[0] == 0
    before = {p.name: p.read_bytes() for p in converted.iterdir()}
    assert run(capsys, convert_main, [tiny_checkpoint, converted])[0] == 0
    assert {p.name: p.read_bytes() for p in converted.iterdir()} == before

    other = save_released(random_transformer(seed=5), tmp_path / "other.pth")
    code, stdout, err = run(capsys, convert_main, [other, converted])
    assert_one_line_error(code, err, "xar-convert: error:", "already exists and differs", "--overwrite")
    assert stdout == ""
    assert {p.name: p.read_bytes() for p in converted.iterdir()} == before

    code, _, err = run(capsys, convert_main, [other, converted, "--overwrite"])
    assert code == 0, err
    assert (converted / "model.safetensors").read_bytes() != before["model.safetensors"]


def test_convert_writes_the_vae_and_the_bf16_variant(tiny_checkpoint, tiny_vae_checkpoint, tmp_path, capsys):
    """--vae and --variant reach save_pretrained's writer: the folder loads back with its VAE, in bf16 files."""
    converted = tmp_path / "converted"
    code, _, err = run(capsys, convert_main, [tiny_checkpoint, converted, "--vae", tiny_vae_checkpoint,
                                              "--variant", "bf16"])
    assert code == 0, err
    assert sorted(str(p.relative_to(converted)) for p in converted.rglob("*") if p.is_file()) == [
        "README.md", "config.json", "model.bf16.safetensors", "vae/model.bf16.safetensors"]
    for name in ("model.bf16.safetensors", "vae/model.bf16.safetensors"):
        with safe_open(converted / name, "pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    pipe = XARPipeline.from_pretrained(converted, variant="bf16")
    assert pipe.vae is not None and pipe.dtype == torch.float32

    code, _, err = run(capsys, convert_main, [tiny_checkpoint, tmp_path / "x", "--vae", tmp_path / "no.ckpt"])
    assert_one_line_error(code, err, "xar-convert: error: VAE not found")


def test_convert_errors(tmp_path, capsys):
    code, _, err = run(capsys, convert_main, [tmp_path / "missing.pth", tmp_path / "out"])
    assert_one_line_error(code, err, "xar-convert: error: checkpoint not found")
    assert not (tmp_path / "out").exists()

    corrupted = tmp_path / "corrupted.pth"
    corrupted.write_bytes(b"\x00" * 100)
    code, _, err = run(capsys, convert_main, [corrupted, tmp_path / "out"])
    assert_one_line_error(code, err, str(corrupted))

    with pytest.raises(SystemExit) as exc:
        convert_main([])
    assert exc.value.code == 2


def test_fast_settings_reach_the_pipeline(tiny_checkpoint, tmp_path, capsys):
    """--steps with one count per cell and --guidance-interval give what the pipeline gives."""
    out = tmp_path / "lat"
    code, _, err = run(capsys, generate_main, [
        "--checkpoint", tiny_checkpoint, "--latents-only", "--class", "3", "--steps", "3,2,2,1", "--cfg", "2.5",
        "--guidance-interval", "0.2,0.8", "--device", "cpu", "--quiet", "--output", out])
    assert code == 0, err
    pipe = XARPipeline.from_pretrained(tiny_checkpoint)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe([3], num_inference_steps=[3, 2, 2, 1], guidance_scale=2.5, guidance_interval=(0.2, 0.8),
                    generator=[torch.Generator().manual_seed(0)], output_type="latent").images
    assert torch.equal(load_file(out / "latents.safetensors")["latents"], expected)


def test_vae_tiling_option(base, tmp_path, capsys):
    code, _, err = run(capsys, generate_main, base + ["--output", tmp_path / "t", "--vae-tiling", "4,1"])
    assert code == 0, err
    assert len(list((tmp_path / "t").glob("*.png"))) == 1
    with pytest.raises(SystemExit) as exc:
        generate_main(base + ["--output", str(tmp_path / "u"), "--vae-tiling", "0"])
    assert exc.value.code == 2 and "--vae-tiling" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# Files: never replaced without --overwrite (when written, not only at start), never through a
# symlink, never half-written; modes from the umask
# --------------------------------------------------------------------------------------------------

def sha256s(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (symlinks as their targets' names) with its digest."""
    import hashlib

    return {str(p.relative_to(folder)): (f"-> {os.readlink(p)}" if p.is_symlink()
                                         else hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.rglob("*")) if p.is_file() or p.is_symlink()}


def test_a_file_that_appears_while_generating_is_not_replaced(base, tmp_path, capsys, monkeypatch):
    """The start-up checks pass; another program writes an image while ours is generated; the write
    refuses to replace it (a link, not a rename), and says so."""
    out = tmp_path / "d"
    intruder = out / "00001_3_tiger_shark.png"
    real_call = cli.XARPipeline.__call__

    def generate_while_another_run_writes(*args, **kwargs):
        intruder.write_bytes(b"another run's image")
        return real_call(*args, **kwargs)

    monkeypatch.setattr(cli.XARPipeline, "__call__", generate_while_another_run_writes)
    code, _, err = run(capsys, generate_main, base + ["--class", "3", "--num-images", "3", "--output", out])
    assert_one_line_error(code, err, str(intruder), "already exists", "--overwrite")
    assert intruder.read_bytes() == b"another run's image"
    assert sorted(p.name for p in out.iterdir()) == ["00000_3_tiger_shark.png", "00001_3_tiger_shark.png"]
    assert pixels(out / "00000_3_tiger_shark.png").shape == (32, 32, 3)  # written whole before the refusal


def test_a_symlink_at_an_output_name_is_never_followed(base, tmp_path, capsys):
    out, elsewhere = tmp_path / "d", tmp_path / "elsewhere.png"
    out.mkdir()
    elsewhere.write_bytes(b"precious")
    link = out / "00000_3_tiger_shark.png"
    link.symlink_to(elsewhere)
    dangling = tmp_path / "g.png"
    dangling.symlink_to(tmp_path / "nowhere" / "g.png")
    before = sha256s(tmp_path)
    for extra in ([], ["--grid", dangling]):
        code, _, err = run(capsys, generate_main, base + ["--class", "3", "--output", out] + extra)
        assert_one_line_error(code, err, "already exists", "--overwrite")
        assert sha256s(tmp_path) == before

    code, _, err = run(capsys, generate_main, base + ["--class", "3", "--output", out, "--overwrite"])
    assert code == 0, err
    assert not link.is_symlink() and pixels(link).shape == (32, 32, 3)
    assert elsewhere.read_bytes() == b"precious"


def test_grid_may_not_name_one_of_the_runs_images(base, tmp_path, capsys, no_loading):
    out = tmp_path / "d"
    out.mkdir()
    (tmp_path / "alias").symlink_to(out)
    for grid in (out / "00000_7_cock.png", tmp_path / "alias" / "00001_7_cock.png"):
        code, _, err = run(capsys, generate_main, base + ["--class", "7", "--num-images", "2", "--output", out,
                                                          "--grid", grid])
        assert_one_line_error(code, err, f"--grid {grid} names one of this run's images")
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("option", ["--grid", "--npz"])
def test_an_output_file_in_a_missing_folder_is_refused_and_no_folder_made(base, tmp_path, capsys, no_loading, option):
    target = tmp_path / "no" / "such" / ("g.png" if option == "--grid" else "s.npz")
    extra = [option, target] + ([] if option == "--grid" else ["--num-images", "2"])
    before = sha256s(tmp_path)
    code, _, err = run(capsys, generate_main, base + extra)
    assert_one_line_error(code, err, option, str(tmp_path / "no" / "such"), "does not exist")
    assert sha256s(tmp_path) == before and not (tmp_path / "no").exists()


def test_modes_follow_the_umask(base, tiny_checkpoint, tmp_path, capsys):
    previous = os.umask(0o027)
    try:
        assert run(capsys, generate_main, base + ["--output", tmp_path / "d", "--grid", tmp_path / "g.png"])[0] == 0
        assert run(capsys, generate_main, ["--checkpoint", tiny_checkpoint, "--latents-only", "--steps", "1",
                                           "--device", "cpu", "--quiet", "--output", tmp_path / "lat"])[0] == 0
        assert run(capsys, convert_main, [tiny_checkpoint, tmp_path / "conv"])[0] == 0
    finally:
        os.umask(previous)
    written = [*(tmp_path / "d").iterdir(), tmp_path / "g.png", tmp_path / "lat" / "latents.safetensors",
               *[tmp_path / "conv" / name for name in ("model.safetensors", "config.json", "README.md")]]
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in written} == {p.name: "0o640" for p in written}


WITH_FILE_SIZE_LIMIT = """
import resource, sys
from xar_infer.cli import generate_main
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), resource.RLIM_INFINITY))
sys.exit(generate_main(sys.argv[2:]))
"""


def test_a_file_size_limit_leaves_no_truncated_image_behind(base, tmp_path):
    """EFBIG at a real limit (ulimit -f): the error names the file and the cause, nothing is left under
    the image's name, and the rerun without the limit writes it (no 'already exists')."""
    out = tmp_path / "d"
    argv = [str(a) for a in base + ["--class", "3", "--output", out]]
    limited = subprocess.run([sys.executable, "-c", WITH_FILE_SIZE_LIMIT, "200", *argv], env=subprocess_env(),
                             capture_output=True, text=True)
    assert limited.returncode == 2
    assert limited.stderr.splitlines() == [
        f"xar-generate: error: file too large (a file-size limit, see ulimit -f, or the file system's) writing "
        f"{out / '00000_3_tiger_shark.png'}"]
    assert os.listdir(out) == []
    assert subprocess.run([sys.executable, "-c", WITH_FILE_SIZE_LIMIT, "-1", *argv], env=subprocess_env()).returncode == 0
    assert pixels(out / "00000_3_tiger_shark.png").shape == (32, 32, 3)


# --------------------------------------------------------------------------------------------------
# Requests too large for memory are refused with their estimate, before anything is allocated
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, fragments", [
    (["--num-images", "1000000000"], ["planning --num-images 1000000000 needs about 400.0 GB", "available"]),
    (["--upscale", "100000"], ["--num-images 1 with --upscale 100000 needs about 640.0 GB"]),
    (["--num-images", "4000", "--upscale", "300", "--grid", "GRID"], ["--grid needs about 46.1 GB", "fewer or smaller"]),
    (["--batch-size", "100000", "--num-images", "100000"], ["--batch-size 100000 needs about 78.7 GB",
                                                           "smaller --batch-size"]),
])
def test_requests_that_cannot_fit_in_memory_are_refused(tmp_path, capsys, extra, fragments):
    extra = [str(tmp_path / "g.png") if a == "GRID" else a for a in extra]
    started = time.perf_counter()
    code, _, err = run(capsys, generate_main, ["--model", "xar-digits", "--steps", "1", "--device", "cpu",
                                               "--output", tmp_path / "out", *extra])
    assert_one_line_error(code, err, *fragments)
    assert time.perf_counter() - started < 120  # refused, not attempted (an attempt takes hours or the OOM killer)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_latents_that_cannot_fit_in_memory_are_refused(tiny_checkpoint, tmp_path, capsys):
    code, _, err = run(capsys, generate_main, ["--checkpoint", tiny_checkpoint, "--latents-only", "--steps", "1",
                                               "--num-images", "2000000", "--device", "cpu", "--output", tmp_path / "o"])
    assert_one_line_error(code, err, "keeping the latents of --num-images 2000000 needs about 65.5 GB")
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").iterdir())


# --------------------------------------------------------------------------------------------------
# Messages and defaults
# --------------------------------------------------------------------------------------------------

def test_a_steps_list_of_the_wrong_length_names_steps(tmp_path, capsys, no_loading):
    code, _, err = run(capsys, generate_main, ["--model", "xar-digits", "--steps", "10,8", "--output", tmp_path / "o"])
    assert_one_line_error(code, err, "--steps must be a positive integer or a list of 4 of them (one per cell): 10,8 gives 2 counts")
    assert "num_inference_steps" not in err


def test_help_says_which_model_is_bundled(capsys):
    with pytest.raises(SystemExit):
        generate_main(["--help"])
    assert "xar-digits (bundled with the package: runs offline)" in " ".join(capsys.readouterr().out.split())


def test_the_default_class_fits_the_model(tmp_path, capsys):
    code, _, err = run(capsys, generate_main, ["--model", "xar-digits", "--steps", "1", "--device", "cpu", "--quiet",
                                               "--output", tmp_path / "o"])
    assert code == 0, err
    assert os.listdir(tmp_path / "o") == ["00000_0.png"]


def test_a_bug_keeps_its_traceback(base, tmp_path, monkeypatch):
    """Only our own error types and OS errors become one-line exits; anything else is a bug."""
    def broken(*args, **kwargs):
        raise KeyError("a bug, not a user's mistake")

    monkeypatch.setattr(cli, "run_batches", broken)
    with pytest.raises(KeyError, match="a bug"):
        generate_main([str(a) for a in base + ["--output", tmp_path / "d"]])
