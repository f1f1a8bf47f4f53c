"""Bad arguments of the model entry points: a ValueError naming the argument before any compute, never a
silently wrong result (NaN sampling scales, float timesteps, out-of-range ids, a zero grid)."""

import math

import numpy as np
import pytest
import torch

from fastgen.models import clip, dalle, glam, glide
from fastgen.models.common import sample_logits


@pytest.fixture(scope="module")
def glam_model():
    torch.manual_seed(0)
    return glam.GLaM(glam.from_name("glam-tiny"))


@pytest.fixture(scope="module")
def dalle_model():
    torch.manual_seed(0)
    model = dalle.DALLE(dalle.from_name("dalle-tiny")).eval()
    model.attention_impl = "torch"  # the checks are under test, not the attention kernels
    return model


@pytest.fixture(scope="module")
def glide_model():
    torch.manual_seed(0)
    return glide.GLIDE(glide.from_name("glide-tiny"))


BAD_SAMPLING = [
    ({"temperature": math.nan}, "temperature"),
    ({"temperature": math.inf}, "temperature"),
    ({"temperature": -1.0}, "temperature"),
    ({"top_k": 2.5}, "top_k"),
    ({"top_k": True}, "top_k"),
    ({"top_k": 0}, "top_k"),
    ({"top_p": math.nan}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
]


@pytest.mark.parametrize("kw,name", BAD_SAMPLING)
def test_glam_generate_rejects_bad_sampling_args(glam_model, kw, name):
    with pytest.raises(ValueError, match=name):
        glam_model.generate(torch.zeros(1, 2, dtype=torch.long), 2, **kw)


@pytest.mark.parametrize(
    "kw,name",
    [({"eos_id": 1.5}, "eos_id"), ({"eos_id": -1}, "eos_id"), ({"max_new_tokens": True}, "max_new")],
)
def test_glam_generate_rejects_bad_ints(glam_model, kw, name):
    kw = {"max_new_tokens": 2, **kw}
    with pytest.raises(ValueError, match=name):
        glam_model.generate(torch.zeros(1, 2, dtype=torch.long), **kw)


def test_glam_rejects_float_targets_and_nan_grad_norm(glam_model):
    tokens = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="targets must be an integer tensor"):
        glam_model(tokens, tokens.float() + 0.5)
    with pytest.raises(ValueError, match="max_grad_norm"):  # raised before the optimizer is touched
        glam.train_step(glam_model, torch.zeros(1, 5, dtype=torch.long), None, max_grad_norm=math.nan)


@pytest.mark.parametrize(
    "kw,name",
    [*BAD_SAMPLING, ({"cond_scale": math.nan}, "cond_scale"), ({"cond_scale": math.inf}, "cond_scale")],
)
def test_dalle_generate_rejects_bad_sampling_args(dalle_model, kw, name):
    with pytest.raises(ValueError, match=name):
        dalle_model.generate_images(torch.ones(1, 3, dtype=torch.long), progress=False, **kw)


@pytest.mark.parametrize("grid", [0, -2, 2.0, True])
def test_dalle_rejects_bad_grid(dalle_model, grid):
    text = torch.ones(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="grid"):
        dalle_model.generate_images(text, grid=grid, progress=False)
    with pytest.raises(ValueError, match="grid"):
        dalle_model.logits(text, grid=grid)


def test_dalle_grid_none_is_default_and_mismatch_is_named(dalle_model):
    text = torch.ones(1, 3, dtype=torch.long)
    assert dalle_model.logits(text, grid=None)[1].shape == (1, 1, 32)
    assert dalle_model.logits(text, grid=np.int64(3))[1].shape == (1, 1, 32)
    with pytest.raises(ValueError, match="grid 3 does not match"):
        dalle_model.logits(text, torch.zeros(1, 4, 4, dtype=torch.long), grid=3)


def test_sample_logits_rejects_nan_temperature():
    with pytest.raises(ValueError, match="temperature"):
        sample_logits(torch.zeros(2, 5), temperature=math.nan)


@pytest.mark.parametrize("ids,lo,hi", [([[1, 258]], 1, 258), ([[-1, 3]], -1, 3)])
def test_clip_encode_text_rejects_out_of_range_ids(ids, lo, hi):
    model = clip.from_name("tiny")
    with pytest.raises(ValueError, match=rf"text must lie in \[0, 258\), got values in \[{lo}, {hi}\]"):
        model.encode_text(torch.tensor(ids))


def test_clip_encode_text_rejects_empty_and_non_tensor_text():
    model = clip.from_name("tiny")
    with pytest.raises(ValueError, match="length >= 1"):
        model.encode_text(torch.zeros(2, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="token ids"):
        model.encode_text([[1, 2]])
    with pytest.raises(ValueError, match="context_length"):
        clip.SimpleTokenizer()("a", context_length=0)


@pytest.mark.parametrize(
    "t,match",
    [
        (torch.tensor([0.9, 5.0]), "t must be an integer tensor"),
        (torch.tensor([0, 100]), r"t must lie in \[0, 100\)"),
        (torch.tensor([-1, 3]), r"t must lie in \[0, 100\)"),
        (torch.tensor([1, 2, 3]), r"t must be \(batch,\)"),
    ],
)
def test_glide_training_losses_rejects_bad_t(glide_model, t, match):
    assert glide_model.cfg.diffusion_steps == 100
    tokens = torch.ones(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match=match):
        glide.training_losses(glide_model, torch.zeros(2, 3, 16, 16), t, tokens)


@pytest.mark.parametrize(
    "kw,name",
    [({"image_size": 0}, "image_size"), ({"guidance_scale": math.nan}, "guidance_scale")],
)
def test_glide_sample_base_rejects_bad_args(glide_model, kw, name):
    with pytest.raises(ValueError, match=name):
        glide.sample_base(glide_model, torch.ones(1, 3, dtype=torch.long), steps="2", progress=False, **kw)


def test_glide_rejects_bool_tokens_and_nan_upsample_temp(glide_model):
    with pytest.raises(ValueError, match="tokens must be an integer tensor"):
        glide_model.prepare_tokens(torch.ones(1, 3, dtype=torch.bool))
    up = glide.GLIDE(glide.from_name("glide-upsample-tiny"))
    for kw in ({"upsample_temp": math.nan}, {"image_size": 0}):
        with pytest.raises(ValueError, match=next(iter(kw))):
            glide.sample_upsample(
                up, torch.zeros(1, 3, 8, 8), torch.ones(1, 3, dtype=torch.long), progress=False, **kw
            )


def test_empty_batch_gives_empty_results(glam_model, dalle_model, glide_model):
    empty = torch.zeros(0, 2, dtype=torch.long)
    logits, loss, _ = glam_model(empty, empty)
    assert logits.shape == (0, 2, glam_model.config.vocab_size) and loss.isnan()  # as F.cross_entropy
    assert glam_model.generate(empty, 2, use_cache=True).shape == (0, 4)
    assert dalle_model.generate_images(empty, cond_scale=2.0, progress=False).shape == (0, 4, 4)
    assert dalle_model.logits(empty, torch.zeros(0, 4, 4, dtype=torch.long))[1].shape == (0, 16, 32)
    x = torch.zeros(0, 3, 16, 16)
    assert glide_model(x, torch.zeros(0, dtype=torch.long), empty).shape == (0, 6, 16, 16)


def test_pos_embed_interpolation_rejects_empty_grids():
    with pytest.raises(ValueError, match="new_grid must be positive"):
        clip.interpolate_pos_embed(torch.zeros(5, 4), 2, 0)
    with pytest.raises(ValueError, match="size"):
        dalle.interpolate_pos_embed(torch.zeros(4, 8), 0)
