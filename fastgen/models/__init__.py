"""Complete model implementations built on fastgen's ops and modules: one file per model.

Each file holds a ``@dataclass`` config, a ``PRESETS`` dict of named sizes and ``from_name()``:
``fastgen.models.clip`` (CLIP ViT + text transformer), ``fastgen.models.dalle`` (dVAE + autoregressive
transformer), ``fastgen.models.glide`` (text-conditional ADM UNet diffusion, base 64x64 + 64->256 upsampler),
``fastgen.models.glide_clip`` (GLIDE's noise-aware CLIP for CLIP guidance), ``fastgen.models.glide_tokenizer``
(GLIDE's lower-casing GPT-2 BPE), ``fastgen.models.glam`` (decoder-only LM with top-2 MoE layers);
``fastgen.models.common`` holds what the
autoregressive models share (token-id checks, ``sample_logits``). Import the model module you need: ``from fastgen.models.clip import from_name``.
"""

from fastgen.models import clip, dalle, glam, glide, glide_clip, glide_tokenizer

__all__ = ["clip", "dalle", "glam", "glide", "glide_clip", "glide_tokenizer"]
