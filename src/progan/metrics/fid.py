"""FID, KID and Inception Score from Inception features, in bounded memory, with torch-fidelity's formulas.

- `FeatureSet`: one image set's features, streamed: the sum and the (shifted) sum of outer products in float64
  give the mean and covariance of any number of images in 2 x 2048^2 x 8 bytes; the float32 [N, 2048] features
  (KID draws random subsets of them) and [N, 1008] logits (IS) are kept only when asked for, N <= capacity.
- `frechet_distance`: ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) (Heusel et al. 2017; official ProGAN
  metrics/frechet_inception_distance.py calculate_frechet_distance), via torch_fidelity.metric_fid.
- `kid`: unbiased MMD^2 with the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3, averaged over `subsets`
  random subsets of `subset_size` per set (Binkowski et al. 2018, MMD-GAN compute_scores.py
  polynomial_mmd_averages: 100 subsets of 1000), via torch_fidelity.metric_kid.
- `inception_score`: exp(E_x KL(p(y|x) || p(y))) per split, mean and std over `splits` consecutive splits (official
  ProGAN metrics/inception_score.py get_inception_score: splits=10, logits without bias), via
  torch_fidelity.metric_isc (shuffle off: the official code splits the images in the order given).
- `metric_key`: `fid50k` for 50,000 generated images, `fid10k`, `fid500` (official util_scripts names fid-50k).
"""
from __future__ import annotations

from typing import Callable, Iterable

import numpy as np
import torch

from progan import gpus
from progan.metrics.inception import FEATURE_DIM, LOGITS_DIM


class FeatureSet:
    """Mean and covariance of the `dim`-d (Inception: 2048) features of up to `capacity` images, streamed in batches."""

    def __init__(self, capacity: int, keep_features: bool = True, keep_logits: bool = False, device="cpu",
                 dim: int = FEATURE_DIM):
        self.capacity = int(capacity)
        self.n = 0
        self.device = torch.device(device)
        self._shift = None           # [2048] float64: the first batch's mean (keeps the sums well conditioned)
        self._sum = torch.zeros(dim, dtype=torch.float64, device=self.device)
        self._outer = torch.zeros(dim, dim, dtype=torch.float64, device=self.device)
        self.features = np.empty((self.capacity, dim), np.float32) if keep_features else None
        self.logits = np.empty((self.capacity, LOGITS_DIM), np.float32) if keep_logits else None

    def add(self, features: torch.Tensor, logits: torch.Tensor | None = None) -> None:
        """features [B, dim], logits [B, 1008] (float, any device); the first `capacity` rows overall are used."""
        b = min(len(features), self.capacity - self.n)
        if b <= 0:
            return
        x = features[:b].to(self.device, torch.float64)
        if self._shift is None:
            self._shift = x.mean(0)
        y = x - self._shift
        self._sum += y.sum(0)
        self._outer += y.T @ y
        if self.features is not None:
            self.features[self.n:self.n + b] = features[:b].float().cpu().numpy()
        if self.logits is not None:
            self.logits[self.n:self.n + b] = logits[:b].float().cpu().numpy()
        self.n += b

    def mean(self) -> np.ndarray:
        """[dim] float64."""
        return (self._shift + self._sum / self.n).cpu().numpy()

    def cov(self) -> np.ndarray:
        """[dim, dim] float64, ddof=1 (np.cov(features, rowvar=False), as the reference code)."""
        if self.n < 2:
            raise ValueError(f"a covariance needs at least 2 images, got {self.n}")
        s = self._sum
        return ((self._outer - torch.outer(s, s) / self.n) / (self.n - 1)).cpu().numpy()

    def kept_features(self) -> np.ndarray:
        return self.features[:self.n]

    def kept_logits(self) -> np.ndarray:
        return self.logits[:self.n]


@torch.no_grad()
def extract(net, images: np.ndarray, into: FeatureSet, batch: int, device, tick: Callable[[int], None] | None = None):
    """Run `net` on uint8 [N, R, R, 3] images (numpy or memmap rows) in batches of `batch`; add to `into`.

    On CUDA the convolutions run in full fp32: cuDNN's default TF32 (10-bit mantissa products) moves the features
    by ~1e-3 relative, and the reference numbers come from the fp32 TF graph (tests/test_cuda.py compares CUDA
    with the CPU)."""
    with gpus.fp32_convolutions(device):
        for start in range(0, len(images), batch):
            chunk = np.ascontiguousarray(images[start:start + batch])
            x = torch.from_numpy(chunk).to(device).permute(0, 3, 1, 2)       # [B, 3, R, R] uint8, as the net wants
            features, logits = net(x)
            into.add(features, logits)
            if tick is not None:
                tick(len(chunk))


def extract_all(net, batches: Iterable[np.ndarray], into: FeatureSet, batch: int, device,
                tick: Callable[[int], None] | None = None) -> FeatureSet:
    for images in batches:
        extract(net, images, into, batch, device, tick)
        if into.n >= into.capacity:
            break
    return into


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    a = {"mu": np.asarray(mu1, np.float64), "sigma": np.asarray(sigma1, np.float64)}
    b = {"mu": np.asarray(mu2, np.float64), "sigma": np.asarray(sigma2, np.float64)}
    return float(fid_statistics_to_metric(a, b, verbose=False)[KEY_METRIC_FID])


def kid_subset_size(requested: int, n1: int, n2: int) -> int:
    """The subset size KID uses: the requested one, capped by both set sizes (as clean-fid does)."""
    return int(min(requested, n1, n2))


def kid(features1: np.ndarray, features2: np.ndarray, subsets: int, subset_size: int, seed: int) -> tuple[float, float]:
    """(mean, std) of the unbiased MMD^2 over `subsets` random subsets (numpy RandomState(seed), as the reference)."""
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

    m = kid_subset_size(subset_size, len(features1), len(features2))
    out = kid_features_to_metric(torch.from_numpy(np.asarray(features1)), torch.from_numpy(np.asarray(features2)),
                                 kid_subsets=int(subsets), kid_subset_size=m, rng_seed=int(seed), verbose=False,
                                 kid_kernel="poly", kid_kernel_poly_degree=3, kid_kernel_poly_gamma=None,
                                 kid_kernel_poly_coef0=1)
    return float(out[KEY_METRIC_KID_MEAN]), float(out[KEY_METRIC_KID_STD])


def inception_score(logits: np.ndarray, splits: int) -> tuple[float, float]:
    """(mean, std) over `splits` consecutive splits of the softmax of [N, 1008] logits."""
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric

    out = isc_features_to_metric(torch.from_numpy(np.asarray(logits)), splits=int(splits), shuffle=False)
    return float(out[KEY_METRIC_ISC_MEAN]), float(out[KEY_METRIC_ISC_STD])


def count_tag(n: int) -> str:
    """50000 -> '50k', 10000 -> '10k', 2500 -> '2500'."""
    n = int(n)
    return f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else str(n)


def metric_key(name: str, num_images: int) -> str:
    """'fid', 50000 -> 'fid50k' (the key in eval.json and MLflow)."""
    return f"{name}{count_tag(num_images)}"
