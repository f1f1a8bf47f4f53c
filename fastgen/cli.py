"""The ``fastgen`` command.

    fastgen info [--json]
    fastgen bench [--op OP ...]                       (python -m fastgen.bench's options)
    fastgen sample glide --weights PATH --prompt "..." --out grid.png [--guidance 3 --steps 100
                         --seed 0 --batch-size 4 --upsample [--upsample-weights PATH]]
    fastgen sample dalle --weights DIR --prompt "..." --out grid.png [--bpe FILE --seed 0 ...]
    fastgen clip zero-shot --weights PATH --labels "a cat,a dog" IMAGE [IMAGE ...]
    fastgen fid DIR_A DIR_B --weights pt_inception-2015-12-05-6726825d.pth [--batch-size 50
                --device cpu --resize legacy|clean]
    fastgen ssim A B                                   (two image files, or two folders paired by name)

Weights are local files or directories (nothing is downloaded); each model's ``from_pretrained`` says
which formats it reads. Errors (a missing file, a bad option) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence

import torch

__all__ = ["load_image", "main", "save_grid"]

# OpenAI CLIP's preprocessing: shorter side to image_size (bicubic), centre crop, these mean / std
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


# =====================================================================================================
# Images
# =====================================================================================================


def load_image(path: str) -> torch.Tensor:
    """An image file as (3, H, W) float32 in [0, 1] (RGB; PIL reads it)."""
    from PIL import Image

    if not os.path.isfile(path):
        raise CLIError(f"{path}: image file not found")
    try:
        with Image.open(path) as im:
            rgb = im.convert("RGB")
    except OSError as e:
        raise CLIError(f"{path}: not a readable image ({e})") from e
    data = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
    return data.view(rgb.height, rgb.width, 3).permute(2, 0, 1).float() / 255.0


def save_grid(images: torch.Tensor, path: str, nrow: int | None = None, value_range=(0.0, 1.0)) -> None:
    """(B, C, H, W) images in ``value_range`` -> one PNG grid, ``nrow`` images per row (default: a
    near-square grid), 2 px gaps."""
    from PIL import Image

    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise CLIError(f"save_grid: expected (B, 1 or 3, H, W) images, got {tuple(images.shape)}")
    lo, hi = value_range
    x = ((images.detach().float().cpu() - lo) / (hi - lo)).clamp(0, 1)
    x = (x * 255).round().to(torch.uint8)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    b, _, h, w = x.shape
    nrow = nrow or max(1, math.ceil(b**0.5))
    rows = -(-b // nrow)
    pad = 2
    canvas = torch.zeros(3, rows * (h + pad) - pad, nrow * (w + pad) - pad, dtype=torch.uint8)
    for i in range(b):
        r, c = divmod(i, nrow)
        canvas[:, r * (h + pad) : r * (h + pad) + h, c * (w + pad) : c * (w + pad) + w] = x[i]
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    Image.fromarray(canvas.permute(1, 2, 0).contiguous().numpy()).save(path)


def clip_preprocess(image: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """OpenAI CLIP's preprocessing of a (3, H, W) [0, 1] image: the shorter side resized to the model's
    size (bicubic, antialiased), centre crop, normalised with CLIP's mean / std."""
    import torch.nn.functional as F

    th, tw = (size, size) if isinstance(size, int) else size
    _, h, w = image.shape
    scale = max(th / h, tw / w)
    nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
    x = F.interpolate(image[None], size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)[0]
    top, left = (nh - th) // 2, (nw - tw) // 2
    x = x[:, top : top + th, left : left + tw].clamp(0, 1)
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return (x - mean) / std


# =====================================================================================================
# Commands
# =====================================================================================================


def _device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise CLIError(f"--device: {e}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name}: no CUDA device is available")
    return dev


def _release_file(weights: str, name: str) -> str:
    """``weights`` itself, or ``weights/name`` when ``weights`` is a release directory holding it."""
    if os.path.isdir(weights) and os.path.isfile(os.path.join(weights, name)):
        return os.path.join(weights, name)
    return weights


def _check_exists(path: str, option: str, what: str) -> None:
    if not os.path.exists(path):
        raise CLIError(f"{option} {path}: not found; it should be {what}")


def _glide_tokens(args, model):
    from fastgen.models.glide_tokenizer import GlideTokenizer

    tok_dir = args.tokenizer
    if tok_dir is None and os.path.isdir(args.weights):
        has = any(os.path.isfile(os.path.join(args.weights, f)) for f in ("encoder.json", "encoder.json.gz"))
        tok_dir = args.weights if has else None
    tok = GlideTokenizer.from_pretrained(tok_dir)
    ctx = model.cfg.text_ctx
    tokens, mask = tok([args.prompt] * args.batch_size, text_ctx=ctx)
    vocab = model.cfg.n_vocab
    if int(tokens.max()) >= vocab:
        raise CLIError(
            f"the tokenizer's ids reach {int(tokens.max())} but the model's vocabulary has {vocab} tokens: "
            "--tokenizer does not belong to these weights"
        )
    return tokens, mask


def cmd_sample_glide(args) -> None:
    from fastgen.models.glide import GLIDE, quantize_8bit, sample_base, sample_upsample

    dev = _device(args.device)
    _check_exists(args.weights, "--weights", "GLIDE's base.pt (github.com/openai/glide-text2im) or a "
                  "save_pretrained directory")  # fmt: skip
    base = GLIDE.from_pretrained(_release_file(args.weights, "base.pt")).eval().to(dev)
    tokens, mask = _glide_tokens(args, base)
    guidance = None if args.guidance is None or args.guidance <= 0 else args.guidance
    with torch.no_grad():
        images = sample_base(base, tokens, mask, guidance_scale=guidance, steps=args.steps, seed=args.seed,
                             progress=not args.no_progress)  # fmt: skip
    if args.upsample:
        up_path = args.upsample_weights
        if up_path is None:
            up_path = _release_file(args.weights, "upsample.pt")
            if up_path == args.weights:
                raise CLIError("--upsample needs --upsample-weights (upsample.pt) or a --weights directory "
                               "holding upsample.pt")  # fmt: skip
        _check_exists(up_path, "--upsample-weights", "GLIDE's upsample.pt or a save_pretrained directory")
        up = GLIDE.from_pretrained(up_path).eval().to(dev)
        with torch.no_grad():
            images = sample_upsample(up, quantize_8bit(images), tokens, mask, steps=args.upsample_steps,
                                     seed=args.seed + 1, progress=not args.no_progress)  # fmt: skip
    save_grid(images, args.out, value_range=(-1.0, 1.0))
    print(f"wrote {args.out}: {images.shape[0]} images of {images.shape[-2]}x{images.shape[-1]}")


def _clip_tokenizer(bpe: str | None, vocab_size: int):
    from fastgen.models.clip import SimpleTokenizer, find_bpe_file

    if bpe is not None:
        _check_exists(bpe, "--bpe", "CLIP's bpe_simple_vocab_16e6.txt.gz")
        tok = SimpleTokenizer(bpe)
    elif vocab_size <= 258:
        tok = SimpleTokenizer()  # the byte-level tokenizer of the tiny presets
    else:
        tok = SimpleTokenizer(
            find_bpe_file()
        )  # in open_clip / clip; FileNotFoundError says where it comes from
    if tok.vocab_size > vocab_size:
        raise CLIError(
            f"the tokenizer has {tok.vocab_size} tokens but the model's vocabulary has {vocab_size}"
        )
    return tok


def cmd_sample_dalle(args) -> None:
    from fastgen.models.dalle import DALLE

    dev = _device(args.device)
    _check_exists(args.weights, "--weights", "a DALLE save_pretrained directory")
    model = DALLE.from_pretrained(args.weights).eval().to(dev)
    if getattr(model, "dvae", None) is None:
        raise CLIError(f"{args.weights}: this DALLE has no dVAE to decode images (save it with its dvae)")
    # DALL-E's own text BPE was never released: a CLIP-format BPE file (--bpe), else UTF-8 bytes
    if args.bpe is not None:
        tok = _clip_tokenizer(args.bpe, model.cfg.text_vocab_size)
    else:
        from fastgen.models.clip import SimpleTokenizer

        tok = SimpleTokenizer()
        if tok.vocab_size > model.cfg.text_vocab_size:
            raise CLIError(
                f"the model's text vocabulary ({model.cfg.text_vocab_size}) is smaller than the byte-level "
                f"tokenizer's {tok.vocab_size} tokens: pass --bpe with the BPE file the model was trained with"
            )
    ids = tok.encode(args.prompt)[: model.cfg.text_seq_len]
    if ids and max(ids) >= model.cfg.text_vocab_size:
        raise CLIError(f"token id {max(ids)} >= the model's text_vocab_size {model.cfg.text_vocab_size}")
    text = torch.tensor([ids or [model.cfg.text_pad_id]] * args.batch_size, device=dev)
    with torch.no_grad():
        _, images = model.generate_images(
            text, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
            cond_scale=args.cond_scale, seed=args.seed, progress=not args.no_progress, grid=args.grid,
            return_images=True,
        )  # fmt: skip
    save_grid(images, args.out)
    print(f"wrote {args.out}: {images.shape[0]} images of {images.shape[-2]}x{images.shape[-1]}")


def cmd_clip_zero_shot(args) -> None:
    from fastgen.models.clip import CLIP

    dev = _device(args.device)
    _check_exists(args.weights, "--weights", "an OpenAI CLIP .pt, an open_clip checkpoint, an HF CLIP "
                  "directory or a save_pretrained directory")  # fmt: skip
    labels = [s.strip() for s in args.labels.split(",") if s.strip()]
    if len(labels) < 2:
        raise CLIError(f"--labels: give at least 2 comma-separated labels, got {args.labels!r}")
    if "{}" not in args.template:
        raise CLIError(f"--template must contain {{}} (where the label goes), got {args.template!r}")
    model = CLIP.from_pretrained(args.weights).eval().to(dev)
    cfg = model.config
    tok = _clip_tokenizer(args.bpe, cfg.vocab_size)
    texts = tok([args.template.format(lab) for lab in labels], context_length=cfg.context_length,
                truncate=True).to(dev)  # fmt: skip
    size = cfg.image_size
    batch = torch.stack([clip_preprocess(load_image(p), size) for p in args.images]).to(dev)
    with torch.no_grad():
        probs = model.zero_shot_predict(batch, model.zero_shot_classifier(texts))
    top = min(args.top, len(labels))
    for path, p in zip(args.images, probs.cpu()):
        vals, idx = p.topk(top)
        best = ", ".join(f"{labels[i]} {v:.3f}" for v, i in zip(vals.tolist(), idx.tolist()))
        print(f"{path}: {best}")


def cmd_fid(args) -> None:
    from fastgen.metrics.folders import fid_folders

    for d in (args.dir_a, args.dir_b):
        if not os.path.isdir(d):
            raise CLIError(f"{d}: not a directory of images")
    if args.weights is None:
        raise CLIError(
            "--weights: the FID Inception weights file is needed: pt_inception-2015-12-05-6726825d.pth from "
            "github.com/mseitzer/pytorch-fid/releases (fid_weights)"
        )
    fid = fid_folders(args.dir_a, args.dir_b, weights=args.weights, batch_size=args.batch_size,
                      device=_device(args.device), resize=args.resize, progress=not args.no_progress)  # fmt: skip
    print(f"FID {fid:.4f}")


def cmd_ssim(args) -> None:
    from fastgen.metrics.folders import ssim_files, ssim_folders

    a, b = args.a, args.b
    if os.path.isdir(a) and os.path.isdir(b):
        value = ssim_folders(a, b)
    elif os.path.isfile(a) and os.path.isfile(b):
        value = ssim_files(a, b)
    else:
        raise CLIError(f"ssim: give two image files or two folders; got {a!r} and {b!r}")
    print(f"SSIM {value:.6f}")


# =====================================================================================================
# Parser
# =====================================================================================================


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastgen", description="fastgen: fused kernels and the models that use them"
    )
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("info", help="versions, device, which backends serve (python -m fastgen.info)")
    s.add_argument("--json", action="store_true")
    s = sub.add_parser("bench", help="the benchmark suite (python -m fastgen.bench); options pass through",
                       add_help=False)  # fmt: skip
    s.add_argument("rest", nargs=argparse.REMAINDER)

    sample = sub.add_parser("sample", help="sample images from GLIDE or DALL-E").add_subparsers(
        dest="model", required=True
    )
    g = sample.add_parser("glide", help="text -> image with GLIDE (classifier-free guidance)")
    g.add_argument(
        "--weights", required=True, help="base.pt, a directory holding it, or a save_pretrained dir"
    )
    g.add_argument("--prompt", required=True)
    g.add_argument("--out", default="grid.png")
    g.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale (0: none)")
    g.add_argument("--steps", default="100", help="base sampling steps (a space_timesteps spec)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--batch-size", type=int, default=4)
    g.add_argument("--upsample", action="store_true", help="then 4x upsample with upsample.pt")
    g.add_argument("--upsample-weights", default=None)
    g.add_argument("--upsample-steps", default="fast27")
    g.add_argument("--tokenizer", default=None, help="directory with encoder.json and vocab.bpe")
    g.add_argument("--device", default=None)
    g.add_argument("--no-progress", action="store_true")

    d = sample.add_parser("dalle", help="text -> image tokens -> image with DALL-E and its dVAE")
    d.add_argument("--weights", required=True, help="a DALLE save_pretrained directory (with its dvae)")
    d.add_argument("--prompt", required=True)
    d.add_argument("--out", default="grid.png")
    d.add_argument("--bpe", default=None, help="text BPE file (CLIP's format); default: byte-level or found")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--batch-size", type=int, default=4)
    d.add_argument("--temperature", type=float, default=1.0)
    d.add_argument("--top-k", type=int, default=None)
    d.add_argument("--top-p", type=float, default=None)
    d.add_argument("--cond-scale", type=float, default=1.0)
    d.add_argument("--grid", type=int, default=None, help="token grid (default: the trained one)")
    d.add_argument("--device", default=None)
    d.add_argument("--no-progress", action="store_true")

    clip = sub.add_parser("clip", help="CLIP commands").add_subparsers(dest="clip_command", required=True)
    z = clip.add_parser("zero-shot", help="classify images against text labels")
    z.add_argument("--weights", required=True)
    z.add_argument("--labels", required=True, help='comma-separated, e.g. "a cat,a dog"')
    z.add_argument("--template", default="a photo of {}.")
    z.add_argument("--bpe", default=None, help="bpe_simple_vocab_16e6.txt.gz (default: found in open_clip)")
    z.add_argument("--top", type=int, default=3)
    z.add_argument("--device", default=None)
    z.add_argument("images", nargs="+")

    f = sub.add_parser("fid", help="FID between two folders of images (TF-Inception, as pytorch-fid)")
    f.add_argument("dir_a")
    f.add_argument("dir_b")
    f.add_argument("--weights", default=None, help="pt_inception-2015-12-05-6726825d.pth")
    f.add_argument("--batch-size", type=int, default=50)
    f.add_argument("--device", default=None)
    f.add_argument("--resize", choices=["legacy", "clean"], default="legacy")
    f.add_argument("--no-progress", action="store_true")

    s = sub.add_parser("ssim", help="mean SSIM of two images or of two folders paired by file name")
    s.add_argument("a")
    s.add_argument("b")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # everything after "bench" belongs to fastgen.bench's own parser
        from fastgen.bench.__main__ import main as bench_main

        return bench_main(argv[1:]) or 0
    args = _parser().parse_args(argv)
    try:
        if args.command == "info":
            from fastgen.info import main as info_main

            info_main(["--json"] if args.json else [])
        elif args.command == "sample":
            if args.batch_size < 1:
                raise CLIError(f"--batch-size must be >= 1, got {args.batch_size}")
            (cmd_sample_glide if args.model == "glide" else cmd_sample_dalle)(args)
        elif args.command == "clip":
            cmd_clip_zero_shot(args)
        elif args.command == "fid":
            cmd_fid(args)
        elif args.command == "ssim":
            cmd_ssim(args)
    except (CLIError, FileNotFoundError, ValueError) as e:
        print(f"fastgen {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
