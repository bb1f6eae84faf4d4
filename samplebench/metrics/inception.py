"""Inception-v3 features for FID, KID, IS and precision/recall, through torch-fidelity.

The network is torch-fidelity's port of the TensorFlow Inception graph of 2015-12-05
(`FeatureExtractorInceptionV3`, weights `weights-inception-2015-12-05-6726825d.pth`), the one FID
and IS were defined with. Two ways of getting images to 299x299:

- "legacy": torch-fidelity's own TF1-compatible bilinear resize inside the network (uint8 input),
  so features equal `fidelity --fid ...` on the same images;
- "clean": clean-fid's "clean" resize (PIL bicubic per channel on float32, clipped to [0, 255], not
  re-quantised) outside the network, then the same network at 299, so features equal clean-fid's
  `mode="clean"` pipeline with this network.

The metrics are torch-fidelity's own functions applied to the features; the wrappers only convert
arrays and check the inputs those functions do not check.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch_fidelity
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric
from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric
from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric

from samplebench.errors import UsageError, brief

EXTRACTOR_NAME = "inception-v3-compat"  # torch-fidelity's registry name for this network
WEIGHTS_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
RESOLUTION = 299
FEATURES = ("2048", "logits_unbiased")  # torch-fidelity's defaults for fid/kid/prc and for isc
RNG_SEED = 2020  # torch-fidelity's default rng_seed (KID subsets, IS shuffling)
MODES = ("legacy", "clean")
_OFFLINE = (
    "Inception weights are not cached and cannot be downloaded; download "
    f"{WEIGHTS_FILENAME} where there is network and set metrics.inception_weights=<path>"
)
# Submodules of FeatureExtractorInceptionV3.forward between its resize and the pooled features.
_TRUNK = (
    "Conv2d_1a_3x3",
    "Conv2d_2a_3x3",
    "Conv2d_2b_3x3",
    "MaxPool_1",
    "Conv2d_3b_1x1",
    "Conv2d_4a_3x3",
    "MaxPool_2",
    "Mixed_5b",
    "Mixed_5c",
    "Mixed_5d",
    "Mixed_6a",
    "Mixed_6b",
    "Mixed_6c",
    "Mixed_6d",
    "Mixed_6e",
    "Mixed_7a",
    "Mixed_7b",
    "Mixed_7c",
)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _default_weights_cache() -> Path:
    """Where torch-fidelity's download lands (torch.hub's checkpoint cache)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILENAME


def load_network(weights_path: str | Path | None) -> tuple[FeatureExtractorInceptionV3, str]:
    """torch-fidelity's Inception with pooled features and unbiased logits, and the weights' sha256.

    The weights file is unpickled by torch-fidelity (`torch.load(..., weights_only=False)`): use only
    files you trust.
    """
    if weights_path is None:
        try:
            net = FeatureExtractorInceptionV3(EXTRACTOR_NAME, list(FEATURES), verbose=False)
        except OSError as e:  # URLError, HTTPError, timeouts: no network and nothing cached
            raise UsageError(_OFFLINE) from e
        cached = _default_weights_cache()
        return net, sha256_file(cached) if cached.is_file() else "torch-fidelity default"
    path = Path(weights_path).expanduser()
    if not path.is_file():
        raise UsageError(
            f"metrics.inception_weights={path} does not exist; download {WEIGHTS_FILENAME} and set "
            "metrics.inception_weights=<path>"
        )
    try:
        net = FeatureExtractorInceptionV3(
            EXTRACTOR_NAME, list(FEATURES), feature_extractor_weights_path=str(path)
        )
    except Exception as e:  # noqa: BLE001 - torch.load of a damaged or foreign file fails in many ways
        if isinstance(e, (EOFError, pickle.UnpicklingError)) or "zip archive" in str(e):
            what = "is damaged or not a PyTorch file"
        else:
            what = "is not torch-fidelity's Inception state_dict"
        raise UsageError(
            f"metrics.inception_weights={path} {what} ({brief(e)}); "
            f"download {WEIGHTS_FILENAME} again and point metrics.inception_weights at it"
        ) from e
    return net, sha256_file(path)


def forward_resized(net: FeatureExtractorInceptionV3, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features and unbiased logits of float images already at 299x299 (values 0..255, NCHW).

    torch-fidelity's forward accepts only uint8, but clean-fid feeds the network float images that it
    deliberately does not re-quantise after resizing. This runs the same submodules in the same order
    as that forward; its TF1 bilinear resize is skipped because from 299 to 299 it is the identity
    (all interpolation weights are exactly 0). The test suite checks both against each other.
    """
    x = x.to(net.feature_extractor_internal_dtype)
    x = (x - 128) / 128
    for name in _TRUNK:
        x = getattr(net, name)(x)
    pool = torch.flatten(net.AvgPool(x), 1)
    logits = pool.mm(net.fc.weight.T)
    return pool.to(torch.float32), logits.to(torch.float32)


class InceptionFeatures:
    """Extracts {"pool": (N, 2048), "logits": (N, 1008) unbiased} float64 features from uint8 images.

    `protocol` records everything that changes the numbers (network, weights hash, resize mode,
    versions); `fingerprint()` keys caches of features and reference statistics on it. The weights are
    identified by their file's sha256 whether given as a path or found in torch-fidelity's download
    cache, so the same weights give the same fingerprint either way. The device is not recorded: CPU
    and GPU kernels differ only in float32 rounding.
    """

    dim = int(FEATURES[0])  # width of the pooled features (what reference mu/sigma must match)

    def __init__(
        self,
        mode: str = "legacy",
        weights_path: str | Path | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 64,
    ) -> None:
        if mode not in MODES:
            raise UsageError(f"Inception mode '{mode}' is unknown; choose legacy or clean")
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise UsageError(f"batch_size={batch_size} must be a positive integer")
        self.mode = mode
        self.batch_size = int(batch_size)
        self.device = torch.device(device)
        self._resize: Callable[[np.ndarray], np.ndarray] | None = None
        if mode == "clean":
            self._resize = _clean_resizer()
        self.net, weights_sha = load_network(weights_path)
        # Same network and weights in the channels-last layout: about 1.6x faster on CPU (oneDNN convs),
        # and the usual fast layout for cuDNN; only float32 rounding changes (features agree with
        # torch-fidelity's NCHW run to ~3e-6 relative, FID/KID/IS to < 1e-4: tests/test_inception.py).
        self.net.to(self.device, memory_format=torch.channels_last)
        self.protocol: dict[str, str] = {
            "extractor": f"torch-fidelity {EXTRACTOR_NAME}",
            "weights_sha256": weights_sha,
            "mode": mode,
            "resolution": str(RESOLUTION),
            "torch_fidelity": torch_fidelity.__version__,
        }

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.protocol, sort_keys=True).encode()).hexdigest()[:16]

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Features of uint8 images (N, H, W, 3), batch by batch: only one batch is ever at 299x299."""
        if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
            raise TypeError("images must be a uint8 numpy array (N, H, W, 3)")
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must have shape (N, H, W, 3), got {images.shape}")
        pools, logits = [], []
        with torch.inference_mode():
            for start in range(0, len(images), self.batch_size):
                p, lg = self._batch(images[start : start + self.batch_size])
                pools.append(p.cpu().numpy())
                logits.append(lg.cpu().numpy())
        if not pools:
            return {"pool": np.zeros((0, 2048)), "logits": np.zeros((0, 1008))}
        return {
            "pool": np.concatenate(pools).astype(np.float64),
            "logits": np.concatenate(logits).astype(np.float64),
        }

    def _batch(self, batch: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        if self._resize is None:
            # torch-fidelity's own path: uint8 NCHW (contiguous, as its DataLoader makes it) into forward.
            x = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).contiguous()
            return self.net(x.to(self.device))
        resized = np.stack([self._resize(img) for img in batch])  # float32 (B, 299, 299, 3), 0..255
        x = torch.from_numpy(resized).permute(0, 3, 1, 2).contiguous()
        return forward_resized(self.net, x.to(self.device))


def _clean_resizer() -> Callable[[np.ndarray], np.ndarray]:
    """clean-fid's resize for mode="clean" (`build_resizer("clean")`): uint8 HWC in, float32 HWC out."""
    try:
        from cleanfid.resize import make_resizer
    except ImportError as e:
        raise UsageError("Inception mode 'clean' needs clean-fid: pip install clean-fid") from e
    return make_resizer("PIL", False, "bicubic", (RESOLUTION, RESOLUTION))


# -- metrics on features (float64 numpy in, torch-fidelity's functions inside) ------------------------


def _features(a: np.ndarray, name: str, min_rows: int = 1) -> np.ndarray:
    a = np.ascontiguousarray(a, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"{name} must be 2-d (N, D), got shape {a.shape}")
    if len(a) < min_rows:
        raise UsageError(f"{name} has {len(a)} rows; this metric needs at least {min_rows} images")
    return a


def statistics(pool: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (N-1 normalised) of pooled features, by `fid_features_to_statistics`."""
    stats = fid_features_to_statistics(torch.from_numpy(_features(pool, "pool", 2)))
    return np.asarray(stats["mu"], np.float64), np.asarray(stats["sigma"], np.float64)


def fid_from_features(gen_pool: np.ndarray, ref_mu: np.ndarray, ref_sigma: np.ndarray) -> float:
    """FID of generated features against reference statistics, by `fid_statistics_to_metric`.

    Where torch-fidelity falls short: it takes the trace of sqrt(sigma1 sigma2) from the eigenvalues of
    the (non-symmetric) product and drops imaginary parts silently, with no check for NaN or for fewer
    images than needed; clean-fid uses scipy's sqrtm instead, which differs in the last digits when the
    covariances are singular (fewer images than 2048), and there can even raise "Imaginary component"
    where torch-fidelity returns a number. torch-fidelity's end-to-end run computes the mean
    in float32 (its features are float32); here everything is float64.
    """
    mu, sigma = statistics(gen_pool)
    ref_mu = np.asarray(ref_mu, np.float64)
    ref_sigma = np.asarray(ref_sigma, np.float64)
    if ref_mu.shape != mu.shape or ref_sigma.shape != sigma.shape:
        raise ValueError(
            f"reference statistics {ref_mu.shape}/{ref_sigma.shape} do not match features {mu.shape}"
        )
    out = fid_statistics_to_metric({"mu": mu, "sigma": sigma}, {"mu": ref_mu, "sigma": ref_sigma}, False)
    return float(out[KEY_METRIC_FID])


def kid_from_features(
    gen_pool: np.ndarray,
    ref_pool: np.ndarray,
    subsets: int = 100,
    subset_size: int = 1000,
    seed: int = RNG_SEED,
) -> tuple[float, float]:
    """KID mean and std over `subsets` random subsets, by `kid_features_to_metric` (cubic kernel).

    Where torch-fidelity falls short: it refuses a subset_size larger than either set (ValueError);
    here it is capped at min(n_gen, n_ref), which gives exactly torch-fidelity's number with
    kid_subset_size set to that minimum (clean-fid caps the same way). Subsets are drawn like
    torch-fidelity: np.random.RandomState(seed), generated then reference indices per subset.
    """
    gen = _features(gen_pool, "gen_pool", 2)
    ref = _features(ref_pool, "ref_pool", 2)
    if subsets < 1 or subset_size < 2:
        raise UsageError(f"KID needs subsets >= 1 and subset_size >= 2 (got {subsets}, {subset_size})")
    size = min(subset_size, len(gen), len(ref))
    out = kid_features_to_metric(
        torch.from_numpy(gen),
        torch.from_numpy(ref),
        kid_subsets=subsets,
        kid_subset_size=size,
        rng_seed=seed,
        verbose=False,
    )
    return float(out[KEY_METRIC_KID_MEAN]), float(out[KEY_METRIC_KID_STD])


def isc_from_logits(logits: np.ndarray, splits: int = 10, seed: int = RNG_SEED) -> tuple[float, float]:
    """Inception Score mean and std over `splits`, by `isc_features_to_metric` on unbiased logits.

    Images are shuffled first with np.random.RandomState(seed).permutation, as torch-fidelity does by
    default. Where it falls short: with fewer images than splits some splits are empty and the score is
    NaN without a warning; here that is an error.
    """
    lg = _features(logits, "logits", max(splits, 1))
    if splits < 1:
        raise UsageError(f"IS splits={splits} must be a positive integer")
    out = isc_features_to_metric(torch.from_numpy(lg), splits=splits, shuffle=True, rng_seed=seed)
    return float(out[KEY_METRIC_ISC_MEAN]), float(out[KEY_METRIC_ISC_STD])


def prc_from_features(
    gen_pool: np.ndarray, ref_pool: np.ndarray, neighborhood: int = 3
) -> tuple[float, float]:
    """Precision (generated inside the reference manifold) and recall, by `prc_features_to_metric`.

    Uses torch-fidelity's batched variant (save_cpu_ram), which gives the same numbers as the full one
    with less memory. Where it falls short: a set with no more images than `neighborhood` fails inside
    torch.kthvalue with an unhelpful message; here it is checked first. Note torch-fidelity's default
    extractor for prc is VGG16; these are Inception pool features (`feature_extractor=inception-v3-compat`).
    """
    if neighborhood < 1:
        raise UsageError(f"precision/recall neighborhood={neighborhood} must be a positive integer")
    gen = _features(gen_pool, "gen_pool", neighborhood + 1)
    ref = _features(ref_pool, "ref_pool", neighborhood + 1)
    out = prc_features_to_metric(
        torch.from_numpy(gen),
        torch.from_numpy(ref),
        prc_neighborhood=neighborhood,
        prc_batch_size=10000,
        save_cpu_ram=True,
        verbose=False,
    )
    return float(out[KEY_METRIC_PRECISION]), float(out[KEY_METRIC_RECALL])


# -- random weights for offline tests and benchmarks -----------------------------------------------


class _Unloaded(FeatureExtractorInceptionV3):
    """The same module tree, left at its random initialisation (loading is skipped)."""

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):  # type: ignore[override]
        return None


def save_random_weights(path: str | Path, seed: int = 0) -> Path:
    """Write a randomly initialised network as a file in torch-fidelity's upstream weights format.

    For tests and benchmarks without network: a plain dict with the keys of torch-fidelity's converter
    (conv weight; bn weight, bias, running_mean, running_var; fc weight, bias; no num_batches_tracked).
    BatchNorm running statistics are calibrated on random gradients, blobs and stripes so activations neither
    vanish nor explode through the 94 layers; the numbers such a network gives are not FID.
    """
    buf = io.BytesIO()
    torch.save({}, buf)
    buf.seek(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = _Unloaded(EXTRACTOR_NAME, list(FEATURES), feature_extractor_weights_path=buf)
        bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        with torch.no_grad():
            for m in net.modules():
                if isinstance(m, torch.nn.Conv2d):
                    torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            for m in bns:
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.2)
                m.reset_running_stats()
                m.momentum = None  # cumulative average over the calibration batch
            net.fc.weight.normal_(0.0, 4.0 / math.sqrt(2048))
            net.fc.bias.normal_(0.0, 0.1)
            net.train()
            net(_calibration_images(12))
            net.eval()
    state = {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def _calibration_images(n: int) -> torch.Tensor:
    """Gradients with a blob, or stripes, plus noise: uint8 (n, 3, 64, 64) from the current torch RNG."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 64), torch.linspace(0, 1, 64), indexing="ij")
    imgs = []
    for i in range(n):
        a, b = torch.rand(2, 3, 1, 1) * 255
        if i % 2 == 0:
            cy, cx, r = torch.rand(3)
            blob = ((yy - cy) ** 2 + (xx - cx) ** 2 < (0.1 + 0.3 * r) ** 2).float()
            img = (a * xx + b * yy) / 2 + blob * torch.rand(3, 1, 1) * 128
        else:
            freq, phase, tilt = torch.rand(3)
            s = 0.5 + 0.5 * torch.sin(2 * torch.pi * (2 + 6 * freq) * (xx + (2 * tilt - 1) * yy) + 6 * phase)
            img = s * a + (1 - s) * b
        imgs.append((img + torch.randn(3, 64, 64) * 8).clamp(0, 255).to(torch.uint8))
    return torch.stack(imgs)
