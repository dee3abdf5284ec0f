"""Segmentation models (architecture only; training logic lives in jaxseg.train)."""
from jaxseg.models.unet import UNet, create_model

__all__ = ["UNet", "create_model"]
