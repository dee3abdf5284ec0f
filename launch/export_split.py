"""Export one split's photos as lossless PNG files `<id>.png`, for models run outside jaxseg.

Run with jaxseg's own environment (it reads the prepared TFDS data through
`jaxseg.datasets.data_source`):

    python launch/export_split.py --dataset portrait_segmentation --split test --out DIR

Each example's `image` (uint8 HxWx3 RGB, original size) is written to `DIR/<id>.png` in the
usual PNG channel order, so any reader that returns RGB (PIL, or OpenCV's BGR flipped) sees
exactly the pixels jaxseg trains and evaluates on. `DIR/ids.txt` lists the ids in the source's
order, one a line, so that a consumer processes exactly this split even if DIR holds other files.
Only the photos are exported: the ground-truth masks stay inside jaxseg's evaluator.
"""
from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make `import jaxseg` work from anywhere
    sys.path.insert(0, str(REPO))

from jaxseg.arg_types import at_least  # noqa: E402 (after the path above)
from jaxseg.photo_pixels import encode_png  # noqa: E402
from jaxseg.workdir import escape_unencodable_stdout  # noqa: E402

IDS_FILE = "ids.txt"


def _usable_as_file_name(example_id: str) -> bool:
    """One path component that survives a line of IDS_FILE (read back stripped): a person_folder
    id such as 'my photo' or 'café' is; '../x', '.', ' x' or one with a line break is not."""
    return (example_id not in ("", ".", "..") and example_id == example_id.strip()
            and not any(c in example_id for c in "/\\\n\r\0"))


def export(source, out_dir: str | pathlib.Path, *, limit: int | None = None) -> list[str]:
    """Write `<id>.png` (RGB) for each example of `source` (or its first `limit`); returns the ids."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    count = len(source) if limit is None else min(limit, len(source))
    for i in range(count):  # all checked before any file is written
        if not _usable_as_file_name(source[i]["id"]):
            raise ValueError(f"example {i}: id {source[i]['id']!r} is not usable as a file name")
    ids = []
    for i in range(count):
        example = source[i]
        example_id = example["id"]
        image = np.asarray(example["image"])
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"example {example_id}: expected uint8 HxWx3 RGB, got "
                             f"{image.dtype} {image.shape}")
        path = out_dir / f"{example_id}.png"
        path.write_bytes(encode_png(image))  # not cv2.imwrite, which crashes on a non-UTF-8 path
        ids.append(example_id)
    (out_dir / IDS_FILE).write_text("".join(f"{i}\n" for i in ids))
    return ids


def main(argv=None) -> int:
    """Command line: writes the split's photos and ids file; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True, help="portrait_segmentation, ccp_person, ...")
    parser.add_argument("--split", default="test")
    parser.add_argument("--out", required=True, help="folder for <id>.png and ids.txt")
    parser.add_argument("--data_dir", default=None, help="TFDS data dir (default $TFDS_DATA_DIR)")
    parser.add_argument("--limit", type=at_least(1), default=None,
                        help="export only the first N examples")
    args = parser.parse_args(argv)
    escape_unencodable_stdout()  # a non-UTF-8 --out in the summary line

    from jaxseg import datasets

    try:
        source = datasets.data_source(args.dataset, args.split, data_dir=args.data_dir)
        ids = export(source, args.out, limit=args.limit)
    except (ValueError, OSError) as e:  # an unknown dataset or split, an unwritable --out
        sys.exit(f"export_split.py: {e}")
    print(f"exported {len(ids)} images of {args.dataset}/{args.split} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
