"""xar-fid against torch-fidelity's own calculate_metrics, offline, with a random-weight InceptionV3.

Each run with the real network costs an Inception pass per image (0.1-0.8 s on a shared 2-core CPU)
and torch-fidelity's Fréchet distance on 2048-d statistics (eigenvalues of a 2048x2048 matrix:
seconds). So the sets are small (20 samples: torch-fidelity's 10 Inception Score splits need 2 each
to be more than 1; 6 reference images: precision and recall need 4), the comparison with
torch-fidelity runs once, and the tests of our own paths (streaming, statistics files) use a cheap
stand-in extractor, since what they check is the reading and bookkeeping, not the network.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from random_inception import save_random_inception
from xar_infer.errors import CheckpointError, InvalidArgumentError
from xar_infer.scoring import inception
from xar_infer.scoring.command import main
from xar_infer.scoring.npz_inputs import open_images, open_reference
from xar_infer.scoring.scores import extract_features, frechet_distance, plan, score

try:  # the fid extra: CI runs this file in a second environment that has it (.ci/run)
    import torch_fidelity
except (ImportError, RuntimeError) as exc:  # RuntimeError: a torchvision built for another torch
    pytest.skip(f"torch-fidelity is not usable here ({type(exc).__name__})", allow_module_level=True)

NUM_SAMPLES, NUM_REFERENCE = 20, 6


def images(seed: int, count: int, size: int = 24) -> np.ndarray:
    """Real RGB uint8 pictures: a colour, a gradient of another and noise, different per image."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, size)[None, :, None, None]
    picture = (rng.integers(0, 160, (count, 1, 1, 3)) + ramp * rng.integers(0, 96, (count, 1, 1, 3))
               + rng.normal(0, 25, (count, size, size, 3)))
    return np.clip(picture, 0, 255).astype(np.uint8)


def write_png_folder(folder: Path, array: np.ndarray) -> Path:
    folder.mkdir()
    for i, image in enumerate(array):
        Image.fromarray(image).save(folder / f"{i:05d}.png")
    return folder


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("scoring")
    weights = root / "inception.pth"
    sha256 = save_random_inception(weights)
    samples, reference = images(1, NUM_SAMPLES), images(2, NUM_REFERENCE)
    np.savez(root / "samples.npz", arr_0=samples)
    refs = root / "refs"
    refs.mkdir()
    np.savez(refs / "reference.npz", arr_0=reference)
    return {"root": root, "weights": weights, "sha256": sha256, "samples": root / "samples.npz",
            "reference": refs / "reference.npz", "sample_pngs": write_png_folder(root / "sample_pngs", samples),
            "reference_pngs": write_png_folder(root / "reference_pngs", reference)}


def xar_fid(capsys, files, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv] + ["--inception-weights", str(files["weights"]),
                                          "--inception-sha256", files["sha256"], "--device", "cpu"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def image_reference_run(files):
    """xar-fid against the reference images, with precision/recall, once for the module."""
    out = files["root"] / "images-run.json"
    code = main([str(files["samples"]), "--ref", str(files["reference"]), "--precision-recall", "--json", str(out),
                 "--inception-weights", str(files["weights"]), "--inception-sha256", files["sha256"], "--device", "cpu"])
    assert code == 0
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def torch_fidelity_run(files):
    return torch_fidelity.calculate_metrics(
        input1=str(files["sample_pngs"]), input2=str(files["reference_pngs"]), cuda=False, isc=True, fid=True, prc=True,
        # torch-fidelity 0.4 takes VGG16 features for precision/recall unless told; xar-fid takes the Inception
        # pool features, as ADM's evaluator does.
        feature_extractor="inception-v3-compat",
        feature_extractor_weights_path=str(files["weights"]),  # our own file of plain tensors
        cache=False, verbose=False)


def test_equals_torch_fidelity_calculate_metrics_on_png_folders(image_reference_run, torch_fidelity_run):
    """The same images, the same weights, the same metric code. On our CI's CPU all five numbers come out
    identical (both sides run one batch of the same uint8 tensor, then torch-fidelity's own functions);
    1e-6 relative leaves room for a machine whose convolutions round differently between the two calls."""
    ours, theirs = image_reference_run, torch_fidelity_run
    assert ours["fid"] > 0.1 and ours["inception_score"] > 1.001  # the random network tells the images apart
    assert ours["fid"] == pytest.approx(theirs["frechet_inception_distance"], rel=1e-6)
    assert ours["inception_score"] == pytest.approx(theirs["inception_score_mean"], rel=1e-6)
    assert ours["inception_score_std"] == pytest.approx(theirs["inception_score_std"], rel=1e-6)
    assert ours["precision"] == pytest.approx(theirs["precision"], rel=1e-6)
    assert ours["recall"] == pytest.approx(theirs["recall"], rel=1e-6)
    assert ours["num_samples"] == NUM_SAMPLES and ours["reference_used"] == "images"


def independent_frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2), symmetric square roots by eigh, float64."""
    def sqrt_psd(m):
        values, vectors = np.linalg.eigh(m)
        return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    root = sqrt_psd(sigma1)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2)
                 - 2 * np.trace(sqrt_psd(root @ sigma2 @ root)))


@pytest.mark.parametrize("dims, seed", [(8, 0), (64, 1), (128, 2)])
def test_frechet_distance_equals_an_independent_float64_formula(dims, seed):
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=(dims, 2 * dims)), rng.normal(size=(dims, 3 * dims))
    sigma1, sigma2 = a @ a.T / (2 * dims), b @ b.T / (3 * dims) + 0.1 * np.eye(dims)
    mu1, mu2 = rng.normal(size=dims), rng.normal(size=dims)
    expected = independent_frechet_distance(mu1, sigma1, mu2, sigma2)
    # The features' mean is float32 against a float64 reference file, as with the official statistics.
    got = frechet_distance({"mu": mu1.astype(np.float32), "sigma": sigma1}, {"mu": mu2, "sigma": sigma2})
    expected32 = independent_frechet_distance(mu1.astype(np.float32).astype(np.float64), sigma1, mu2, sigma2)
    assert got == pytest.approx(expected32, rel=1e-9)
    assert frechet_distance({"mu": mu1, "sigma": sigma1}, {"mu": mu1, "sigma": sigma1}) == pytest.approx(0, abs=1e-8)
    assert expected > 0


class PoolingExtractor(torch.nn.Module):
    """A cheap stand-in with the Inception extractor's interface (uint8 NCHW in, pool features and logits
    out) that computes each image on its own, so any difference between batch sizes is the reading's."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(1 / 255), requires_grad=False)

    def forward(self, x):
        assert x.dtype == torch.uint8 and x.shape[1] == 3 and x.is_contiguous()
        pooled = torch.nn.functional.adaptive_avg_pool2d(x.float() * self.scale, 3).flatten(1)  # [B, 27]
        return pooled, 8 * pooled[:, :10]


def test_streaming_in_batches_gives_what_one_batch_gives(tmp_path):
    np.savez_compressed(tmp_path / "samples.npz", arr_0=images(3, 23))
    np.savez(tmp_path / "reference.npz", arr_0=images(4, 7))
    samples, reference = open_images(tmp_path / "samples.npz", "SAMPLES"), open_reference(tmp_path / "reference.npz")
    whole = np.concatenate(list(samples.batches(5)))
    assert [len(b) for b in samples.batches(5)] == [5, 5, 5, 5, 3]
    np.testing.assert_array_equal(whole, images(3, 23))

    def run(batch_size):
        job = plan(samples, reference, "0" * 64, precision_and_recall=True, cache=False, reliable=1)
        return score(job, PoolingExtractor(), batch_size=batch_size, progress=False)

    at_once = run(64)
    for batch_size in (1, 4, 22):
        assert run(batch_size) == at_once
    assert at_once.fid > 0 and at_once.precision is not None


def test_progress_bar_counts_the_images(tmp_path, capsys):
    np.savez(tmp_path / "samples.npz", arr_0=images(3, 5))
    samples = open_images(tmp_path / "samples.npz", "SAMPLES")
    extract_features(samples, PoolingExtractor(), batch_size=2, progress=True, description="samples")
    err = capsys.readouterr().err  # the bar is drawn on stderr and cleared when done (leave=False)
    assert "samples:" in err and "0/5 [" in err


def test_statistics_file_gives_what_the_images_give(tmp_path):
    """An image reference's statistics, cached beside it by the first run, then given as a statistics-only
    reference: the same FID as from the images. (The stand-in's 27-d features keep the distance cheap;
    with 2048-d ones each takes seconds.)"""
    np.savez(tmp_path / "samples.npz", arr_0=images(5, 9))
    np.savez(tmp_path / "reference.npz", arr_0=images(6, 7))
    samples = open_images(tmp_path / "samples.npz", "SAMPLES")

    def fid(reference_file):
        job = plan(samples, open_reference(reference_file), "ab" * 32, reliable=1, feature_dims=27)
        return score(job, PoolingExtractor(), progress=False).fid

    from_images = fid(tmp_path / "reference.npz")
    cached = list(tmp_path.glob("reference.fid-stats-*.npz"))
    assert len(cached) == 1
    with np.load(cached[0]) as data:
        assert data["mu"].dtype == np.float32 and data["sigma"].dtype == np.float64  # as torch-fidelity makes them
        np.savez(tmp_path / "stats.npz", mu=data["mu"], sigma=data["sigma"])
    assert fid(tmp_path / "reference.npz") == from_images  # read back from the cache
    assert fid(tmp_path / "stats.npz") == from_images > 0


def test_the_cache_is_read_and_a_foreign_file_is_never_overwritten(files, capsys, tmp_path):
    np.savez(tmp_path / "samples.npz", arr_0=images(5, 9))
    np.savez(tmp_path / "reference.npz", arr_0=images(6, 7))
    samples, reference = open_images(tmp_path / "samples.npz", "SAMPLES"), open_reference(tmp_path / "reference.npz")
    score(plan(samples, reference, files["sha256"], reliable=1, feature_dims=27), PoolingExtractor(), progress=False)
    cache = next(tmp_path.glob("reference.fid-stats-*.npz"))
    with np.load(cache) as data:
        fields = dict(data)
    # Same keys and digests, another mean: that is what a run scores against, nothing recomputed.
    np.savez(cache, **{**fields, "mu": fields["mu"] + 1})
    job = plan(samples, reference, files["sha256"], reliable=1, feature_dims=27)
    np.testing.assert_array_equal(job.reference_statistics["mu"], fields["mu"] + 1)
    assert job.cache is None  # nothing to store
    # Other weights: another name, so the file stays and is not read.
    assert plan(samples, reference, "cd" * 32, reliable=1, feature_dims=27).reference_statistics is None
    # Not this reference's statistics (another digest inside): refused, left as it is.
    np.savez(cache, **{**fields, "reference_sha256": np.str_("0" * 64)})
    foreign = cache.read_bytes()
    line = refusal(capsys, files, tmp_path, tmp_path / "samples.npz", "--ref", tmp_path / "reference.npz")
    assert line.endswith("move it away") and cache.read_bytes() == foreign


def contents(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def refusal(capsys, files, tmp_path, *argv) -> str:
    """Run xar-fid expecting a refusal: exit 2, one line, nothing written anywhere under tmp_path."""
    before = contents(tmp_path)
    code, out, err = xar_fid(capsys, files, *argv, "--json", tmp_path / "scores.json", "--quiet")
    lines = [line for line in err.splitlines() if "warning:" not in line]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("xar-fid: error: "), err
    assert contents(tmp_path) == before and out == ""
    return lines[0]


@pytest.mark.parametrize("array, expected", [
    (np.zeros((4, 8, 8, 3), np.float32), "float32 [4, 8, 8, 3]; expected uint8 images [N, H, W, 3]"),
    (np.zeros((4, 3, 8, 8), np.uint8), "channels first"),
    (np.zeros((4, 8, 8), np.uint8), "uint8 [4, 8, 8]"),
    (np.zeros((4, 8, 8, 1), np.uint8), "uint8 [4, 8, 8, 1]"),
])
def test_refuses_samples_of_the_wrong_dtype_or_shape(files, capsys, tmp_path, array, expected):
    np.savez(tmp_path / "bad.npz", arr_0=array)
    assert expected in refusal(capsys, files, tmp_path, tmp_path / "bad.npz", "--ref", files["reference"])


def test_refuses_files_that_are_not_image_sets(files, capsys, tmp_path):
    (tmp_path / "text.npz").write_text("not a zip")
    assert "not an .npz (zip) file" in refusal(capsys, files, tmp_path, tmp_path / "text.npz", "--ref", files["reference"])
    np.savez(tmp_path / "other.npz", images=images(0, 3))
    assert "has no arr_0" in refusal(capsys, files, tmp_path, tmp_path / "other.npz", "--ref", files["reference"])
    assert "does not exist" in refusal(capsys, files, tmp_path, tmp_path / "missing.npz", "--ref", files["reference"])


@pytest.mark.parametrize("fields, expected", [
    ({"labels": np.arange(3)}, "neither FID statistics (mu, sigma) nor images (arr_0)"),
    ({"mu": np.zeros(2048)}, "has mu but no sigma"),
    ({"mu": np.zeros(2048), "sigma": np.eye(1024)}, "mu [2048] and sigma [1024, 1024] do not match"),
    ({"mu": np.zeros(64), "sigma": np.eye(64)}, "statistics of 64-d features, but the Inception pool features are 2048-d"),
    ({"mu": np.zeros(2048), "sigma": np.where(np.eye(2048) > 0, np.nan, 0)}, "sigma contains NaN or inf"),
    ({"mu": np.full(2048, np.inf), "sigma": np.eye(2048)}, "mu contains NaN or inf"),
])
def test_refuses_references_without_usable_statistics(files, capsys, tmp_path, fields, expected):
    np.savez(tmp_path / "ref.npz", **fields)
    assert expected in refusal(capsys, files, tmp_path, files["samples"], "--ref", tmp_path / "ref.npz")


def test_refuses_too_few_samples_and_warns_below_ten_thousand(files, capsys, tmp_path):
    np.savez(tmp_path / "one.npz", arr_0=images(0, 1))
    assert "holds 1 image(s); FID needs at least 2" in refusal(capsys, files, tmp_path, tmp_path / "one.npz", "--ref",
                                                               files["reference"])
    with pytest.warns(UserWarning, match=f"FID from {NUM_SAMPLES} samples is biased upward"):
        plan(open_images(files["samples"], "SAMPLES"), open_reference(files["reference"]), "0" * 64, cache=False)


def test_precision_recall_needs_reference_images(files, capsys, tmp_path):
    np.savez(tmp_path / "stats.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    line = refusal(capsys, files, tmp_path, files["samples"], "--ref", tmp_path / "stats.npz", "--precision-recall")
    assert "needs reference images" in line and "VIRTUAL_imagenet256_labeled.npz" in line
    np.savez(tmp_path / "three.npz", arr_0=images(0, 3))
    assert "at least 4 images on each side" in refusal(capsys, files, tmp_path, files["samples"], "--ref",
                                                       tmp_path / "three.npz", "--precision-recall")


def test_refuses_weights_that_fail_their_digest_or_hold_objects(files, capsys, tmp_path):
    before = contents(tmp_path)
    code = main([str(files["samples"]), "--ref", str(files["reference"]), "--inception-weights", str(files["weights"]),
                 "--json", str(tmp_path / "s.json"), "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and f"has SHA-256 {files['sha256']}, not {inception.INCEPTION_SHA256}" in err
    assert contents(tmp_path) == before

    class Payload:
        def __reduce__(self):
            return (os.system, ("touch pwned",))

    torch.save({"fc.weight": torch.zeros(1), "x": Payload()}, tmp_path / "evil.pth")
    digest = hashlib.sha256((tmp_path / "evil.pth").read_bytes()).hexdigest()
    with pytest.raises(CheckpointError, match="cannot be read as plain tensors"):
        inception.load_weights(tmp_path / "evil.pth", digest)
    assert not Path("pwned").exists() and not (tmp_path / "pwned").exists()


def test_option_refusals(files, capsys, tmp_path):
    (tmp_path / "scores.json").write_text("{}")
    assert "already exists; pass --overwrite" in refusal(capsys, files, tmp_path, files["samples"], "--ref",
                                                         files["reference"])
    (tmp_path / "scores.json").unlink()
    code = main([str(files["samples"]), "--ref", str(files["reference"]), "--inception-sha256", "ab" * 32])
    assert code == 2 and "pass both" in capsys.readouterr().err
    code = main([str(files["samples"]), "--ref", str(files["reference"]), "--json", str(files["samples"]), "--overwrite"])
    assert code == 2 and "names the SAMPLES file" in capsys.readouterr().err
    code = main([str(files["samples"]), "--ref", str(files["reference"]), "--inception-weights", str(tmp_path / "no.pth")])
    assert code == 2 and "no.pth is not a file" in capsys.readouterr().err


def test_weights_download_is_checked_and_offline_says_what_to_do(files, tmp_path):
    target = tmp_path / "cache" / inception.WEIGHTS_FILE_NAME
    with pytest.raises(CheckpointError, match="cannot be downloaded .*pass it with --inception-weights PATH"):
        inception.fetch_weights(target, (tmp_path / "nowhere.pth").as_uri())
    assert not target.exists()
    with pytest.raises(CheckpointError, match="has SHA-256"):
        inception.fetch_weights(target, files["weights"].as_uri())  # not the official file
    assert not target.exists() and os.listdir(target.parent) == []
    assert inception.fetch_weights(target, files["weights"].as_uri(), files["sha256"]) == target
    assert target.read_bytes() == files["weights"].read_bytes()


def test_a_truncated_sample_file_is_refused_while_reading(tmp_path):
    np.savez(tmp_path / "s.npz", arr_0=images(0, 6))
    data = (tmp_path / "s.npz").read_bytes()
    # Keep the zip directory but damage the image bytes: the CRC check fails at the end of the member.
    with zipfile.ZipFile(tmp_path / "s.npz") as archive:
        offset = archive.getinfo("arr_0.npy").header_offset + 200
    (tmp_path / "s.npz").write_bytes(data[:offset] + bytes(255 - b for b in data[offset:offset + 50]) + data[offset + 50:])
    samples = open_images(tmp_path / "s.npz", "SAMPLES")
    with pytest.raises(InvalidArgumentError, match="damaged"):
        list(samples.batches(4))
