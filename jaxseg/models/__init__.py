"""Segmentation models (architecture only; training logic lives in jaxseg.train)."""
from jaxseg.models.ensemble import LogitAverage, of_members
from jaxseg.models.unet import UNet, create_model

__all__ = ["LogitAverage", "UNet", "create_model", "of_members"]
