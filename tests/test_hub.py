"""The Hub round trip: save_pretrained's folder (variants, the VAE, the model card), from_pretrained
reading it back from disk or a Hub repo, push_to_hub against a stand-in for the Hub API (no network),
and xar-convert's Python face, convert_checkpoint."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import ModelCard, RepoUrl
from safetensors import safe_open

from conftest import random_transformer, save_released
from cpu_threads import one_torch_thread  # noqa: F401  (autouse: this module runs on one thread)
from xar_infer import CheckpointError, XARPipeline, convert_checkpoint
from xar_infer import loading


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _generate(pipe, output_type="latent"):
    pipe.set_progress_bar_config(disable=True)
    return pipe([1, 2], num_inference_steps=2, guidance_scale=2.0, generator=torch.Generator().manual_seed(0),
                output_type=output_type).images


def _dtypes(path: Path) -> set[torch.dtype]:
    with safe_open(path, "pt") as f:
        return {f.get_tensor(k).dtype for k in f.keys()}


def _metadata(path: Path) -> dict:
    with safe_open(path, "pt") as f:
        return f.metadata()


@pytest.fixture
def pipe(tiny_checkpoint, tiny_vae_checkpoint):
    return XARPipeline.from_pretrained(tiny_checkpoint, vae=tiny_vae_checkpoint)


# ---- save_pretrained -> from_pretrained ---------------------------------------------------------

def test_round_trip_in_fp32_gives_the_same_images_bit_for_bit(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "saved")
    assert sorted(_files(tmp_path / "saved")) == ["README.md", "config.json", "model.safetensors", "vae/model.safetensors"]
    assert _metadata(tmp_path / "saved" / "model.safetensors") == {"format": "pt"}
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["includes_vae"] is True
    loaded = XARPipeline.from_pretrained(tmp_path / "saved")  # the VAE is found without being named
    assert loaded.vae is not None and loaded.dtype == torch.float32
    assert (loaded.default_num_inference_steps, loaded.default_guidance_scale) == (50, 1.0)
    assert torch.equal(_generate(loaded), _generate(pipe))
    assert torch.equal(_generate(loaded, "pt"), _generate(pipe, "pt"))


def test_xar_digits_round_trip_keeps_its_defaults_and_needs_no_vae(tmp_path):
    digits = XARPipeline.from_pretrained("xar-digits")
    digits.save_pretrained(tmp_path / "digits")
    assert sorted(_files(tmp_path / "digits")) == ["README.md", "config.json", "model.safetensors"]
    loaded = XARPipeline.from_pretrained(tmp_path / "digits")
    assert loaded.vae is None and loaded.labels == digits.labels
    assert (loaded.default_num_inference_steps, loaded.default_guidance_scale) == (25, 2.0)
    assert torch.equal(_generate(loaded, "pt"), _generate(digits, "pt"))


def test_bf16_variant_loads_into_fp32_or_bf16_as_asked(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "saved", variant="bf16")
    folder = tmp_path / "saved"
    assert sorted(_files(folder)) == ["README.md", "config.json", "model.bf16.safetensors", "vae/model.bf16.safetensors"]
    assert _dtypes(folder / "model.bf16.safetensors") == {torch.bfloat16}
    assert _dtypes(folder / "vae" / "model.bf16.safetensors") == {torch.bfloat16}
    rounded = {k: v.to(torch.bfloat16) for k, v in pipe.transformer.state_dict().items()}

    as_fp32 = XARPipeline.from_pretrained(folder, variant="bf16")
    as_bf16 = XARPipeline.from_pretrained(folder, variant="bf16", torch_dtype=torch.bfloat16)
    assert as_fp32.dtype == torch.float32 and as_bf16.dtype == torch.bfloat16
    for loaded, dtype in ((as_fp32, torch.float32), (as_bf16, torch.bfloat16)):
        state = loaded.transformer.state_dict()
        assert all(torch.equal(state[k], v.to(dtype)) for k, v in rounded.items())
    # The VAE stays fp32, holding the bf16-rounded weights.
    vae = as_fp32.vae.state_dict()
    assert all(torch.equal(vae[k], v.to(torch.bfloat16).float()) for k, v in pipe.vae.state_dict().items())
    assert _generate(as_bf16).shape == _generate(pipe).shape

    with pytest.raises(CheckpointError, match=r"has no model.safetensors; it holds variant='bf16'"):
        XARPipeline.from_pretrained(folder)


def test_both_variants_share_a_folder(pipe, tmp_path):
    folder = tmp_path / "saved"
    pipe.save_pretrained(folder)
    shared = {name: (folder / name).read_bytes() for name in ("config.json", "README.md")}
    pipe.save_pretrained(folder, variant="bf16")  # the same config and card: kept, not refused
    assert {name: (folder / name).read_bytes() for name in shared} == shared
    assert "model.bf16.safetensors" in _files(folder) and "vae/model.bf16.safetensors" in _files(folder)
    assert torch.equal(_generate(XARPipeline.from_pretrained(folder)), _generate(pipe))
    assert XARPipeline.from_pretrained(folder, variant="bf16").transformer.z_proj.weight.dtype == torch.float32


def test_a_different_save_is_refused_whole_unless_overwrite(pipe, tmp_path, tiny_vae_checkpoint):
    folder = tmp_path / "saved"
    pipe.save_pretrained(folder)
    before = _files(folder)
    other = XARPipeline(random_transformer(seed=7), pipe.vae)
    with pytest.raises(FileExistsError, match=r"model.safetensors already exists and differs.*overwrite=True"):
        other.save_pretrained(folder)
    assert _files(folder) == before  # nothing mixed: not even the files that would have been new
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no staging left behind
    other.save_pretrained(folder, overwrite=True)
    assert torch.equal(_generate(XARPipeline.from_pretrained(folder)), _generate(other))


def test_pickle_and_unknown_variants_are_refused(pipe, tmp_path):
    with pytest.raises(ValueError, match="safe_serialization=False would pickle the weights"):
        pipe.save_pretrained(tmp_path / "x", safe_serialization=False)
    with pytest.raises(ValueError, match=r"variant must be None \(full precision\) or one of \('bf16',\), got 'fp8'"):
        pipe.save_pretrained(tmp_path / "x", variant="fp8")
    assert not (tmp_path / "x").exists()
    pipe.save_pretrained(tmp_path / "saved")
    with pytest.raises(CheckpointError, match=r"has no model.bf16.safetensors \(variant='bf16'\); it holds the full"):
        XARPipeline.from_pretrained(tmp_path / "saved", variant="bf16")
    with pytest.raises(ValueError, match="is a file: pass the folder"):
        XARPipeline.from_pretrained(tmp_path / "saved" / "model.safetensors", variant="bf16")
    with pytest.raises(ValueError, match="the preset xar-digits has one set of weights"):
        XARPipeline.from_pretrained("xar-digits", variant="bf16")


def test_a_config_naming_a_missing_vae_is_an_error(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "saved")
    shutil.rmtree(tmp_path / "saved" / "vae")
    with pytest.raises(CheckpointError, match=r"includes a VAE, but .*vae/model.safetensors is missing"):
        XARPipeline.from_pretrained(tmp_path / "saved")
    # A folder saved without a VAE loads without one.
    XARPipeline(pipe.transformer).save_pretrained(tmp_path / "bare")
    assert XARPipeline.from_pretrained(tmp_path / "bare").vae is None


# ---- the model card ------------------------------------------------------------------------------

def test_model_card_metadata_and_its_usage_code_runs(pipe, tmp_path, monkeypatch):
    pipe.default_num_inference_steps, pipe.default_guidance_scale = [3, 2, 2, 1], 2.5
    pipe.save_pretrained(tmp_path / "tiny-xar")
    card = ModelCard.load(tmp_path / "tiny-xar" / "README.md")
    assert card.data.library_name == "xar_infer"
    assert card.data.license == "other" and "placeholder" in card.text
    assert card.data.pipeline_tag == "unconditional-image-generation"
    assert {"xar", "class-conditional", "imagenet"} <= set(card.data.tags)
    assert "| `num_inference_steps` (per cell) | [3, 2, 2, 1] |" in card.text
    assert "| `guidance_scale` | 2.5 |" in card.text
    # The usage block, run as a user would from the folder's parent, makes an image.
    code = re.search(r"```python\n(.*?)```", card.text, re.S).group(1)
    assert 'XARPipeline.from_pretrained("tiny-xar")' in code
    monkeypatch.chdir(tmp_path)
    exec(code, {})
    assert (tmp_path / "sample.png").is_file()


def test_model_card_without_a_vae_shows_latents(tmp_path, tiny_checkpoint):
    XARPipeline.from_pretrained(tiny_checkpoint).save_pretrained(tmp_path / "bare")
    text = (tmp_path / "bare" / "README.md").read_text()
    assert 'output_type="latent"' in text and "No VAE" in text


# ---- the Hub, through stand-ins for huggingface_hub at our call boundary ---------------------------

@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A Hub in a folder: create_repo and upload_folder write ``repos/<id>``; downloads read it back."""
    repos = tmp_path / "repos"
    calls = {"create_repo": [], "upload_folder": [], "download": [], "metadata": []}

    def create_repo(self, repo_id, *, private=None, exist_ok=False, **kwargs):
        calls["create_repo"].append(dict(repo_id=repo_id, private=private, exist_ok=exist_ok, token=self.token))
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, commit_message=None, **kwargs):
        calls["upload_folder"].append(dict(repo_id=repo_id, commit_message=commit_message, token=self.token,
                                           folder=Path(folder_path), files=_files(Path(folder_path))))
        shutil.copytree(folder_path, repos / repo_id, dirs_exist_ok=True)
        return "commit-info"

    def hf_hub_download(repo_id, filename, *, cache_dir=None, **kwargs):
        calls["download"].append(dict(filename=filename, **kwargs))
        snapshot = Path(cache_dir or tmp_path / "cache") / repo_id.replace("/", "--")
        (snapshot / filename).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(repos / repo_id / filename, snapshot / filename)
        return str(snapshot / filename)

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    monkeypatch.setattr(loading, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(loading, "get_hf_file_metadata", lambda url, **kwargs: calls["metadata"].append(kwargs))
    return calls


def test_push_to_hub_uploads_the_saved_folder(pipe, tmp_path, hub):
    result = pipe.push_to_hub("me/xar-tiny", token="hf_secret", private=True, variant="bf16")
    assert result == "commit-info"
    assert hub["create_repo"] == [dict(repo_id="me/xar-tiny", private=True, exist_ok=True, token="hf_secret")]
    [upload] = hub["upload_folder"]
    assert upload["repo_id"] == "me/xar-tiny" and upload["token"] == "hf_secret"
    assert upload["commit_message"] == "Upload xAR model (bf16 variant) with xar_infer"
    assert not upload["folder"].exists()  # the temporary folder is gone
    # The same files save_pretrained writes, but for the card's usage code, which names the repo.
    pipe.save_pretrained(tmp_path / "local", variant="bf16")
    local = _files(tmp_path / "local")
    assert sorted(upload["files"]) == sorted(local)
    assert all(upload["files"][name] == local[name] for name in local if name != "README.md")
    card = ModelCard(upload["files"]["README.md"].decode())
    assert card.data.library_name == "xar_infer" and 'from_pretrained("me/xar-tiny")' in card.text
    assert _metadata(tmp_path / "repos" / "me/xar-tiny" / "model.bf16.safetensors") == {"format": "pt"}


def test_from_a_hub_repo_with_variant_token_and_force_download(pipe, hub):
    pipe.push_to_hub("me/xar-tiny")
    pipe.push_to_hub("me/xar-tiny", variant="bf16")
    loaded = XARPipeline.from_pretrained("me/xar-tiny", token="hf_secret")
    assert [d["filename"] for d in hub["download"]] == ["config.json", "model.safetensors", "vae/model.safetensors"]
    assert {(d["token"], d["force_download"]) for d in hub["download"]} == {("hf_secret", False)}
    assert {m["token"] for m in hub["metadata"]} == {"hf_secret"}
    assert loaded.vae is not None and torch.equal(_generate(loaded), _generate(pipe))

    hub["download"].clear()
    XARPipeline.from_pretrained("me/xar-tiny", variant="bf16", force_download=True)
    assert [d["filename"] for d in hub["download"]] == ["config.json", "model.bf16.safetensors",
                                                      "vae/model.bf16.safetensors"]
    assert {d["force_download"] for d in hub["download"]} == {True}
    with pytest.raises(ValueError, match="force_download=True fetches the files again, which local_files_only"):
        XARPipeline.from_pretrained("me/xar-tiny", force_download=True, local_files_only=True)


def test_push_to_hub_refuses_a_bad_repo_id_before_calling_the_hub(pipe, hub):
    with pytest.raises(ValueError, match="repo_id must be a Hub repo name"):
        pipe.push_to_hub("  ")
    assert hub["create_repo"] == [] and hub["upload_folder"] == []


# ---- convert_checkpoint, the Python face of xar-convert ------------------------------------------

def test_convert_checkpoint_writes_save_pretrained_s_folder(pipe, tmp_path, tiny_checkpoint, tiny_vae_checkpoint):
    convert_checkpoint(tiny_checkpoint, tmp_path / "converted", vae=tiny_vae_checkpoint)
    pipe.save_pretrained(tmp_path / "converted")  # the same writer: every file identical, nothing refused
    assert torch.equal(_generate(XARPipeline.from_pretrained(tmp_path / "converted"), "pt"), _generate(pipe, "pt"))
    # A preset converts too, and a model folder's VAE travels with it.
    convert_checkpoint("xar-digits", tmp_path / "digits", variant="bf16")
    assert "model.bf16.safetensors" in _files(tmp_path / "digits")
    convert_checkpoint(tmp_path / "converted", tmp_path / "again")
    assert _files(tmp_path / "again")["vae/model.safetensors"] == _files(tmp_path / "converted")["vae/model.safetensors"]
    other = save_released(random_transformer(seed=3), tmp_path / "other.pth")
    with pytest.raises(FileExistsError, match="already exists and differs"):
        convert_checkpoint(other, tmp_path / "converted")
