"""Packs the training and validation splits into one compact array file for an accelerator machine.

`python launch/make_array_file.py --size 192 --output .gpu/person_192.npz` (jaxseg's environment,
data through JAXSEG_MANUAL_DIR/TFDS_DATA_DIR). Each example is resized with jaxseg's resolution rule
and stored as JPEG (photo, --jpeg_quality, default 95) and PNG (mask) bytes, concatenated with
offsets, so that the file is small and needs neither TFDS, TensorFlow nor OpenCV to read (Pillow
decodes it). An --output without the .npz suffix gets it (as np.savez would add it anyway).
"""
import argparse
import pathlib
import sys

# `python launch/make_array_file.py` puts launch/, not the repository root, on sys.path: without
# this, `jaxseg` would only import with PYTHONPATH=. set.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import cv2
import numpy as np

from jaxseg import datasets, resolution
from jaxseg.arg_types import at_least
from jaxseg.workdir import output_file_problem

SPLITS = {"train": 0, "validation": 1}
# How the masks were resized: "centre" (resolution.resize_mask samples pixel centres). Files without
# this key are older and hold masks taken from each block's top-left pixel, half a pixel low.
MASK_RESIZE = "centre"


def npz_path(output) -> pathlib.Path:
    """The file np.savez writes for `output`: it appends .npz to a name that lacks it."""
    out = pathlib.Path(output)
    return out if out.name.endswith(".npz") else out.with_name(out.name + ".npz")


def main():
    """Writes the array file and prints its size and example counts."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=at_least(1), default=192)
    parser.add_argument("--datasets", default="portrait_segmentation,ccp_person")
    parser.add_argument("--output", required=True, help="the array file (.npz is added if missing)")
    parser.add_argument("--jpeg_quality", type=int, default=95)
    args = parser.parse_args()
    if not 0 <= args.jpeg_quality <= 100:  # OpenCV clamps it, with a warning per image
        parser.error(f"--jpeg_quality must be from 0 to 100, got {args.jpeg_quality}")
    out = npz_path(args.output)
    # Before the encoding, not after it: np.savez failed there with a traceback.
    if problem := output_file_problem(out):
        parser.error(f"--output {out}: {problem}")
    images, masks, split_ids, source_ids = [], [], [], []
    names = args.datasets.split(",")
    for d, name in enumerate(names):
        for split, split_id in SPLITS.items():
            try:  # an unknown name, or person_folder (which needs a folder this script lacks)
                src = datasets.data_source(name, split)
            except ValueError as e:
                parser.error(f"--datasets: {e}")
            # No manual dir and no network, an unwritable data dir: the builder's message says
            # what to do, and a traceback buried it.
            except OSError as e:
                sys.exit(f"error: {e}")
            for i in range(len(src)):
                ex = src[i]
                image = resolution.resize_image(ex["image"], args.size)
                mask = resolution.resize_mask(ex["mask"], args.size)[..., 0] * 255
                images.append(cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR),
                                           [cv2.IMWRITE_JPEG_QUALITY, args.jpeg_quality])[1])
                masks.append(cv2.imencode(".png", mask)[1])
                split_ids.append(split_id)
                source_ids.append(d)
    out.parent.mkdir(parents=True, exist_ok=True)
    offsets = lambda parts: np.cumsum([0] + [len(p) for p in parts]).astype(np.int64)
    np.savez(out, image_bytes=np.concatenate(images), image_offsets=offsets(images),
             mask_bytes=np.concatenate(masks), mask_offsets=offsets(masks),
             split=np.array(split_ids, np.uint8), source=np.array(source_ids, np.uint8),
             source_names=np.array(names), size=np.array(args.size),
             mask_resize=np.array(MASK_RESIZE))
    counts = {s: int(np.sum(np.array(split_ids) == v)) for s, v in SPLITS.items()}
    print(f"wrote {out}: {out.stat().st_size / 2**20:.1f} MiB, {counts}")


if __name__ == "__main__":
    main()
