"""Noise schedules and samplers over the fused sampling steps (``fastgen.ops.diffusion_step``)."""
