"""FID, Inception Score and precision/recall of a sample set, as torch-fidelity computes them.

The images stream from the ``.npz`` through torch-fidelity's InceptionV3 one batch at a time; only
their features stay (12 KB per image: 2048 pool features and 1008 logits in float32, 0.6 GB for
50,000). The metrics are torch-fidelity's own functions on those features, with its defaults (10 IS
splits shuffled with seed 2020, 3 nearest neighbours for precision/recall), so the numbers are those
of ``torch_fidelity.calculate_metrics`` on the same images written as PNG files.

An image reference's statistics are cached beside it, under a name keyed by the reference's and the
weights' digests: a changed reference or other weights never meet a stale cache.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import InvalidArgumentError
from ..output_files import describe_os_error, write_file
from .inception import POOL_DIMS, file_sha256, torch_fidelity
from .npz_inputs import ImageArray, Reference, check_statistics

MIN_SAMPLES = 2  # a covariance needs two
RELIABLE_SAMPLES = 10_000  # below this FID is strongly biased upward; the paper's protocol uses 50,000
IS_SPLITS = 10  # torch-fidelity's default, which the paper's numbers use


@dataclass(frozen=True)
class Features:
    pool: torch.Tensor  # [N, 2048] float32 on the CPU: FID, precision/recall
    logits: torch.Tensor  # [N, 1008] float32 on the CPU: Inception Score


@dataclass(frozen=True)
class Scores:
    fid: float
    inception_score: float
    inception_score_std: float
    num_samples: int
    precision: float | None = None
    recall: float | None = None

    def line(self) -> str:
        text = f"FID {self.fid:.4f}  IS {self.inception_score:.2f} ± {self.inception_score_std:.2f}"
        if self.precision is not None:
            text += f"  precision {self.precision:.4f}  recall {self.recall:.4f}"
        return text + f"  ({self.num_samples:,} samples)"

    def as_dict(self) -> dict:
        return asdict(self)


def extract_features(images: ImageArray, extractor: torch.nn.Module, batch_size: int, progress: bool = True,
                     description: str = "Inception features") -> Features:
    """The Inception features of every image, reading ``batch_size`` images at a time."""
    device = next(extractor.parameters()).device
    pool, logits = [], []
    with torch.inference_mode(), tqdm(total=len(images), unit="image", desc=description, disable=not progress,
                                      leave=False) as bar:
        for batch in images.batches(batch_size):
            # Contiguous NCHW like torch-fidelity's image loader: a channels-last tensor would run other kernels.
            x = torch.from_numpy(batch).to(device).permute(0, 3, 1, 2).contiguous()
            batch_pool, batch_logits = extractor(x)
            pool.append(batch_pool.cpu())
            logits.append(batch_logits.cpu())
            bar.update(len(batch))
    return Features(torch.cat(pool), torch.cat(logits))


def statistics_of(features: Features) -> dict[str, np.ndarray]:
    """``mu`` and ``sigma`` of the pool features (torch-fidelity: float32 mean, float64 covariance)."""
    return torch_fidelity().metric_fid.fid_features_to_statistics(features.pool)


def frechet_distance(statistics: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> float:
    """torch-fidelity's Fréchet distance. It needs both sides in one dtype: the official reference files
    are float64 where features give a float32 mean, so mixed sides are compared in float64."""
    a, b = statistics, reference
    if any(a[key].dtype != b[key].dtype for key in ("mu", "sigma")):
        a, b = ({key: np.asarray(s[key], dtype=np.float64) for key in ("mu", "sigma")} for s in (a, b))
    fid_module = torch_fidelity().metric_fid
    return float(fid_module.fid_statistics_to_metric(a, b, verbose=False)[fid_module.KEY_METRIC_FID])


def inception_score(features: Features, splits: int = IS_SPLITS) -> tuple[float, float]:
    """Mean and spread of the Inception Score over ``splits`` parts (fewer with fewer images than that)."""
    isc = torch_fidelity().metric_isc
    result = isc.isc_features_to_metric(features.logits, splits=min(splits, len(features.logits)))
    return result[isc.KEY_METRIC_ISC_MEAN], result[isc.KEY_METRIC_ISC_STD]


def precision_recall(samples: Features, reference: Features) -> tuple[float, float]:
    prc = torch_fidelity().metric_prc
    result = prc.prc_features_to_metric(samples.pool, reference.pool, verbose=False)
    return result[prc.KEY_METRIC_PRECISION], result[prc.KEY_METRIC_RECALL]


def check_sample_count(count: int, minimum: int = MIN_SAMPLES, reliable: int = RELIABLE_SAMPLES) -> None:
    """Refuse fewer than ``minimum`` samples; warn below ``reliable``."""
    if count < minimum:
        raise InvalidArgumentError(f"SAMPLES holds {count} image(s); FID needs at least {minimum} (the paper's "
                                   "protocol uses 50,000)")
    if count < reliable:
        warnings.warn(f"FID from {count:,} samples is biased upward and not comparable with published numbers; use "
                      f"at least {reliable:,} (the paper's protocol uses 50,000)", stacklevel=2)


class StatisticsCache:
    """The statistics of an image reference, stored beside it for the next run.

    The file name carries a digest of the reference file and of the Inception weights; an existing
    file of that name that does not hold matching statistics is refused, never overwritten.
    """

    def __init__(self, reference: Path, weights_sha256: str):
        self.reference = reference
        self.reference_sha256 = file_sha256(reference)
        self.weights_sha256 = weights_sha256
        key = hashlib.sha256(f"{self.reference_sha256}:{weights_sha256}".encode()).hexdigest()[:16]
        self.path = reference.with_name(f"{reference.stem}.fid-stats-{key}.npz")

    def load(self, feature_dims: int = POOL_DIMS) -> dict[str, np.ndarray] | None:
        """The cached statistics, or None if there are none yet."""
        if not self.path.exists():
            return None
        foreign = (f"{self.path} exists but does not hold the statistics of {self.reference} with these Inception "
                   "weights; move it away")
        try:
            with np.load(self.path, allow_pickle=False) as data:
                cached = {key: np.asarray(data[key]) for key in data.files}
        except (OSError, ValueError, KeyError):
            raise InvalidArgumentError(foreign) from None
        if (str(cached.get("reference_sha256", "")) != self.reference_sha256
                or str(cached.get("inception_sha256", "")) != self.weights_sha256
                or "mu" not in cached or "sigma" not in cached):
            raise InvalidArgumentError(foreign)
        statistics = {"mu": cached["mu"], "sigma": cached["sigma"]}
        check_statistics(statistics, str(self.path), feature_dims)
        return statistics

    def store(self, statistics: dict[str, np.ndarray]) -> None:
        """Write the cache whole or not at all; a reference folder we cannot write to only costs the cache."""
        def write(f) -> None:
            np.savez(f, mu=statistics["mu"], sigma=statistics["sigma"], reference_sha256=np.str_(self.reference_sha256),
                     inception_sha256=np.str_(self.weights_sha256))

        try:
            write_file(self.path, write)
        except FileExistsError:  # another run cached the same statistics meanwhile
            pass
        except OSError as exc:
            warnings.warn(f"could not cache the reference statistics at {self.path} ({describe_os_error(exc)}); "
                          "they will be computed again next time", stacklevel=2)


@dataclass(frozen=True)
class ScoringPlan:
    """Checked inputs: what :func:`score` computes, and the reference statistics already known."""

    samples: ImageArray
    reference: Reference
    precision_and_recall: bool
    reference_statistics: dict[str, np.ndarray] | None  # the file's own, or cached; None: from its images
    cache: StatisticsCache | None  # where to store statistics computed from the reference's images


def plan(samples: ImageArray, reference: Reference, weights_sha256: str, *, precision_and_recall: bool = False,
         cache: bool = True, minimum: int = MIN_SAMPLES, reliable: int = RELIABLE_SAMPLES,
         feature_dims: int = POOL_DIMS) -> ScoringPlan:
    """Check everything that needs no Inception: the sample count, the reference, a cached statistics file.

    FID uses the reference's own statistics where it has them (of ``feature_dims``-d features), else
    those of its images (cached beside it when ``cache``); precision and recall need its images.
    """
    check_sample_count(len(samples), minimum, reliable)
    if precision_and_recall:
        check_precision_recall_inputs(len(samples), reference)
    statistics, store = reference.statistics, None
    if statistics is not None:
        check_statistics(statistics, f"--ref {reference.path}", feature_dims)
    elif cache:
        store = StatisticsCache(reference.path, weights_sha256)
        statistics = store.load(feature_dims)
    return ScoringPlan(samples, reference, precision_and_recall, statistics, store if statistics is None else None)


def score(job: ScoringPlan, extractor: torch.nn.Module, *, batch_size: int = 64, progress: bool = True) -> Scores:
    """Score a checked :func:`plan` with ``extractor`` (:func:`inception.feature_extractor`)."""
    features = extract_features(job.samples, extractor, batch_size, progress, "samples")
    reference_features = None
    if job.precision_and_recall or job.reference_statistics is None:
        reference_features = extract_features(job.reference.images, extractor, batch_size, progress, "reference")
    reference_statistics = job.reference_statistics
    if reference_statistics is None:
        reference_statistics = statistics_of(reference_features)
        check_statistics(reference_statistics, f"the Inception features of --ref {job.reference.path}")
        if job.cache is not None:
            job.cache.store(reference_statistics)

    statistics = statistics_of(features)
    check_statistics(statistics, "the Inception features of SAMPLES")
    is_mean, is_std = inception_score(features)
    precision = recall = None
    if job.precision_and_recall:
        precision, recall = precision_recall(features, reference_features)
    return Scores(frechet_distance(statistics, reference_statistics), is_mean, is_std, len(job.samples), precision,
                  recall)


def check_precision_recall_inputs(num_samples: int, reference: Reference) -> None:
    if reference.images is None:
        raise InvalidArgumentError(f"--precision-recall needs reference images, but --ref {reference.path} holds only "
                                   "statistics; pass ADM's VIRTUAL_imagenet256_labeled.npz (10,000 images)")
    # Each point's ball reaches its 3rd nearest neighbour (torch-fidelity's default): 4 images per side at least.
    neighbours = torch_fidelity().defaults.DEFAULTS["prc_neighborhood"]
    for count, what in ((num_samples, "SAMPLES"), (len(reference.images), f"--ref {reference.path}")):
        if count <= neighbours:
            raise InvalidArgumentError(f"--precision-recall needs at least {neighbours + 1} images on each side; "
                                       f"{what} holds {count}")
