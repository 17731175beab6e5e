"""The bundled `xar-digits` model: it loads offline and its samples are the digits asked for.

A classifier trained here on the real scikit-learn digits labels the generated ones; random weights
would score about 10%. This is the quality check that the tiny random checkpoints elsewhere cannot give.
"""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.resources import files
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

from xar_infer import XARPipeline
from xar_infer.config import PRESETS
from xar_infer.loading import CONFIG_NAME

from cpu_threads import one_torch_thread, subprocess_env  # noqa: F401  (autouse: this module runs on one thread)

PER_DIGIT = 20


@pytest.fixture(scope="module")
def pipe():
    pipe = XARPipeline.from_pretrained("xar-digits")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def classifier():
    """Logistic regression on the real digits' pixels in [0, 1]: 93% accurate on held-out real digits
    (5-fold cross-validation), and its probabilities say directly how much a sample looks like each digit."""
    digits = load_digits()
    return LogisticRegression(max_iter=5000).fit(digits.data / 16, digits.target)


def classify_samples(pipe, classifier, **kwargs) -> tuple[float, np.ndarray]:
    """Accuracy, and the probability of the digit asked for per sample, over PER_DIGIT samples of every digit."""
    labels = np.array([d for d in range(10) for _ in range(PER_DIGIT)])
    generators = [torch.Generator().manual_seed(1000 + i) for i in range(len(labels))]
    images = pipe(labels.tolist(), generator=generators, output_type="np", **kwargs).images  # [N, 8, 8, 1] in [0, 1]
    probabilities = classifier.predict_proba(images.reshape(len(labels), 64))
    accuracy = float(np.mean(probabilities.argmax(axis=1) == labels))
    return accuracy, probabilities[np.arange(len(labels)), labels]


def test_bundled_files_match_the_preset():
    preset = PRESETS["xar-digits"]
    saved = json.loads((files("xar_infer") / "data" / preset.bundled_dir / CONFIG_NAME).read_text())
    assert saved["xar_config"] == preset.config.to_dict()


@pytest.fixture(scope="module")
def at_defaults(pipe, classifier):
    return classify_samples(pipe, classifier)


def test_samples_are_the_requested_digits(pipe, at_defaults):
    assert (pipe.default_num_inference_steps, pipe.default_guidance_scale) == (
        PRESETS["xar-digits"].num_inference_steps, PRESETS["xar-digits"].guidance_scale)
    print(f"xar-digits accuracy at the defaults: {at_defaults[0]:.3f}")
    assert at_defaults[0] >= 0.9


def test_guidance_helps(pipe, classifier, at_defaults):
    """Guidance makes samples look more like the digit asked for: the same seeds with and without it,
    compared pairwise. Measured: accuracy 0.975 -> 0.99, mean probability of the requested digit
    0.913 -> 0.954, a paired gain of 0.040 at a standard error of 0.005. The test asks for a gain above
    3 standard errors, i.e. one that chance would not produce."""
    unguided = classify_samples(pipe, classifier, guidance_scale=1.0)
    gain = at_defaults[1] - unguided[1]
    standard_error = gain.std(ddof=1) / np.sqrt(len(gain))
    print(f"xar-digits: guidance {pipe.default_guidance_scale}: accuracy {at_defaults[0]:.3f}, probability "
          f"{at_defaults[1].mean():.3f}; guidance 1.0: {unguided[0]:.3f}, {unguided[1].mean():.3f}; "
          f"paired gain {gain.mean():.3f} +- {standard_error:.3f}")
    assert gain.mean() > 3 * standard_error


def test_pixel_model_outputs(pipe):
    out = pipe([7, 3], num_inference_steps=5, generator=torch.Generator().manual_seed(0), output_type="pil").images
    assert [im.size for im in out] == [(8, 8), (8, 8)] and out[0].mode == "L"
    pt = pipe([7], num_inference_steps=5, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert pt.shape == (1, 1, 8, 8) and 0 <= pt.min() and pt.max() <= 1
    with pytest.raises(ValueError, match="class id 10 is out of range"):
        pipe([10])
    with pytest.raises(ValueError, match="only available for ImageNet"):
        pipe(["goldfish"])


def test_training_script_is_reproducible_and_loadable(tmp_path):
    """tools/train_demo.py: a few steps, twice with one seed, give identical weights that load as a model."""
    script = Path(__file__).resolve().parents[1] / "tools" / "train_demo.py"
    outputs = []
    for run in range(2):
        out = tmp_path / f"run{run}"
        subprocess.run([sys.executable, str(script), "--steps", "3", "--batch-size", "16", "--out", str(out)],
                       check=True, capture_output=True, timeout=300, env=subprocess_env())
        outputs.append(out)
    assert (outputs[0] / "model.safetensors").read_bytes() == (outputs[1] / "model.safetensors").read_bytes()
    pipe = XARPipeline.from_pretrained(outputs[0])
    assert pipe.transformer.config == PRESETS["xar-digits"].config
