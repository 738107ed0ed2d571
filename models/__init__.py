"""Denoiser backbones (DiT, ...) mapping ``(tokens, sigma)`` to per-position logits."""
