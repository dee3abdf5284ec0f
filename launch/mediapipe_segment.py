"""MediaPipe Selfie Segmentation masks for a folder of photos: the peer baseline for jaxseg.

Runs in its OWN environment (mediapipe==0.10.21 pins numpy<2 and an old jax; see
launch/mediapipe_peer.sh), never in jaxseg's:

    .venv-mediapipe/bin/python launch/mediapipe_segment.py --images DIR --out MASKS [--model general]

Uses the legacy solution API, whose wheel ships both TFLite models (no download):
`mediapipe.solutions.selfie_segmentation.SelfieSegmentation(model_selection=0)` is the general
256x256 model, `model_selection=1` the landscape 144x256 one. Each photo `<id>.png` (read as
RGB) goes through `process()` one at a time; its float person probability, already at the
photo's own size, is thresholded at 0.5 and written as `MASKS/<id>.png` with values 0/255 —
the format `python -m jaxseg.evaluate --predictions MASKS` scores. The ids come from
`DIR/ids.txt` when present (written by launch/export_split.py), else every `*.png` in DIR.

Prints the mean and median single-image latency of `process()` (ms/image, batch 1, this CPU,
the first call excluded as warm-up); the numbers also go to `MASKS/timing.json`.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import platform
import statistics
import sys
import time

import cv2
import numpy as np

MODELS = {"general": 0, "landscape": 1}
THRESHOLD = 0.5


def list_ids(images: pathlib.Path) -> list[str]:
    """The ids to segment: export_split.py's ids file (the split's order), else every <id>.png."""
    ids_file = images / "ids.txt"
    if ids_file.exists():
        return [line.strip() for line in ids_file.read_text().splitlines() if line.strip()]
    return sorted(p.stem for p in images.glob("*.png"))


def read_bgr(path: pathlib.Path) -> np.ndarray | None:
    """The photo at PATH as uint8 BGR, or None when it cannot be read or decoded. The bytes are
    read by Python: OpenCV's own imread crashes on a path that is not UTF-8."""
    try:
        data = np.fromfile(path, np.uint8)
    except OSError:
        return None
    return cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None


def write_png(path: pathlib.Path, image: np.ndarray) -> None:
    """IMAGE (uint8, OpenCV's channel order) as a PNG at PATH, written by Python for the same
    reason as read_bgr; OSError when it cannot be. (jaxseg.photo_pixels.encode_png's work, done
    here again because this script runs in MediaPipe's environment, without jaxseg.)"""
    ok, png = cv2.imencode(".png", image)
    if not ok:
        raise OSError("PNG encoding failed")
    path.write_bytes(png.tobytes())


def main(argv=None) -> int:
    """Command line: writes MediaPipe's mask for every id; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", required=True, help="folder of <id>.png photos")
    parser.add_argument("--out", required=True, help="folder for the <id>.png masks (0/255)")
    parser.add_argument("--model", choices=sorted(MODELS), default="general")
    parser.add_argument("--limit", type=int, default=None, help="only the first N ids")
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1:  # [:0] would be no photo, [:-1] all but one
        parser.error(f"--limit must be at least 1, got {args.limit}")
    # A non-UTF-8 --out must not end the run at its summary line (as jaxseg.workdir's
    # escape_unencodable_stdout does it; jaxseg is not in this environment).
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="backslashreplace")

    import mediapipe as mp  # only in the mediapipe environment

    images, out = pathlib.Path(args.images), pathlib.Path(args.out)
    ids = list_ids(images)[: args.limit]
    if not ids:
        sys.exit(f"mediapipe_segment.py: no photos in {images}")
    missing = [i for i in ids if not (images / f"{i}.png").exists()]
    if missing:
        sys.exit(f"mediapipe_segment.py: {len(missing)} listed photos are missing in {images}: "
                 + ", ".join(missing[:10]))
    out.mkdir(parents=True, exist_ok=True)

    times = []
    positive = 0.0
    with mp.solutions.selfie_segmentation.SelfieSegmentation(
            model_selection=MODELS[args.model]) as segmenter:
        for n, example_id in enumerate(ids):
            bgr = read_bgr(images / f"{example_id}.png")
            if bgr is None:
                sys.exit(f"mediapipe_segment.py: cannot read {images / example_id}.png")
            rgb = np.ascontiguousarray(bgr[..., ::-1])
            start = time.perf_counter()
            probs = segmenter.process(rgb).segmentation_mask
            times.append(time.perf_counter() - start)
            if probs is None or probs.shape != rgb.shape[:2]:
                sys.exit(f"mediapipe_segment.py: {example_id}: mask of shape "
                         f"{None if probs is None else probs.shape} for a photo of {rgb.shape[:2]}")
            mask = np.where(probs > THRESHOLD, 255, 0).astype(np.uint8)
            positive += float(np.mean(mask > 0))
            try:
                write_png(out / f"{example_id}.png", mask)
            except OSError as e:
                sys.exit(f"mediapipe_segment.py: cannot write {out / example_id}.png: {e}")
            if (n + 1) % 50 == 0:
                print(f"  {n + 1}/{len(ids)}", flush=True)

    timed = times[1:] or times  # the first call builds the graph's interpreter: warm-up
    ms = [1000 * t for t in timed]
    timing = {"model": args.model, "images": len(ids), "timed_images": len(ms),
              "mean_ms_per_image": statistics.fmean(ms), "median_ms_per_image": statistics.median(ms),
              "first_call_ms": 1000 * times[0], "mediapipe": mp.__version__,
              "cpu": platform.processor() or platform.machine(), "threshold": THRESHOLD}
    (out / "timing.json").write_text(json.dumps(timing, indent=1) + "\n")
    print(f"wrote {len(ids)} masks to {out} (mean person fraction {positive / len(ids):.3f})")
    print(f"mediapipe {mp.__version__} selfie segmentation ({args.model}): "
          f"mean {timing['mean_ms_per_image']:.2f} ms/image, median "
          f"{timing['median_ms_per_image']:.2f} ms/image over {len(ms)} images "
          f"(batch 1, process() only, first call {timing['first_call_ms']:.1f} ms excluded)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
