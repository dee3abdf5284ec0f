"""Segmentation models (architecture only; the train step lives in jaxseg.train_step)."""
from jaxseg.models.ensemble import LogitAverage, of_members
from jaxseg.models.unet import UNet, create_model

__all__ = ["LogitAverage", "UNet", "create_model", "of_members"]
