"""The backbones: Flax linen networks that map (x, noise-level input, labels) to an output of x's
shape and know nothing of diffusion."""
