"""Workdir paths: local folders or storage URLs (gs://...) shared by every process of a pod.

pathlib would turn 'gs://bucket/run' into the local folder 'gs:/bucket/run' and write each TPU
host's checkpoints to its own disk; etils.epath keeps the URL (orbax writes it through tensorstore,
the small files go through TensorFlow's gfile).
"""
from __future__ import annotations

import os

from etils import epath


def workdir_path(workdir: str | os.PathLike) -> epath.Path:
    """The workdir as an epath.Path: absolute for local folders (orbax wants that), URLs untouched."""
    path = epath.Path(workdir)
    return path if "://" in os.fspath(workdir) else path.absolute()
