"""Denoising diffusion models on images, in JAX/Flax."""
