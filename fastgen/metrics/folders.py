r"""FID and SSIM between folders of image files (read with PIL; nothing else is needed).

Images are read with Pillow (imported on first use) in sorted path order, converted to RGB (grey, palette and RGBA files included; alpha is
dropped as PIL's ``convert("RGB")`` does) and turned into float32 ``(3, H, W)`` tensors in [0, 1].
Files are picked by extension (:data:`IMAGE_EXTENSIONS`, any case); ``recursive=True`` walks
sub-folders too.

FID resize modes (how an image reaches the network's 299x299 input):

* ``"legacy"``: pytorch-fid's: the uint8 image / 255 goes to the network, which resizes it bilinearly
  (``F.interpolate``, ``align_corners=False``) inside. FIDs equal ``python -m pytorch_fid A B``.
* ``"clean"``: clean-fid's (Parmar et al. 2022, "On aliased resizing and surprising subtleties in GAN
  evaluation"): each channel, as a float32 PIL image (mode ``'F'``, values 0..255), is resized to
  299x299 with PIL's antialiasing bicubic filter, clipped to [0, 255] and divided by 255; the network's
  own resize is then skipped. clean-fid feeds the same resized pixels to its TorchScript copy of the TF
  graph normalised as ``(x - 128) / 128`` where pytorch-fid's port uses ``x / 127.5 - 1``, so the FIDs
  are close to, not bit-identical with, clean-fid's ``mode="clean"``.

Images of different sizes may share a folder: in ``"legacy"`` mode a batch whose images differ in size
is resized image by image before the network (the same bilinear resize, so the same result).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_EXTENSIONS = (".bmp", ".jpeg", ".jpg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")
RESIZE_MODES = ("legacy", "clean")
FID_SIZE = 299


def _pil_image():
    """PIL.Image, imported on first use (Pillow is needed to read image files, not to import fastgen)."""
    try:
        from PIL import Image
    except ImportError as e:
        raise ImportError(f"reading image files needs Pillow (pip install pillow): {e}") from e
    return Image


def list_images(folder: str | os.PathLike, *, recursive: bool = False) -> list[Path]:
    """Sorted image files of ``folder`` (by :data:`IMAGE_EXTENSIONS`), sub-folders too if ``recursive``.

    FileNotFoundError for a missing folder, NotADirectoryError for a file, ValueError for no images."""
    root = Path(folder)
    if not root.exists():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"{str(root)!r} is not a folder of images")
    walk = root.rglob("*") if recursive else root.iterdir()
    files = sorted(p for p in walk if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        where = " or its sub-folders" if recursive else " (pass recursive=True to search sub-folders)"
        raise ValueError(
            f"image folder {str(root)!r} holds no images{where}; extensions read: {', '.join(IMAGE_EXTENSIONS)}"
        )
    return files


def read_image(path: str | os.PathLike) -> np.ndarray:
    """The image file as an RGB uint8 array ``(H, W, 3)``; ValueError naming the file if PIL cannot read it."""
    Image = _pil_image()
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except FileNotFoundError:
        raise FileNotFoundError(f"image file {str(path)!r} does not exist") from None
    except Exception as e:  # UnidentifiedImageError, truncated files, decoder errors
        raise ValueError(f"cannot read image file {str(path)!r}: {e}") from e


def clean_resize(image: np.ndarray, size: int = FID_SIZE) -> np.ndarray:
    """clean-fid's resize of an ``(H, W, 3)`` image with values 0..255 (uint8 or float) to ``(size, size, 3)``
    float32: per channel, PIL bicubic on a float32 ``'F'`` image (no uint8 rounding), clipped to [0, 255]."""
    if not (isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3):
        raise ValueError(
            f"clean_resize: image must be an (H, W, 3) array, got {getattr(image, 'shape', image)!r}"
        )
    Image = _pil_image()
    channels = []
    for c in range(3):
        ch = Image.fromarray(np.ascontiguousarray(image[:, :, c], dtype=np.float32))  # 2-D float32: mode F
        channels.append(np.asarray(ch.resize((size, size), resample=Image.Resampling.BICUBIC)))
    return np.stack(channels, axis=2).clip(0, 255).astype(np.float32)


class ImageFolder(torch.utils.data.Dataset):
    """The images of a folder as float32 ``(3, H, W)`` tensors in [0, 1] (module docstring).

    ``resize``: ``"legacy"`` keeps the file's size (the FID network resizes); ``"clean"`` returns
    ``(3, 299, 299)`` resized as clean-fid; ``None`` keeps the size (for SSIM). ``files``: the paths.
    """

    def __init__(self, folder: str | os.PathLike, *, resize: str | None = None, recursive: bool = False):
        if resize is not None and resize not in RESIZE_MODES:
            raise ValueError(f"ImageFolder: resize must be one of {RESIZE_MODES} or None, got {resize!r}")
        self.folder = Path(folder)
        self.resize = resize
        self.files = list_images(folder, recursive=recursive)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        img = read_image(self.files[i])
        if self.resize == "clean":
            img = clean_resize(img)
        return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).float().div_(255.0)


def collate_images(images: list[torch.Tensor]) -> torch.Tensor:
    """Stack ``(3, H, W)`` images into a batch; if sizes differ, each is first resized to 299x299 with the
    FID network's bilinear resize (``align_corners=False``), which is what the network would do."""
    if all(im.shape == images[0].shape for im in images):
        return torch.stack(images)
    return torch.cat(
        [
            F.interpolate(im[None], size=(FID_SIZE, FID_SIZE), mode="bilinear", align_corners=False)
            for im in images
        ]
    )


def _check_batch_size(batch_size) -> None:
    if not (isinstance(batch_size, int) and not isinstance(batch_size, bool) and batch_size >= 1):
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")


def iter_batches(
    dataset: ImageFolder, batch_size: int, *, progress: bool = True, desc: str | None = None
) -> Iterator[torch.Tensor]:
    """Batches ``(B, 3, H, W)`` of ``dataset`` in order, with a tqdm bar counting images (``progress``)."""
    from tqdm.auto import tqdm

    _check_batch_size(batch_size)
    n = len(dataset)
    with tqdm(total=n, unit="img", desc=desc or str(dataset.folder), disable=not progress) as bar:
        for start in range(0, n, batch_size):
            batch = [dataset[i] for i in range(start, min(start + batch_size, n))]
            yield collate_images(batch)
            bar.update(len(batch))


def fid_folders(
    dir_a: str | os.PathLike,
    dir_b: str | os.PathLike,
    *,
    weights: str | os.PathLike | None = None,
    batch_size: int = 50,
    device: torch.device | str | None = None,
    resize: str = "legacy",
    progress: bool = True,
    extractor: torch.nn.Module | Callable[[torch.Tensor], torch.Tensor] | None = None,
    recursive: bool = False,
) -> float:
    """FID between the images of two folders (``dir_a`` is the "real" set; FID is symmetric anyway).

    ``weights``: the ``pt_inception-2015-12-05-6726825d.pth`` file (see
    :func:`fastgen.metrics.inception.load_fid_inception`); with ``resize="legacy"`` the value is
    pytorch-fid's. ``extractor``: instead of the Inception network, any module / callable mapping a batch
    ``(B, 3, H, W)`` in [0, 1] to features ``(B, F)`` (``weights`` is then not used). ``resize``:
    ``"legacy"`` or ``"clean"`` (module docstring). ``device``: where the network runs (default: CUDA if
    available, else CPU). Statistics are accumulated in float64 by :class:`fastgen.metrics.FID`.
    Each folder needs at least 2 images (ValueError).
    """
    from fastgen.metrics.fid import FID

    if resize not in RESIZE_MODES:
        raise ValueError(f"fid_folders: resize must be one of {RESIZE_MODES}, got {resize!r}")
    _check_batch_size(batch_size)
    # read the folder listings before loading a 100 MB network: bad paths fail fast
    sets = [ImageFolder(d, resize=resize, recursive=recursive) for d in (dir_a, dir_b)]
    for name, ds in zip(("dir_a", "dir_b"), sets):
        if len(ds) < 2:
            raise ValueError(
                f"fid_folders: {name} ({str(ds.folder)!r}) has {len(ds)} image; FID needs at least 2 per folder "
                "(and thousands for a meaningful value: published FIDs use 10k-50k)"
            )
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if extractor is None:
        if weights is None:
            from fastgen.metrics.inception import FID_WEIGHTS_NAME, FID_WEIGHTS_URL

            raise ValueError(
                f"fid_folders: pass weights=<path to {FID_WEIGHTS_NAME}> (from {FID_WEIGHTS_URL}) "
                "or an extractor"
            )
        from fastgen.metrics.inception import load_fid_inception

        extractor = load_fid_inception(weights, device=device)
    fid = FID(extractor, device=device)
    for real, ds in zip((True, False), sets):
        for batch in iter_batches(
            ds, batch_size, progress=progress, desc=f"FID {ds.folder.name or ds.folder}"
        ):
            fid.update(batch.to(device), real=real)
    return fid.compute()


def _pair_files(dir_a: Path, dir_b: Path, recursive: bool) -> list[tuple[Path, Path]]:
    files_a = {p.relative_to(dir_a).as_posix(): p for p in list_images(dir_a, recursive=recursive)}
    files_b = {p.relative_to(dir_b).as_posix(): p for p in list_images(dir_b, recursive=recursive)}
    only_a = sorted(set(files_a) - set(files_b))
    only_b = sorted(set(files_b) - set(files_a))
    if only_a or only_b:
        raise ValueError(
            f"ssim_folders: the folders must hold the same file names; only in {str(dir_a)!r}: {only_a[:5]}"
            f"{' ...' if len(only_a) > 5 else ''}, only in {str(dir_b)!r}: {only_b[:5]}"
            f"{' ...' if len(only_b) > 5 else ''}"
        )
    return [(files_a[k], files_b[k]) for k in sorted(files_a)]


def _ssim_pair(path_a, path_b, device, ssim_kwargs) -> float:
    from fastgen.metrics.ssim import ssim

    a, b = read_image(path_a), read_image(path_b)
    if a.shape != b.shape:
        raise ValueError(
            f"SSIM needs images of the same size: {str(path_a)!r} is {a.shape[1]}x{a.shape[0]}, "
            f"{str(path_b)!r} is {b.shape[1]}x{b.shape[0]} (width x height)"
        )
    ta, tb = (torch.from_numpy(x.transpose(2, 0, 1).copy())[None].to(device).float() / 255.0 for x in (a, b))
    try:
        return float(ssim(ta, tb, data_range=1.0, **ssim_kwargs))
    except ValueError as e:
        raise ValueError(f"SSIM of {str(path_a)!r} and {str(path_b)!r}: {e}") from e


def ssim_files(
    path_a: str | os.PathLike,
    path_b: str | os.PathLike,
    *,
    device: torch.device | str | None = None,
    **ssim_kwargs,
) -> float:
    """SSIM of two image files of the same size (RGB in [0, 1], per channel, averaged; see
    :func:`fastgen.metrics.ssim`, whose keyword arguments ``ssim_kwargs`` passes on, e.g. ``window_size``).
    Images must be at least ``window_size`` (11) pixels on each side."""
    for name, p in (("path_a", path_a), ("path_b", path_b)):
        if not Path(p).is_file():
            raise FileNotFoundError(f"ssim_files: {name} {str(p)!r} is not an image file")
    return _ssim_pair(path_a, path_b, device or "cpu", ssim_kwargs)


def ssim_folders(
    dir_a: str | os.PathLike,
    dir_b: str | os.PathLike,
    *,
    recursive: bool = False,
    progress: bool = True,
    device: torch.device | str | None = None,
    return_per_file: bool = False,
    **ssim_kwargs,
):
    """Mean SSIM over the image pairs of two folders, paired by file name (relative path if
    ``recursive``). Both folders must hold the same names and each pair the same size (ValueError naming
    the files). ``return_per_file``: also return ``{relative name: ssim}``. Other keywords go to
    :func:`fastgen.metrics.ssim`."""
    from tqdm.auto import tqdm

    dir_a, dir_b = Path(dir_a), Path(dir_b)
    pairs = _pair_files(dir_a, dir_b, recursive)
    dev = device or "cpu"
    per_file = {}
    for pa, pb in tqdm(pairs, unit="img", desc="SSIM", disable=not progress):
        per_file[pa.relative_to(dir_a).as_posix()] = _ssim_pair(pa, pb, dev, ssim_kwargs)
    mean = float(np.mean(list(per_file.values())))
    return (mean, per_file) if return_per_file else mean
