r"""The TF-Inception-v3 FID network (pytorch-fid's port of ``inception-2015-12-05``) in plain torch.

Published FIDs (TTUR, pytorch-fid, clean-fid, torch-fidelity) all use the Inception-v3 graph that
TensorFlow released in 2015 (``inception-2015-12-05.tgz``). pytorch-fid ported its weights to a
``torchvision``-style ``Inception3`` state_dict, ``pt_inception-2015-12-05-6726825d.pth``, from

    https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth

:class:`FIDInceptionV3` is that network without torchvision; its parameter names are torchvision's
(``Conv2d_1a_3x3.conv.weight``, ``Mixed_5b.branch_pool.bn.running_var``, ..., ``fc.weight``), so the file
loads as it is. The graph differs from torchvision's ImageNet Inception-v3 in four ways, all reproduced:

* the average-pool branch of the ``Mixed_5*``, ``Mixed_6b-e`` and ``Mixed_7b`` blocks averages over the
  pixels inside the image only (TensorFlow's ``SAME`` average pool: ``count_include_pad=False``);
* the pool branch of ``Mixed_7c`` is a 3x3 **max** pool (stride 1, padding 1), not an average pool;
* the classifier has 1008 outputs (unused for FID);
* there is no auxiliary classifier.

Every convolution is ``BasicConv2d``: a bias-free ``Conv2d``, ``BatchNorm2d(eps=0.001)`` and ReLU.

Input handling is pytorch-fid's: images ``(N, 3, H, W)`` with values in [0, 1] are resized to 299x299 by
``F.interpolate(mode="bilinear", align_corners=False)`` (skipped when already 299x299, where it is the
identity anyway), mapped to [-1, 1] by ``2 x - 1``, and the output is the 2048-d ``pool3`` feature: the
final ``Mixed_7c`` map averaged over space, ``(N, 2048)``. ``dims`` 64 / 192 / 768 instead return the
space-averaged maps after the first max pool, the second max pool and ``Mixed_6e`` (pytorch-fid's
``--dims``), and stop the forward early.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
FEATURE_DIMS = (64, 192, 768, 2048)


class BasicConv2d(nn.Module):
    """Conv2d (no bias) -> BatchNorm2d(eps=0.001) -> ReLU; state_dict keys ``conv.*`` and ``bn.*``."""

    def __init__(self, cin: int, cout: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _tf_avg_pool(x: torch.Tensor) -> torch.Tensor:
    # TensorFlow's SAME average pool divides by the number of pixels inside the image
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(nn.Module):
    """Mixed_5b/5c/5d: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avg-pool(TF)-1x1 -> 224 + pool_features channels."""

    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_tf_avg_pool(x))
        return torch.cat([b1, b5, b3, bp], 1)


class InceptionB(nn.Module):
    """Mixed_6a (grid reduction 35 -> 17): 3x3/2 | 1x1-3x3-3x3/2 | max-pool/2 -> 480 + cin channels."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([b3, bd, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class FIDInceptionC(nn.Module):
    """Mixed_6b-e: factorised 7x7 branches (1x7 / 7x1 convs) and an avg-pool(TF) branch -> 768 channels."""

    def __init__(self, cin: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = conv(bd)
        bp = self.branch_pool(_tf_avg_pool(x))
        return torch.cat([b1, b7, bd, bp], 1)


class InceptionD(nn.Module):
    """Mixed_7a (grid reduction 17 -> 8): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | max-pool/2 -> 512 + cin."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_1(x)
        for conv in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = conv(b7)
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class FIDInceptionE(nn.Module):
    """Mixed_7b (``max_pool=False``: avg-pool(TF) branch) and Mixed_7c (``max_pool=True``) -> 2048 channels.

    1x1 | 1x1-(1x3, 3x1) | 1x1-3x3-(1x3, 3x1) | pool-1x1 with 320 + 768 + 768 + 192 output channels.
    """

    def __init__(self, cin: int, *, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        if self.max_pool:  # the TF graph's last block max-pools here (pytorch-fid's FIDInceptionE_2)
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        else:
            pooled = _tf_avg_pool(x)
        return torch.cat([b1, b3, bd, self.branch_pool(pooled)], 1)


class FIDInceptionV3(nn.Module):
    """The FID Inception-v3 (module docstring): images in [0, 1] ``(N, 3, H, W)`` -> features ``(N, dims)``.

    ``dims``: 2048 (``pool3``, the standard FID feature), or 64 / 192 / 768 (earlier, space-averaged
    maps). ``resize_input``: bilinear resize to 299x299 when the input is not that size (turn off to feed
    other sizes to the fully convolutional trunk); ``normalize_input``: ``2 x - 1``. The module is built
    with PyTorch's default initialisation; load the TF weights with :func:`load_fid_inception`.
    """

    def __init__(self, *, dims: int = 2048, resize_input: bool = True, normalize_input: bool = True):
        super().__init__()
        if dims not in FEATURE_DIMS:
            raise ValueError(f"FIDInceptionV3: dims must be one of {FEATURE_DIMS}, got {dims!r}")
        self.dims = dims
        self.resize_input = bool(resize_input)
        self.normalize_input = bool(normalize_input)
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = FIDInceptionE(1280, max_pool=False)
        self.Mixed_7c = FIDInceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)  # the TF graph's softmax layer; in the weights file, unused here

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Check ``(N, 3, H, W)``, cast to float32, resize to 299x299 (bilinear) and map [0, 1] to [-1, 1]."""
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"FIDInceptionV3: images must be a torch.Tensor, got {type(images).__name__}")
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(
                f"FIDInceptionV3: images must be (N, 3, H, W) with values in [0, 1], got {tuple(images.shape)}"
            )
        x = images.float()
        if self.resize_input and x.shape[-2:] != (299, 299):
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return 2 * x - 1 if self.normalize_input else x

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(images)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        if self.dims == 64:
            return x.mean((2, 3))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        if self.dims == 192:
            return x.mean((2, 3))
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e"):
            x = getattr(self, "Mixed_" + name)(x)
        if self.dims == 768:
            return x.mean((2, 3))
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))
        return x.mean((2, 3))  # adaptive average pool to 1x1, flattened: (N, 2048)


def _read_state_dict(path: str) -> dict:
    if os.path.isdir(path):
        path = os.path.join(path, FID_WEIGHTS_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"load_fid_inception: weights file {path!r} not found. The FID Inception weights are "
            f"{FID_WEIGHTS_NAME} from the pytorch-fid GitHub release: {FID_WEIGHTS_URL} "
            "(download it where downloads are allowed and pass its path; fastgen downloads nothing)"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"load_fid_inception: cannot read {path!r} as a torch state_dict: {e}") from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"load_fid_inception: {path!r} does not hold a state_dict of tensors")
    return state


def check_fid_state_dict(net: FIDInceptionV3, state: dict, source: str = "state_dict") -> None:
    """ValueError unless ``state`` has exactly ``net``'s keys and shapes (BatchNorm
    ``num_batches_tracked`` may be absent; the release file, saved by an old PyTorch, has none)."""
    want = net.state_dict()
    missing = [k for k in want if k not in state and not k.endswith(".num_batches_tracked")]
    unexpected = [k for k in state if k not in want]
    shapes = [
        f"{k}: {tuple(state[k].shape)} (expected {tuple(v.shape)})"
        for k, v in want.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} keys {missing[:6]}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} keys {unexpected[:6]}")
    if shapes:
        problems.append(f"wrong shapes {shapes[:6]}")
    if problems:
        raise ValueError(
            f"load_fid_inception: {source} is not the FID Inception-v3 state_dict ({FID_WEIGHTS_NAME}): "
            + "; ".join(problems)
        )


def load_fid_inception(
    path: str | os.PathLike, device: torch.device | str | None = None, *, dims: int = 2048
) -> FIDInceptionV3:
    """:class:`FIDInceptionV3` with the weights of ``path``, in eval mode, gradients off. Nothing is downloaded.

    ``path``: the file ``pt_inception-2015-12-05-6726825d.pth`` (or a directory holding it), a
    ``torch.save``-d state_dict with torchvision ``Inception3`` names, 1008 classes and no ``AuxLogits``;
    read with ``weights_only=True`` (no code runs). Keys and shapes must match exactly (ValueError naming
    the offending keys), except that BatchNorm ``num_batches_tracked`` entries may be absent.
    A missing file is a FileNotFoundError that says where the file comes from (:data:`FID_WEIGHTS_URL`).
    ``device``: where the module goes (default CPU); ``dims``: as :class:`FIDInceptionV3`.
    """
    path = os.fspath(path)
    state = _read_state_dict(path)
    with torch.device("meta"):  # no random initialisation of 24M parameters that are overwritten next
        net = FIDInceptionV3(dims=dims)
    check_fid_state_dict(net, state, source=repr(path))
    net.to_empty(device="cpu")
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.num_batches_tracked.zero_()  # not in the release file; unused in eval mode
    net.load_state_dict(state, strict=False)  # only num_batches_tracked can be left out (checked above)
    net.requires_grad_(False)
    return net.eval().to(device if device is not None else "cpu")
