"""Evaluation metrics. The paper's §5: sliced Wasserstein distance on Laplacian pyramid neighbourhoods
(`swd.swd`, torch; `swd_reference.swd`, the numpy/scipy port of the official code it is tested against)
and MS-SSIM between generated pairs (`msssim.msssim`). The ones every later paper reports: FID, KID and
Inception Score on the TF-Inception features through torch-fidelity (`inception`: the network and its pinned
weights; `fid`: streaming statistics and the formulas; `real_stats`: the reals' statistics file and scoring).
`registry.METRICS` names them all for `evaluate.metrics`; `progan evaluate` (progan/evaluate.py) runs them.
"""
from __future__ import annotations

import numpy as np


class Rows:
    """Rows `index` of an [N, ...] array or memmap, read only when sliced (batched passes over a subset)."""

    def __init__(self, array, index):
        self.array, self.index = array, np.asarray(index)
        self.shape = (len(self.index), *array.shape[1:])

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, item):
        return self.array[self.index[item]]
