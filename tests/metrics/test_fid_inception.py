"""The TF-Inception FID network (fastgen.metrics.inception) against an independently written layer table.

No real weights are available offline, so the checks are structural: the exact state_dict key list and
shapes of pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (torchvision ``Inception3`` names, 1008
classes, no AuxLogits), the parameter count, the TF-specific pooling of each block type, the spatial
sizes torchvision documents for a 299x299 input, the input resize / normalisation, and strict loading.
"""

import os

import pytest
import torch
import torch.nn.functional as F

from fastgen.metrics.inception import (
    FID_WEIGHTS_NAME,
    FID_WEIGHTS_URL,
    FIDInceptionE,
    FIDInceptionV3,
    check_fid_state_dict,
    load_fid_inception,
)

# ---- the expected layer table, written from torchvision's Inception3 definition -------------------
# (name, in channels, out channels, kernel (kh, kw)) of every BasicConv2d.


def _block_a(p, cin, pool):
    return [
        (f"{p}.branch1x1", cin, 64, (1, 1)),
        (f"{p}.branch5x5_1", cin, 48, (1, 1)),
        (f"{p}.branch5x5_2", 48, 64, (5, 5)),
        (f"{p}.branch3x3dbl_1", cin, 64, (1, 1)),
        (f"{p}.branch3x3dbl_2", 64, 96, (3, 3)),
        (f"{p}.branch3x3dbl_3", 96, 96, (3, 3)),
        (f"{p}.branch_pool", cin, pool, (1, 1)),
    ]


def _block_c(p, c7):
    return [
        (f"{p}.branch1x1", 768, 192, (1, 1)),
        (f"{p}.branch7x7_1", 768, c7, (1, 1)),
        (f"{p}.branch7x7_2", c7, c7, (1, 7)),
        (f"{p}.branch7x7_3", c7, 192, (7, 1)),
        (f"{p}.branch7x7dbl_1", 768, c7, (1, 1)),
        (f"{p}.branch7x7dbl_2", c7, c7, (7, 1)),
        (f"{p}.branch7x7dbl_3", c7, c7, (1, 7)),
        (f"{p}.branch7x7dbl_4", c7, c7, (7, 1)),
        (f"{p}.branch7x7dbl_5", c7, 192, (1, 7)),
        (f"{p}.branch_pool", 768, 192, (1, 1)),
    ]


def _block_e(p, cin):
    return [
        (f"{p}.branch1x1", cin, 320, (1, 1)),
        (f"{p}.branch3x3_1", cin, 384, (1, 1)),
        (f"{p}.branch3x3_2a", 384, 384, (1, 3)),
        (f"{p}.branch3x3_2b", 384, 384, (3, 1)),
        (f"{p}.branch3x3dbl_1", cin, 448, (1, 1)),
        (f"{p}.branch3x3dbl_2", 448, 384, (3, 3)),
        (f"{p}.branch3x3dbl_3a", 384, 384, (1, 3)),
        (f"{p}.branch3x3dbl_3b", 384, 384, (3, 1)),
        (f"{p}.branch_pool", cin, 192, (1, 1)),
    ]


CONVS = [
    ("Conv2d_1a_3x3", 3, 32, (3, 3)),
    ("Conv2d_2a_3x3", 32, 32, (3, 3)),
    ("Conv2d_2b_3x3", 32, 64, (3, 3)),
    ("Conv2d_3b_1x1", 64, 80, (1, 1)),
    ("Conv2d_4a_3x3", 80, 192, (3, 3)),
    *_block_a("Mixed_5b", 192, 32),
    *_block_a("Mixed_5c", 256, 64),
    *_block_a("Mixed_5d", 288, 64),
    ("Mixed_6a.branch3x3", 288, 384, (3, 3)),
    ("Mixed_6a.branch3x3dbl_1", 288, 64, (1, 1)),
    ("Mixed_6a.branch3x3dbl_2", 64, 96, (3, 3)),
    ("Mixed_6a.branch3x3dbl_3", 96, 96, (3, 3)),
    *_block_c("Mixed_6b", 128),
    *_block_c("Mixed_6c", 160),
    *_block_c("Mixed_6d", 160),
    *_block_c("Mixed_6e", 192),
    ("Mixed_7a.branch3x3_1", 768, 192, (1, 1)),
    ("Mixed_7a.branch3x3_2", 192, 320, (3, 3)),
    ("Mixed_7a.branch7x7x3_1", 768, 192, (1, 1)),
    ("Mixed_7a.branch7x7x3_2", 192, 192, (1, 7)),
    ("Mixed_7a.branch7x7x3_3", 192, 192, (7, 1)),
    ("Mixed_7a.branch7x7x3_4", 192, 192, (3, 3)),
    *_block_e("Mixed_7b", 1280),
    *_block_e("Mixed_7c", 2048),
]


def expected_shapes(with_num_batches_tracked=True):
    want = {}
    for name, cin, cout, (kh, kw) in CONVS:
        want[f"{name}.conv.weight"] = (cout, cin, kh, kw)
        for s in ("weight", "bias", "running_mean", "running_var"):
            want[f"{name}.bn.{s}"] = (cout,)
        if with_num_batches_tracked:
            want[f"{name}.bn.num_batches_tracked"] = ()
    want["fc.weight"] = (1008, 2048)
    want["fc.bias"] = (1008,)
    return want


@pytest.fixture(scope="module")
def net():
    return FIDInceptionV3()


def test_state_dict_keys_and_shapes(net):
    got = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert len(CONVS) == 94
    assert got == expected_shapes()  # same keys, same shapes
    assert len(got) == 94 * 6 + 2
    # no AuxLogits, no conv bias (TF folds it into the batch norm)
    assert not any(k.startswith("AuxLogits") or k.endswith("conv.bias") for k in got)


def test_parameter_count(net):
    # torchvision documents inception_v3 (IMAGENET1K_V1) with num_params 27,161,264: 1000 classes and the
    # auxiliary classifier, whose conv0 (768->128, 1x1 + bn), conv1 (128->768, 5x5 + bn) and fc (768->1000)
    # hold 98,560 + 2,459,136 + 769,000 = 3,326,696. The FID network drops AuxLogits and has 1008 classes
    # (+8 rows of 2048 weights and 8 biases): 27,161,264 - 3,326,696 + 8 * 2049 = 23,850,960.
    aux = (768 * 128 + 2 * 128) + (128 * 768 * 25 + 2 * 768) + (768 * 1000 + 1000)
    assert aux == 3_326_696
    want = 27_161_264 - aux + 8 * 2049
    assert want == 23_850_960
    assert sum(p.numel() for p in net.parameters()) == want


def _identity_pool_branch(block, cin, cout):
    """branch_pool -> (first cout input channels, unchanged): 1x1 conv = [I 0], batch norm = identity."""
    with torch.no_grad():
        w = torch.zeros(cout, cin, 1, 1)
        w[torch.arange(cout), torch.arange(cout)] = 1.0
        block.branch_pool.conv.weight.copy_(w)
        bn = block.branch_pool.bn
        bn.weight.fill_(1.0), bn.bias.zero_(), bn.running_mean.zero_(), bn.running_var.fill_(1.0 - bn.eps)
    return block.eval()


@pytest.mark.parametrize(
    "name,cin,cout", [("Mixed_5b", 192, 32), ("Mixed_6b", 768, 192), ("Mixed_7b", 1280, 192)]
)
def test_average_pool_branches_exclude_padding(net, name, cin, cout):
    # TF's SAME average pool of a constant map is that constant, corners included; count_include_pad=True
    # (torchvision's InceptionA/C/E) would give 4/9 of it at the corners and 6/9 on the edges.
    block = _identity_pool_branch(getattr(net, name), cin, cout)
    with torch.no_grad():
        out = block(torch.full((1, cin, 5, 6), 0.75))[:, -cout:]
    torch.testing.assert_close(out, torch.full_like(out, 0.75), rtol=1e-6, atol=1e-6)


def test_last_block_max_pools():
    # Mixed_7c (pytorch-fid's FIDInceptionE_2) max-pools: a single spike v spreads unchanged to its 3x3
    # neighbourhood; an average pool would give v / 9.
    block = _identity_pool_branch(FIDInceptionE(2048, max_pool=True), 2048, 192)
    x = torch.zeros(1, 2048, 6, 6)
    x[0, 5, 2, 3] = 9.0
    with torch.no_grad():
        out = block(x)[0, -192 + 5]
    want = torch.zeros(6, 6)
    want[1:4, 2:5] = 9.0
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)


def test_input_resize_and_normalisation():
    stem = FIDInceptionV3(dims=64).eval()  # stops after the first max pool: cheap, same preprocessing
    x = torch.rand(1, 3, 64, 48, generator=torch.Generator().manual_seed(1))
    x299 = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
    torch.testing.assert_close(stem.preprocess(x), 2 * x299 - 1)
    x299n = F.interpolate(x, size=(299, 299), mode="nearest")
    assert not torch.allclose(stem.preprocess(x), 2 * x299n - 1)  # the resize is bilinear, not any resize
    with torch.no_grad():
        got = stem(x)
        torch.testing.assert_close(got, stem(x299))
        assert got.shape == (1, 64)
    y = torch.rand(1, 3, 299, 299, dtype=torch.float64)
    assert torch.equal(stem.preprocess(y), 2 * y.float() - 1)  # 299x299 goes in as it is
    for dims in (192, 768):
        stem.dims = dims
        with torch.no_grad():
            assert stem(torch.rand(1, 3, 75, 75)).shape == (1, dims)


def test_bad_inputs(net):
    stem = net
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        stem(torch.rand(3, 64, 64))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        stem(torch.rand(1, 1, 64, 64))
    with pytest.raises(TypeError, match="images"):
        stem([[0.0]])
    with pytest.raises(ValueError, match="dims"):
        FIDInceptionV3(dims=1000)


def random_fid_state_dict(seed=0):
    """The release file's layout (no num_batches_tracked) with random weights that keep activations O(1)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for k, shape in expected_shapes(with_num_batches_tracked=False).items():
        if k.endswith("conv.weight"):
            fan_in = shape[1] * shape[2] * shape[3]
            state[k] = torch.randn(shape, generator=g) * (2.0 / fan_in) ** 0.5
        elif k.endswith("bn.running_var") or k.endswith("bn.weight"):
            state[k] = 0.5 + torch.rand(shape, generator=g)
        elif k.startswith("fc."):
            state[k] = torch.randn(shape, generator=g) * 0.02
        else:  # bn.bias, bn.running_mean
            state[k] = 0.1 * torch.randn(shape, generator=g)
    return state


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("fidw") / FID_WEIGHTS_NAME
    torch.save(random_fid_state_dict(), path)
    return path


def test_load_and_forward_features(weights_file):
    state = torch.load(weights_file, weights_only=True)
    net = load_fid_inception(weights_file)
    assert not net.training and not any(m.training for m in net.modules())
    assert not any(p.requires_grad for p in net.parameters())
    loaded = net.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    # the directory holding the file works too
    assert load_fid_inception(os.path.dirname(weights_file), dims=64).dims == 64

    # spatial sizes torchvision's Inception3 documents for a 299x299 input
    want = {
        "Conv2d_1a_3x3": (32, 149),
        "Conv2d_2a_3x3": (32, 147),
        "Conv2d_2b_3x3": (64, 147),
        "Conv2d_3b_1x1": (80, 73),
        "Conv2d_4a_3x3": (192, 71),
        "Mixed_5b": (256, 35),
        "Mixed_5c": (288, 35),
        "Mixed_5d": (288, 35),
        "Mixed_6a": (768, 17),
        "Mixed_6e": (768, 17),
        "Mixed_7a": (1280, 8),
        "Mixed_7b": (2048, 8),
        "Mixed_7c": (2048, 8),
    }
    seen = {}

    def record(name):
        def hook(module, args, out):
            seen[name] = tuple(out.shape[1:])

        return hook

    hooks = [getattr(net, n).register_forward_hook(record(n)) for n in want]
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        feats = net(x)
    for h in hooks:
        h.remove()
    assert seen == {n: (c, s, s) for n, (c, s) in want.items()}
    assert feats.shape == (2, 2048) and feats.dtype == torch.float32
    assert torch.isfinite(feats).all() and (feats >= 0).all()  # a mean of ReLU outputs
    assert feats.std() > 1e-3 and not torch.allclose(feats[0], feats[1])


def test_strict_loading_names_bad_keys(tmp_path, weights_file):
    good = torch.load(weights_file, weights_only=True)
    with torch.device("meta"):
        meta_net = FIDInceptionV3()
    check_fid_state_dict(meta_net, good)  # the release layout passes

    renamed = dict(good)
    renamed["Mixed_6c.branch_pool.conv.wieght"] = renamed.pop("Mixed_6c.branch_pool.conv.weight")
    p = tmp_path / "renamed.pth"
    torch.save(renamed, p)
    with pytest.raises(ValueError, match=r"missing 1 keys \['Mixed_6c.branch_pool.conv.weight'\]") as e:
        load_fid_inception(p)
    assert "Mixed_6c.branch_pool.conv.wieght" in str(e.value) and "renamed.pth" in str(e.value)

    aux = dict(good, **{"AuxLogits.fc.weight": torch.zeros(1000, 768)})
    with pytest.raises(ValueError, match=r"unexpected 1 keys.*AuxLogits\.fc\.weight"):
        check_fid_state_dict(meta_net, aux)

    wrong = dict(good, **{"fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)})
    with pytest.raises(ValueError, match=r"fc.weight: \(1000, 2048\) \(expected \(1008, 2048\)\)"):
        check_fid_state_dict(meta_net, wrong)

    with_nbt = dict(good, **{"Conv2d_1a_3x3.bn.num_batches_tracked": torch.tensor(5)})
    p = tmp_path / "nbt.pth"
    torch.save(with_nbt, p)
    net = load_fid_inception(p, dims=64)  # present or absent: both load
    assert int(net.Conv2d_1a_3x3.bn.num_batches_tracked) == 5
    assert int(net.Mixed_7c.branch_pool.bn.num_batches_tracked) == 0

    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"junk\.pth"):
        load_fid_inception(tmp_path / "junk.pth")


def test_missing_file_says_where_it_comes_from(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        load_fid_inception(tmp_path / "nope.pth")
    msg = str(e.value)
    assert "nope.pth" in msg and FID_WEIGHTS_NAME in msg and FID_WEIGHTS_URL in msg
    assert FID_WEIGHTS_URL.startswith("https://github.com/mseitzer/pytorch-fid/releases/")
    with pytest.raises(FileNotFoundError, match=FID_WEIGHTS_NAME):
        load_fid_inception(tmp_path)  # a directory without the file
