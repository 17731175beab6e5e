"""Checkpoint formats: strict released-format loading, derived-buffer checks, conversion, the Hub."""

from __future__ import annotations

import builtins
import json
import os
import re
import socket
import subprocess
import sys
import textwrap
import threading
import time
import zipfile
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from xar_infer import CheckpointError, XARPipeline, convert_checkpoint
from xar_infer.loading import load_local, load_pretrained, released_buffers

from conftest import TINY_CONFIG, random_transformer, released_state_dict

SRC = Path(__file__).resolve().parents[1] / "src"


def _latents(pipe, seed=0, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    return pipe([3, 9], num_inference_steps=3, guidance_scale=2.0, generator=torch.Generator().manual_seed(seed),
                output_type="latent", **kwargs).images


def _save(tmp_path, state, name="ckpt.pth"):
    path = tmp_path / name
    torch.save(state, path)
    return path


def test_released_checkpoint_loads_exactly(tiny_model, tiny_checkpoint):
    loaded = load_local(tiny_checkpoint).model
    assert loaded.config == tiny_model.config
    for key, value in tiny_model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_missing_tensor_is_named(tmp_path, tiny_model):
    state = released_state_dict(tiny_model)
    del state["decoder_blocks.0.mlp.fc2.bias"]
    with pytest.raises(CheckpointError, match=r"missing tensors decoder_blocks\.0\.mlp\.fc2\.bias"):
        load_local(_save(tmp_path, state))


def test_unexpected_tensor_is_named(tmp_path, tiny_model):
    state = released_state_dict(tiny_model)
    state["fake_latent"] = torch.zeros(1, 32)
    with pytest.raises(CheckpointError, match=r"unexpected tensors fake_latent"):
        load_local(_save(tmp_path, state))


def test_wrongly_shaped_tensor_is_named(tmp_path, tiny_model):
    state = released_state_dict(tiny_model)
    state["encoder_blocks.0.attn.proj.weight"] = torch.zeros(32, 31)
    with pytest.raises(CheckpointError, match=r"encoder_blocks\.0\.attn\.proj\.weight \(expected \(32, 32\), got \(32, 31\)\)"):
        load_local(_save(tmp_path, state))


def test_missing_released_buffer_is_an_error(tmp_path, tiny_model):
    state = released_state_dict(tiny_model)
    del state["decoder_blocks.0.attn.rope.freqs_sin"]
    with pytest.raises(CheckpointError, match=r"missing buffer\(s\) decoder_blocks\.0\.attn\.rope\.freqs_sin"):
        load_local(_save(tmp_path, state))


def test_foreign_mask_is_an_error(tmp_path, tiny_model):
    state = released_state_dict(tiny_model)
    state["mask"] = state["mask"].clone()
    state["mask"][..., 64:, :] = 0  # later cells would see the future: not xAR's causal order
    with pytest.raises(CheckpointError, match="not block-causal"):
        load_local(_save(tmp_path, state))


def test_foreign_rope_is_an_error_and_rounding_is_silent(tmp_path, tiny_model, recwarn):
    state = released_state_dict(tiny_model)
    state["encoder_blocks.0.attn.rope.freqs_cos"] = state["encoder_blocks.0.attn.rope.freqs_cos"] + 1e-7
    load_local(_save(tmp_path, state, "rounded.pth"))
    assert not [w for w in recwarn if "RoPE" in str(w.message)]
    state["encoder_blocks.0.attn.rope.freqs_cos"] = state["encoder_blocks.0.attn.rope.freqs_sin"]
    with pytest.raises(CheckpointError, match=r"freqs_cos differs from xAR's 2D RoPE"):
        load_local(_save(tmp_path, state, "foreign.pth"))


def test_corrupted_file_is_an_error(tmp_path):
    path = tmp_path / "broken.pth"
    path.write_bytes(b"\x80\x02 this is not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="corrupted|refusing"):
        load_local(path)


def test_truncated_file_is_an_error(tmp_path, tiny_checkpoint):
    path = tmp_path / "truncated.pth"
    path.write_bytes(tiny_checkpoint.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="corrupted or truncated"):
        load_local(path)


class Payload:
    """Stands for an arbitrary pickled object, which must never be unpickled."""


def test_arbitrary_objects_are_not_unpickled(tmp_path, tiny_model):
    state = released_state_dict(tiny_model)
    state["payload"] = Payload()
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        load_local(_save(tmp_path, state))


class CreatesFile:
    """Unpickling this calls open(path, "w"): a file appears if the loader ever runs pickled code."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def test_a_pickle_that_runs_code_is_refused_without_running_it(tmp_path, tiny_model, tiny_vae_checkpoint):
    from xar_infer import load_vae

    marker = tmp_path / "pwned"
    state = {**released_state_dict(tiny_model), "payload": CreatesFile(str(marker))}
    path = _save(tmp_path, state)
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        load_local(path)
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        load_vae(path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the trap is real: full unpickling would have created the file
    assert marker.exists()


class CallsGlobal:
    """Unpickling this calls ``function(*args)``: what a malicious checkpoint does."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


@pytest.mark.parametrize("function, args, named", [
    (os.getcwd, (), "getcwd"),  # posix.getcwd here, nt.getcwd on Windows
    (builtins.exec, ("import os",), "exec"),
])
def test_a_pickle_refusal_names_the_global_and_never_advises_full_unpickling(tmp_path, tiny_model, function, args, named):
    from xar_infer import load_vae

    path = _save(tmp_path, {**released_state_dict(tiny_model), "payload": CallsGlobal(function, *args)})
    for load in (load_local, load_vae):
        with pytest.raises(CheckpointError) as info:
            load(path)
        message = str(info.value)
        assert "\n" not in message and str(path) in message, message
        assert f"would call {named}" in message or re.search(rf"would call \w+\.{named}\)", message), message
        assert "only plain state dicts" in message, message
        # torch's own message advises weights_only=False (running the pickle) and add_safe_globals
        assert "weights_only" not in message and "safe_globals" not in message, message


def test_compressed_records_are_refused_before_they_expand(tmp_path, tiny_checkpoint):
    deflated = tmp_path / "deflated.pth"
    with zipfile.ZipFile(tiny_checkpoint) as source, zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as out:
        for info in source.infolist():
            out.writestr(info.filename, source.read(info.filename))
    assert deflated.stat().st_size < tiny_checkpoint.stat().st_size  # the records really are compressed
    torch.load(deflated, weights_only=True)  # which torch itself would expand
    with pytest.raises(CheckpointError, match=f"{deflated} has compressed records"):
        load_local(deflated)


def test_views_larger_than_the_stored_bytes_are_refused(tmp_path, tiny_model):
    """A stride-0 view of one stored float reads as 400 MB; nothing may be built from it."""
    path = _save(tmp_path, {**released_state_dict(tiny_model), "fake": torch.zeros(1).expand(10**8)})
    assert path.stat().st_size < 10**6
    with pytest.raises(CheckpointError, match=r"its tensors view 40\d{7} bytes but the file stores \d{6};"):
        load_local(path)


def test_one_tensor_under_two_weight_names_is_refused(tmp_path, tiny_model):
    """Cast or moved, each name would get its own copy: a file could multiply itself that way."""
    state = released_state_dict(tiny_model)  # its RoPE tables are shared, which is fine: they are not loaded
    state["decoder_blocks.0.attn.proj.weight"] = state["encoder_blocks.0.attn.proj.weight"]
    with pytest.raises(CheckpointError, match="decoder_blocks.0.attn.proj.weight and encoder_blocks.0.attn.proj.weight are the same data"):
        load_local(_save(tmp_path, state), dtype=torch.bfloat16)


def test_sha256_is_checked_before_loading(tmp_path, tiny_checkpoint):
    import hashlib

    digest = hashlib.sha256(tiny_checkpoint.read_bytes()).hexdigest()
    assert load_pretrained(tiny_checkpoint, sha256=digest.upper()).model is not None
    wrong = "0" * 64
    with pytest.raises(CheckpointError, match=f"{tiny_checkpoint.name}: SHA-256 is {digest}, expected {wrong}"):
        XARPipeline.from_pretrained(tiny_checkpoint, sha256=wrong)


def test_not_an_xar_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="is this an xAR checkpoint"):
        load_local(_save(tmp_path, {"weight": torch.zeros(3)}))


def test_unknown_name_is_an_error():
    with pytest.raises(CheckpointError, match="not a preset"):
        load_pretrained("no-such-model.pth")


def test_conversion_round_trip(tmp_path, tiny_checkpoint):
    out = convert_checkpoint(tiny_checkpoint, tmp_path / "converted")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["xar_config"] == TINY_CONFIG.to_dict()
    reference = _latents(XARPipeline.from_pretrained(tiny_checkpoint))
    assert torch.equal(_latents(XARPipeline.from_pretrained(out)), reference)
    assert torch.equal(_latents(XARPipeline.from_pretrained(out / "model.safetensors")), reference)


def test_conversion_keeps_existing_files(tmp_path, tiny_checkpoint):
    out = convert_checkpoint(tiny_checkpoint, tmp_path / "converted")
    (out / "config.json").write_text("mine")
    with pytest.raises(FileExistsError, match="already exist"):
        convert_checkpoint(tiny_checkpoint, out)
    assert (out / "config.json").read_text() == "mine"
    convert_checkpoint(tiny_checkpoint, out, overwrite=True)
    assert json.loads((out / "config.json").read_text())["xar_config"]["dim"] == TINY_CONFIG.dim


def test_bad_config_json_is_an_error(tmp_path, tiny_checkpoint):
    out = convert_checkpoint(tiny_checkpoint, tmp_path / "converted")
    (out / "config.json").write_text(json.dumps({"xar_config": {"dim": 32, "depth": 3}}))
    with pytest.raises(CheckpointError, match="not a valid xar_infer config"):
        load_local(out)


def test_preset_defaults_follow_the_architecture(tmp_path):
    """A converted checkpoint of an unknown architecture falls back to neutral sampling defaults."""
    loaded = load_local(_save(tmp_path, released_state_dict(random_transformer())))
    assert (loaded.num_inference_steps, loaded.guidance_scale) == (50, 1.0)


# ---- Hugging Face Hub, offline, through a real cache layout (no mocking of our code) ----

def _fake_hub_cache(root: Path, repo_id: str, files: dict[str, bytes], commit: str = "0" * 40) -> Path:
    repo_dir = root / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        (snapshot / name).write_bytes(data)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    return root


def _run_offline(code: str, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "PYTHONPATH": str(SRC)}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=300)


def _run_with_hub(code: str, cache: Path, endpoint: str) -> tuple[subprocess.CompletedProcess, float]:
    """``code`` in a child whose Hub is ``endpoint`` (not offline mode); and its wall time."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT=endpoint, HF_HUB_CACHE=str(cache), PYTHONPATH=str(SRC), HF_HUB_DISABLE_TELEMETRY="1")
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                            timeout=300)
    return result, time.perf_counter() - start


@contextmanager
def _closed_port():
    """An endpoint that refuses connections at once: a port bound but not listening."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


@contextmanager
def _fake_hub(files: dict[str, bytes], status: int = 200):
    """A local server answering like the Hub's ``resolve`` URLs: ``files`` maps ``repo/resolve/main/name``."""
    requests = []

    class Handler(BaseHTTPRequestHandler):
        def _answer(self, body: bool):
            requests.append((self.command, self.path))
            data = files.get(self.path.lstrip("/"))
            code = status if data is not None or status != 200 else 404
            self.send_response(code)
            if code == 404:
                self.send_header("X-Error-Code", "EntryNotFound")  # how the Hub tells a missing file
            if code == 200:
                self.send_header("X-Repo-Commit", "a" * 40)
                self.send_header("ETag", f'"{hash(data) & 0xffffffff:x}"')
            self.send_header("Content-Length", str(len(data) if code == 200 else 0))
            self.end_headers()
            if body and code == 200:
                self.wfile.write(data)

        def do_HEAD(self):
            self._answer(False)

        def do_GET(self):
            self._answer(True)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", requests
    finally:
        server.shutdown()
        server.server_close()


LOAD_XAR_B = """
    from xar_infer import XARPipeline
    print(XARPipeline.from_pretrained("xar-b").transformer.config.dim)
"""
GENERATE_XAR_B = """
    import sys
    from xar_infer.cli import generate_main
    sys.exit(generate_main(["--model", "xar-b", "--latents-only", "--output", "unused"]))
"""
# huggingface_hub alone sleeps 1+2+4+8+8 = 23 s between its retries before it gives up; starting
# Python and torch in the child takes 3-8 s on our loaded 2-core machine. Under 20 s therefore means
# no retry ran, with room left for a slow CI machine.
NO_RETRY_SECONDS = 20


def test_an_unreachable_hub_fails_in_one_line_without_retries(tmp_path):
    (tmp_path / "cache").mkdir()
    with _closed_port() as endpoint:
        result, seconds = _run_with_hub(GENERATE_XAR_B, tmp_path / "cache", endpoint)
    lines = result.stderr.splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "xAR-B.pth of OliverRen/xAR is not in the Hugging Face cache" in lines[0], lines[0]
    assert "the Hub cannot be reached" in lines[0] and "--checkpoint" in lines[0], lines[0]
    assert seconds < NO_RETRY_SECONDS, seconds


def test_an_unreachable_hub_still_serves_the_cache(tmp_path, tiny_checkpoint):
    cache = _fake_hub_cache(tmp_path / "hub", "OliverRen/xAR", {"xAR-B.pth": tiny_checkpoint.read_bytes()})
    with _closed_port() as endpoint:
        result, seconds = _run_with_hub(LOAD_XAR_B, cache, endpoint)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert result.stdout.strip() == str(TINY_CONFIG.dim)
    assert seconds < NO_RETRY_SECONDS, seconds


def test_a_reachable_hub_downloads_once_probed(tmp_path, tiny_checkpoint):
    files = {"OliverRen/xAR/resolve/main/xAR-B.pth": tiny_checkpoint.read_bytes()}
    with _fake_hub(files) as (endpoint, requests):
        result, _ = _run_with_hub(LOAD_XAR_B, tmp_path / "cache", endpoint)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(TINY_CONFIG.dim)
    assert ("GET", "/OliverRen/xAR/resolve/main/xAR-B.pth") in requests


def test_a_hub_server_error_fails_in_one_line_without_retries(tmp_path, tiny_checkpoint):
    (tmp_path / "cache").mkdir()
    files = {"OliverRen/xAR/resolve/main/xAR-B.pth": tiny_checkpoint.read_bytes()}
    with _fake_hub(files, status=503) as (endpoint, requests):
        result, seconds = _run_with_hub(GENERATE_XAR_B, tmp_path / "cache", endpoint)
    lines = result.stderr.splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "the Hub cannot be reached: HTTP 503" in lines[0], lines[0]
    assert [r for r in requests if "xAR-B.pth" in r[1]] == [("HEAD", "/OliverRen/xAR/resolve/main/xAR-B.pth")]
    assert seconds < NO_RETRY_SECONDS, seconds


def test_a_file_missing_on_the_hub_is_named(tmp_path):
    with _fake_hub({}) as (endpoint, _):
        result, _ = _run_with_hub(GENERATE_XAR_B, tmp_path / "cache", endpoint)
    lines = result.stderr.splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "cannot fetch xAR-B.pth from Hub repo OliverRen/xAR at revision main" in lines[0], lines[0]


def test_preset_loads_from_the_hub_cache_offline(tmp_path, tiny_checkpoint):
    cache = _fake_hub_cache(tmp_path / "hub", "OliverRen/xAR", {"xAR-B.pth": tiny_checkpoint.read_bytes()})
    reference = _latents(XARPipeline.from_pretrained(tiny_checkpoint))
    torch.save(reference, tmp_path / "reference.pt")
    result = _run_offline(f"""
        import torch
        from xar_infer import XARPipeline
        pipe = XARPipeline.from_pretrained("xar-b")
        assert (pipe.default_num_inference_steps, pipe.default_guidance_scale) == (40, 2.7)
        pipe.set_progress_bar_config(disable=True)
        out = pipe([3, 9], num_inference_steps=3, guidance_scale=2.0,
                   generator=torch.Generator().manual_seed(0), output_type="latent").images
        assert torch.equal(out, torch.load(r"{tmp_path / 'reference.pt'}")), "hub copy differs"
        print("ok")
    """, cache)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_hub_repo_in_our_format_loads_offline(tmp_path, tiny_checkpoint):
    converted = convert_checkpoint(tiny_checkpoint, tmp_path / "converted")
    files = {name: (converted / name).read_bytes() for name in ("config.json", "model.safetensors")}
    cache = _fake_hub_cache(tmp_path / "hub", "someone/xar-tiny", files)
    result = _run_offline("""
        from xar_infer import XARPipeline
        pipe = XARPipeline.from_pretrained("someone/xar-tiny")
        print(pipe.transformer.config.dim)
    """, cache)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(TINY_CONFIG.dim)


def test_offline_and_not_cached_says_how_to_pass_a_local_file(tmp_path):
    cache = tmp_path / "empty-hub"
    cache.mkdir()
    result = _run_offline("""
        from xar_infer import XARPipeline, CheckpointError
        try:
            XARPipeline.from_pretrained("xar-l")
        except CheckpointError as exc:
            print(exc)
    """, cache)
    assert result.returncode == 0, result.stderr
    assert "xAR-L.pth of OliverRen/xAR is not in the Hugging Face cache" in result.stdout
    assert "from_pretrained('/path/to/xAR-L.pth')" in result.stdout


def test_local_files_only_without_cache(tmp_path):
    with pytest.raises(CheckpointError, match="not in the Hugging Face cache"):
        load_pretrained("xar-h", cache_dir=tmp_path, local_files_only=True)


@pytest.mark.parity
def test_released_buffers_match_the_official_file(parity_dir):
    """Our derived buffers equal those the official code stored (all but the one perturbed table)."""
    state = torch.load(parity_dir / "xar_tiny.pth", weights_only=True)
    from xar_infer.config import infer_config

    ours = released_buffers(infer_config(state))
    exact = [k for k in ours if torch.equal(ours[k], state[k])]
    assert sorted(set(ours) - set(exact)) == ["encoder_blocks.0.attn.rope.freqs_cos"]


def test_a_local_file_wins_over_a_preset_name(tmp_path, tiny_checkpoint, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("xar-b").write_bytes(tiny_checkpoint.read_bytes())
    assert load_pretrained("xar-b").model.config == TINY_CONFIG  # no Hub lookup for an existing path
