"""Evaluation metrics: FID (streaming), Inception Score, SSIM / MS-SSIM (fused Triton kernel), PSNR.

Nothing here needs scipy, scikit-image or torchvision at import time.
"""

from fastgen.metrics.fid import FID, frechet_distance, load_inception_features
from fastgen.metrics.inception_score import inception_score
from fastgen.metrics.ssim import MS_SSIM_WEIGHTS, ms_ssim, psnr, ssim

__all__ = [
    "FID",
    "MS_SSIM_WEIGHTS",
    "frechet_distance",
    "inception_score",
    "load_inception_features",
    "ms_ssim",
    "psnr",
    "ssim",
]

# pytorch-fid's TF-Inception FID network and folder-level FID / SSIM (Pillow is imported on first use)
from fastgen.metrics.folders import fid_folders, ssim_files, ssim_folders
from fastgen.metrics.inception import FIDInceptionV3, load_fid_inception

__all__ += ["FIDInceptionV3", "fid_folders", "load_fid_inception", "ssim_files", "ssim_folders"]
