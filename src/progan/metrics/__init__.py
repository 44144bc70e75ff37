"""Evaluation metrics of the paper's §5: sliced Wasserstein distance on Laplacian pyramid neighbourhoods
(`swd.swd`, torch; `swd_reference.swd`, the numpy/scipy port of the official code it is tested against)
and MS-SSIM between generated pairs (`msssim.msssim`). `progan evaluate` (progan/evaluate.py) runs them.
"""
