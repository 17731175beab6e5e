"""Hostile and broken files: every kind the loaders read, emptied, cut short or replaced by garbage, and
configs or keys that ask for far more than the file holds. Each must fail fast with one line of our
error type naming the file, in the API and in the CLI (exit status 2, one stderr line, no traceback),
without allocating more than the file holds."""

from __future__ import annotations

import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import random_transformer, released_state_dict
from cpu_threads import one_torch_thread  # noqa: F401  (autouse: this module runs on one thread)
from xar_infer import CheckpointError, InvalidArgumentError, XARConfig, convert_checkpoint, load_vae
from xar_infer.cli import convert_main, generate_main
from xar_infer.config import check_config_matches, infer_config
from xar_infer.sample_sets import read_labels_file
from xar_infer.hub import save_model_folder
from xar_infer.loading import load_local
from xar_infer.vae import AutoencoderKLDecoder, VAEConfig, infer_vae_config

SRC = Path(__file__).resolve().parents[1] / "src"


# ---- every kind of file x {empty, 5 bytes, cut in the middle, garbage} ----

def _corrupt(data: bytes, how: str) -> bytes:
    if how == "empty":
        return b""
    if how == "5 bytes":
        return data[:5]
    if how == "truncated":
        return data[:len(data) // 2]
    return bytes(random.Random(0).randrange(256) for _ in range(max(len(data), 64)))  # garbage


def _tiny_dir(tmp_path: Path, tiny_checkpoint: Path) -> Path:
    return convert_checkpoint(tiny_checkpoint, tmp_path / "model")


def _make(kind: str, tmp_path: Path, tiny_checkpoint: Path, tiny_vae_checkpoint: Path) -> tuple[Path, Path]:
    """(the file to break, what the user passes: that file or its directory)."""
    if kind == "pth":
        return tiny_checkpoint, tiny_checkpoint
    if kind == "safetensors":
        path = tmp_path / "weights.safetensors"
        path.write_bytes((_tiny_dir(tmp_path, tiny_checkpoint) / "model.safetensors").read_bytes())
        return path, path
    if kind == "config.json":
        directory = _tiny_dir(tmp_path, tiny_checkpoint)
        return directory / "config.json", directory
    if kind == "model dir":
        directory = _tiny_dir(tmp_path, tiny_checkpoint)
        return directory / "model.safetensors", directory
    if kind == "vae ckpt":
        return tiny_vae_checkpoint, tiny_vae_checkpoint
    if kind == "labels npy":
        path = tmp_path / "labels.npy"
        np.save(path, np.array([3, 1, 4, 1, 5, 9, 2, 6]))
        return path, path
    path = tmp_path / "labels.txt"
    path.write_text("3 1 4 1 5 9 2 6\n")
    return path, path


KINDS = ["pth", "safetensors", "config.json", "model dir", "vae ckpt", "labels npy", "labels txt"]
CORRUPTIONS = ["empty", "5 bytes", "truncated", "garbage"]
CASES = [(k, c) for k in KINDS for c in CORRUPTIONS
         # Any prefix of a text list of ids is a shorter valid list: nothing to detect there.
         if not (k == "labels txt" and c in ("5 bytes", "truncated"))]


def _load(kind: str, target: Path):
    if kind == "vae ckpt":
        return load_vae(target)
    if kind.startswith("labels"):
        return read_labels_file(target, 10)
    return load_local(target)


def _cli(kind: str, target: Path, tmp_path: Path, tiny_checkpoint: Path) -> list[list[str]]:
    """The command lines (of generate_main, and of convert_main where it reads this kind) that read ``target``."""
    out = str(tmp_path / "out")
    if kind == "vae ckpt":
        return [["--checkpoint", str(tiny_checkpoint), "--vae", str(target), "--output", out, "--steps", "1"]]
    if kind.startswith("labels"):
        return [["--model", "xar-digits", "--npz", str(tmp_path / "s.npz"), "--labels-file", str(target), "--steps", "1"]]
    runs = [["--checkpoint", str(target), "--latents-only", "--output", out, "--steps", "1"]]
    if kind == "pth":
        runs.append(["convert", str(target), str(tmp_path / "converted")])
    return runs


@pytest.mark.parametrize("kind, how", CASES)
def test_broken_file_is_one_line_naming_it(kind, how, tmp_path, tiny_checkpoint, tiny_vae_checkpoint, capsys):
    broken, target = _make(kind, tmp_path, tiny_checkpoint, tiny_vae_checkpoint)
    broken.write_bytes(_corrupt(broken.read_bytes(), how))
    expected = InvalidArgumentError if kind.startswith("labels") else CheckpointError

    with pytest.raises(expected) as info:
        _load(kind, target)
    message = str(info.value)
    assert "\n" not in message and str(broken) in message, message
    assert "weights_only=False" not in message and "allow_pickle" not in message, message

    for argv in _cli(kind, target, tmp_path, tiny_checkpoint):
        main, prog = (convert_main, "xar-convert") if argv[0] == "convert" else (generate_main, "xar-generate")
        code = main(argv[1:] if argv[0] == "convert" else argv)
        err = capsys.readouterr().err
        assert code == 2, err
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert err.startswith(f"{prog}: error: ") and str(broken) in err, err


def test_a_labels_npy_promising_more_than_it_holds_is_refused_unread(tmp_path):
    """The header says 10^12 int64 ids (8 TB); the file holds 80 bytes of them."""
    header = b"{'descr': '<i8', 'fortran_order': False, 'shape': (1000000000000,), }"
    header += b" " * (118 - len(header)) + b"\n"
    path = tmp_path / "labels.npy"
    path.write_bytes(b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + bytes(80))
    with pytest.raises(InvalidArgumentError, match=f"{path}: expected integer class ids, or the file is truncated"):
        read_labels_file(path, 10)


# ---- configs and keys that ask for more than the file holds ----

def _child_run(argv: list[str], address_space: int) -> tuple[int, str, float]:
    """xar-generate in a child whose address space is capped: (status, stderr, seconds)."""
    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))

    code = "import sys; from xar_infer.cli import generate_main; sys.exit(generate_main(sys.argv[1:]))"
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    start = time.perf_counter()
    with subprocess.Popen([sys.executable, "-c", code, *argv], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                          env=env, preexec_fn=cap) as child:
        try:
            err = child.communicate(timeout=240)[1].decode()
        except subprocess.TimeoutExpired:
            child.kill()
            err = child.communicate()[1].decode()
    return child.returncode, err, time.perf_counter() - start


# Before the checks these grew memory until killed (depth 10^9: over 5 GiB and still growing after
# 300 s; one stray key: MemoryError after 7.6 GiB). The tiny model loads and generates within 1.5 GiB
# of address space here: 4 GiB leaves room to spare and none to build a billion modules. Over the cap,
# the child would end in a MemoryError traceback, not in our one line.
ADDRESS_SPACE = 4 << 30


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_AS caps the address space the way this test needs on Linux")
def test_a_huge_depth_in_config_json_fails_fast_in_bounded_memory(tmp_path, tiny_checkpoint):
    directory = _tiny_dir(tmp_path, tiny_checkpoint)
    data = json.loads((directory / "config.json").read_text())
    data["xar_config"]["encoder_depth"] = 10**9
    (directory / "config.json").write_text(json.dumps(data))
    code, err, seconds = _child_run(["--checkpoint", str(directory), "--latents-only", "--output",
                                        str(tmp_path / "out")], ADDRESS_SPACE)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "encoder_depth=1000000000" in err and "1 encoder block(s)" in err and str(directory) in err, err
    assert seconds < 120, seconds  # the child starts torch in ~5 s; building the modules took far longer


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_AS caps the address space the way this test needs on Linux")
def test_a_huge_block_index_fails_fast_in_bounded_memory(tmp_path, tiny_model):
    path = tmp_path / "extra.pth"
    torch.save({**released_state_dict(tiny_model), "encoder_blocks.100000000.norm1.weight": torch.zeros(32)}, path)
    code, err, seconds = _child_run(["--checkpoint", str(path), "--latents-only", "--output",
                                        str(tmp_path / "out")], ADDRESS_SPACE)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "unexpected tensors encoder_blocks.100000000.norm1.weight" in err and str(path) in err, err
    assert seconds < 120, seconds


def test_a_gap_in_block_indices_is_named(tmp_path, tiny_model):
    state = released_state_dict(random_transformer(XARConfig(dim=32, encoder_depth=3, decoder_depth=1, num_heads=2,
                                                             mlp_hidden_dim=48)))
    state = {k: v for k, v in state.items() if not k.startswith("encoder_blocks.1.")}
    torch.save(state, tmp_path / "gap.pth")
    with pytest.raises(CheckpointError, match=r"unexpected tensors encoder_blocks\.2\.\S+.*numbered 0 to 0"):
        load_local(tmp_path / "gap.pth")


@pytest.mark.parametrize("index", ["01", "1e3", "-1", "x", "9" * 5000, "\u0661"])
def test_oddly_written_block_indices_are_named(tmp_path, tiny_model, index):
    state = {**released_state_dict(tiny_model), f"decoder_blocks.{index}.norm1.weight": torch.zeros(32)}
    with pytest.raises(CheckpointError, match="unexpected tensors decoder_blocks") as info:
        check_config_matches(infer_config(state), state)
    assert "\n" not in str(info.value)


# Each field of a config.json that disagrees with the tensors, and the tensor the message must name.
MISMATCHES = [
    ("dim", 64, "z_proj.weight"),
    ("token_channels", 3, "z_proj.weight"),
    ("grid_size", 32, "encoder_pos_embed_learned"),
    ("num_classes", 10, "class_emb.weight"),
    ("time_frequencies", 128, "time_embed.mlp.0.weight"),
    ("mlp_hidden_dim", 4096, "encoder_blocks.0.mlp.fc1_g.weight"),
    ("decoder_depth", 5, "decoder_blocks.1"),
]


@pytest.mark.parametrize("field, value, named", MISMATCHES)
def test_config_json_that_disagrees_with_the_tensors_is_named(tmp_path, tiny_checkpoint, field, value, named):
    directory = _tiny_dir(tmp_path, tiny_checkpoint)
    data = json.loads((directory / "config.json").read_text())
    data["xar_config"][field] = value
    (directory / "config.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError) as info:
        load_local(directory)
    message = str(info.value)
    assert named in message and f"{field}={value}" in message and "config.json" in message, message
    assert "\n" not in message


def test_heads_and_cell_size_are_checked_against_the_released_buffers(tiny_model):
    state = released_state_dict(tiny_model)
    config = tiny_model.config
    with pytest.raises(CheckpointError, match=r"freqs_cos has shape \(256, 16\).*num_heads=4"):
        check_config_matches(XARConfig(**{**config.to_dict(), "num_heads": 4}), state)
    # The heads and grid fit, the cells do not: the mask's contents are compared before anything is built.
    with pytest.raises(CheckpointError, match="not block-causal over 4x4 cells"):
        from xar_infer.loading import build_model
        build_model(state, "tiny.pth", XARConfig(**{**config.to_dict(), "cell_size": 4}))


@pytest.mark.parametrize("field", ["dim", "encoder_depth", "decoder_depth", "num_heads", "mlp_hidden_dim",
                                   "token_channels", "grid_size", "cell_size", "num_classes", "time_frequencies"])
@pytest.mark.parametrize("value", [0, -3, True, 8.0, "8", None])
def test_every_size_field_must_be_a_positive_int(field, value):
    with pytest.raises(InvalidArgumentError, match=f"XARConfig.{field} must be a positive int, got {value!r}"):
        XARConfig(**{field: value})


@pytest.mark.parametrize("changes, named", [
    (dict(dim=32, num_heads=3), "not divisible by num_heads"),
    (dict(dim=24, num_heads=4), "head_dim .* multiple of 4"),
    (dict(grid_size=16, cell_size=5), "not a multiple of cell_size"),
    (dict(time_frequencies=255), "time_frequencies must be even"),
    (dict(rope_theta=0.0), "rope_theta must be a finite number > 0"),
    (dict(rope_theta=float("nan")), "rope_theta must be a finite number > 0"),
    (dict(latent_scale=float("inf")), "latent_scale must be a finite number > 0"),
    (dict(pixel_space="yes"), "pixel_space must be True or False"),
])
def test_config_relations_are_checked(changes, named):
    with pytest.raises(InvalidArgumentError, match=named):
        XARConfig(**changes)


@pytest.mark.parametrize("steps, scale, named", [
    (0, 2.0, "num_inference_steps"), (10**9, 2.0, "num_inference_steps"), ("40", 2.0, "num_inference_steps"),
    (10, 0.5, "guidance_scale"), (10, "high", "guidance_scale"),
])
def test_config_json_sampling_defaults_are_checked(tmp_path, tiny_checkpoint, steps, scale, named):
    directory = _tiny_dir(tmp_path, tiny_checkpoint)
    data = json.loads((directory / "config.json").read_text())
    data.update(num_inference_steps=steps, guidance_scale=scale)
    (directory / "config.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=f"config.json is not a valid xar_infer config .*{named}"):
        load_local(directory)


@pytest.mark.parametrize("text", ["[]", "7", '{"xar_config": [1, 2]}', "[" * 100_000, '{"xar_config": {"dim": 1e999}}'])
def test_odd_json_in_config_json_is_one_line(tmp_path, tiny_checkpoint, text):
    directory = _tiny_dir(tmp_path, tiny_checkpoint)
    (directory / "config.json").write_text(text)
    with pytest.raises(CheckpointError, match="config.json is not a valid xar_infer config") as info:
        load_local(directory)
    assert "\n" not in str(info.value)


def test_a_model_directory_without_weights_is_named(tmp_path, tiny_checkpoint):
    directory = _tiny_dir(tmp_path, tiny_checkpoint)
    (directory / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=f"file not found: {directory / 'model.safetensors'}"):
        load_local(directory)


# ---- the VAE: levels and blocks bounded by the file ----

def _vae_state() -> dict[str, torch.Tensor]:
    return AutoencoderKLDecoder(VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1)).state_dict()


@pytest.mark.parametrize("extra, named", [
    ("decoder.up.100000000.block.0.conv1.weight", "decoder.up levels"),
    ("decoder.up.3.block.0.conv1.weight", "decoder.up levels"),  # level 2 missing: a gap
    ("decoder.up.0.block.100000000.norm1.weight", r"decoder.up.0.block entries"),
    ("decoder.up.01.block.0.norm1.weight", "decoder.up levels"),
    ("decoder.up." + "9" * 5000 + ".block.0.norm1.weight", "decoder.up levels"),
])
def test_vae_indices_must_run_without_gaps(extra, named):
    state = {**_vae_state(), extra: torch.zeros(32)}
    with pytest.raises(CheckpointError, match=f"unexpected tensor .*{named}"):
        infer_vae_config(state)


def test_vae_levels_need_the_same_blocks(tmp_path):
    state = {k: v for k, v in _vae_state().items() if not k.startswith("decoder.up.1.block.1.")}
    with pytest.raises(CheckpointError, match="decoder.up.1 has 1 blocks, decoder.up.0 has 2"):
        infer_vae_config(state)
    torch.save({"model": state}, tmp_path / "vae.ckpt")
    with pytest.raises(CheckpointError, match=str(tmp_path / "vae.ckpt")):
        load_vae(tmp_path / "vae.ckpt")


@pytest.mark.parametrize("changes, named", [
    (dict(ch=0), "VAEConfig.ch must be a positive int"),
    (dict(ch=48), "VAEConfig.ch must be a multiple of 32"),
    (dict(ch_mult=()), "VAEConfig.ch_mult must be a non-empty tuple"),
    (dict(ch_mult=(1, 0)), "VAEConfig.ch_mult must be a non-empty tuple"),
    (dict(num_res_blocks=-1), "VAEConfig.num_res_blocks must be a non-negative int"),
    (dict(embed_dim=True), "VAEConfig.embed_dim must be a positive int"),
])
def test_vae_config_fields_are_checked(changes, named):
    with pytest.raises(InvalidArgumentError, match=named):
        VAEConfig(**changes)


def test_a_vae_whose_widths_break_group_norm_is_refused():
    state = _vae_state()
    # Widths 32 and 64 are multiples of ch=16 but the group norms need ch to be a multiple of 32.
    state["decoder.conv_out.weight"] = torch.zeros(3, 16, 3, 3)
    with pytest.raises(CheckpointError, match="invalid config: VAEConfig.ch must be a multiple of 32"):
        infer_vae_config(state)


def test_model_dir_from_an_xar_digits_like_config_still_round_trips(tmp_path):
    """The checks accept what we write ourselves: a pixel-space model with non-default fields."""
    config = XARConfig(dim=32, encoder_depth=2, decoder_depth=1, num_heads=2, mlp_hidden_dim=40, token_channels=1,
                       grid_size=8, cell_size=4, num_classes=10, latent_scale=1.0, pixel_space=True)
    model = random_transformer(config)
    save_model_folder(tmp_path / "m", model, 7, 1.5)
    loaded = load_local(tmp_path / "m")
    assert loaded.model.config == config and (loaded.num_inference_steps, loaded.guidance_scale) == (7, 1.5)
