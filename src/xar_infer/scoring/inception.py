"""torch-fidelity's InceptionV3, built from weights that were checked before they were read.

torch-fidelity reads its weights file with full unpickling (``torch.load(weights_only=False)``),
which runs whatever code a file carries. Here the file is checked against a SHA-256 digest, then read
with ``weights_only=True`` (plain tensors only), and torch-fidelity gets those tensors re-serialised
in memory, so nothing it unpickles came from disk. The default digest is that of the file every
published torch-fidelity FID uses; ``sha256=`` accepts another file on purpose (random weights in
tests, another port).
"""

from __future__ import annotations

import hashlib
import io
import os
import urllib.error
from pathlib import Path
from typing import Any

import torch

from ..checkpoint_io import error_summary
from ..errors import CheckpointError, InvalidArgumentError, first_line
from ..output_files import write_file_by_path

# SHA-256 of weights-inception-2015-12-05-6726825d.pth (95,628,359 bytes), torch-fidelity's port of the
# TensorFlow Inception of 2015-12-05 that FID is defined with (torch_fidelity.feature_extractor_inceptionv3.
# URL_INCEPTION_V3). torch-fidelity does not publish the digest; its file name carries the first 8 hex
# digits (torch.hub's convention), and the whole digest is the one that independent projects pinning this
# file record for it (pytorch-fid ships the same file as pt_inception-2015-12-05-6726825d.pth).
INCEPTION_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
WEIGHTS_FILE_NAME = "weights-inception-2015-12-05-6726825d.pth"
FEATURE_EXTRACTOR = "inception-v3-compat"  # torch-fidelity's registered name for it
POOL_FEATURES = "2048"  # FID and precision/recall (torch-fidelity's defaults for this extractor)
LOGITS = "logits_unbiased"  # Inception Score
POOL_DIMS = 2048
INSTALL_HINT = "pip install 'xar_infer[fid]' (with the torchvision build that matches your torch)"


def torch_fidelity() -> Any:
    """The ``torch_fidelity`` package, or one line saying how to install it."""
    try:
        import torch_fidelity as package
    except ImportError:
        raise InvalidArgumentError(f"scoring needs torch-fidelity: {INSTALL_HINT}") from None
    except RuntimeError as exc:  # torchvision built for another torch fails at import
        raise InvalidArgumentError(f"torch-fidelity cannot be imported ({first_line(exc)}); install the torchvision "
                                   f"release built for torch {torch.__version__}") from None
    return package


def weights_url() -> str:
    return torch_fidelity().feature_extractor_inceptionv3.URL_INCEPTION_V3


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def default_weights_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where torch-fidelity caches the weights (torch.hub's checkpoints folder), so a file it fetched
    before is found here too."""
    root = Path(cache_dir) if cache_dir is not None else Path(torch.hub.get_dir()) / "checkpoints"
    return root / WEIGHTS_FILE_NAME


def fetch_weights(path: Path, url: str, sha256: str = INCEPTION_SHA256) -> Path:
    """Download the weights to ``path`` unless it exists; a download is checked before it takes the name.

    Offline, the error says where to get the file and how to pass it.
    """
    if path.is_file():
        return path

    def download(tmp: Path) -> None:
        try:
            torch.hub.download_url_to_file(url, str(tmp), progress=False)
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", None) or exc.strerror or exc
            raise CheckpointError(f"the Inception weights are not cached at {path} and cannot be downloaded ({reason}); "
                                  f"download {url} on a machine with internet access and pass it with "
                                  "--inception-weights PATH") from None
        check_digest(tmp, sha256, f"the download of {url}")

    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        write_file_by_path(path, download)
    except FileExistsError:  # another process finished the same download first; it is checked when read
        pass
    return path


def check_digest(path: Path, sha256: str, what: str) -> None:
    actual = file_sha256(path)
    if actual != sha256.lower():
        raise CheckpointError(f"{what} has SHA-256 {actual}, not {sha256.lower()}: refusing to read it; use the "
                              f"official {WEIGHTS_FILE_NAME}, or pass --inception-weights PATH --inception-sha256 HEX "
                              "to use another file on purpose")


def load_weights(path: str | os.PathLike, sha256: str = INCEPTION_SHA256) -> dict[str, torch.Tensor]:
    """The state dict in ``path`` after checking its digest, read without unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Inception weights {path} not found" if not path.exists()
                              else f"Inception weights {path} is not a file")
    check_digest(path, sha256, f"Inception weights {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a foreign or damaged file
        raise CheckpointError(f"Inception weights {path} cannot be read as plain tensors: {error_summary(exc)}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"Inception weights {path} is not a state dict of tensors")
    return state


def feature_extractor(state: dict[str, torch.Tensor], device: torch.device) -> torch.nn.Module:
    """torch-fidelity's ``FeatureExtractorInceptionV3`` with ``state``, returning (pool features, logits)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)  # our own tensors: what torch-fidelity unpickles holds nothing else
    buffer.seek(0)
    module = torch_fidelity().FeatureExtractorInceptionV3
    try:
        extractor = module(FEATURE_EXTRACTOR, [POOL_FEATURES, LOGITS], feature_extractor_weights_path=buffer)
    except RuntimeError as exc:  # load_state_dict: missing, unexpected or misshapen tensors
        raise CheckpointError(f"the Inception weights do not fit torch-fidelity's InceptionV3: "
                              f"{error_summary(exc)}") from None
    return extractor.to(device)
