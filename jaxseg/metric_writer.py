"""Training logs: a JSONL file (one record per logged step) and TensorBoard scalars and images."""
from __future__ import annotations

import json
import os

import numpy as np

from jaxseg.workdir import workdir_path, write_text_whole

METRICS_FILE = "metrics.jsonl"


class MetricWriter:
    """Writes on process 0 only; other processes get a writer that does nothing."""

    def __init__(self, workdir: str | os.PathLike, *, enabled: bool = True,
                 resume_step: int = 0, revalidate: bool = False):
        """`resume_step`: the checkpoint step a run resumes from. Records of later steps were
        logged before a hard kill and are logged again as the run repeats those steps: the JSONL
        file drops them (and a line the kill cut short), and TensorBoard is told to hide them.
        `revalidate`: the run validates resume_step again, so its validation records go too."""
        self.enabled = enabled
        if not enabled:
            return
        from tensorboardX import SummaryWriter  # imported lazily: only the writing process needs it

        workdir = workdir_path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        path = workdir / METRICS_FILE
        if path.exists():
            text = path.read_text()
            lines = [line for line in text.splitlines() if line.strip()]
            kept = [line for line in lines
                    if (record := _record(line)) is not None and record["step"] <= resume_step
                    and not (revalidate and record["step"] == resume_step
                             and record.get("kind") == "validation")]
            # A last record without its newline (a kill between the two) would join the next one.
            if len(kept) < len(lines) or (text and not text.endswith("\n")):
                write_text_whole(path, "".join(line + "\n" for line in kept))
        self._jsonl = path.open("a")
        # A session-start event at resume_step + 1 makes TensorBoard purge the earlier events of
        # that step and later ones, so that its curves do not double back either; also at step 1,
        # for a run killed before its first checkpoint and started again.
        self._tb = SummaryWriter(str(workdir / "tensorboard"), purge_step=resume_step + 1)

    def scalars(self, step: int, values: dict, *, kind: str = "train") -> None:
        """One JSONL record {"step", "kind", **values} and the same values as TensorBoard scalars."""
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in values.items()}
        self._jsonl.write(json.dumps({"step": int(step), "kind": kind, **clean}) + "\n")
        self._jsonl.flush()
        for k, v in clean.items():
            self._tb.add_scalar(f"{kind}/{k}", v, step)

    def images(self, step: int, tag: str, images: np.ndarray) -> None:
        """uint8 (N, H, W, 3) images to TensorBoard."""
        if self.enabled:
            self._tb.add_images(tag, np.asarray(images), step, dataformats="NHWC")

    def close(self) -> None:
        """Flushes and closes the files."""
        if self.enabled:
            self._jsonl.close()
            self._tb.close()


def _record(line: str) -> dict | None:
    """One JSONL line's record; None for a line that is not a whole record (blank, or cut short
    by a kill)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) and "step" in record else None


def read_metrics(workdir: str | os.PathLike) -> list[dict]:
    """All records of a workdir's metrics file (empty when there is none)."""
    path = workdir_path(workdir) / METRICS_FILE
    if not path.exists():
        return []
    return [r for r in map(_record, path.read_text().splitlines()) if r is not None]
