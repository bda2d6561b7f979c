"""Alias: the U-Net lives in diffusion/nets/unet.py."""

import sys

from diffusion.nets import unet as _unet

sys.modules[__name__] = _unet
