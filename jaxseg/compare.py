"""Paired comparison of two evaluations of one split: is A's lead over B more than the noise of
which images the split happens to hold?

    python -m jaxseg.compare A.json B.json [--samples 10000] [--seed 0]

A and B are eval JSONs that `python -m jaxseg.evaluate` wrote (a model, or another system's masks
through --predictions) for the same dataset and split. For the dataset IoU and the mean per-image
IoU this prints A minus B with a 95% interval from a paired bootstrap over images (the split's
images drawn with replacement, each drawn image's counts of A and of B together), and on how many
images A scores the higher IoU, with a one-sided sign test. A test split of a few hundred images
measures a dataset IoU to about +-0.005, so a lead smaller than that needs this to be told from
chance.
"""
from __future__ import annotations

import argparse
import collections
import json
import math
import pathlib
import sys

import numpy as np

from jaxseg import metrics
from jaxseg.arg_types import at_least
from jaxseg.workdir import write_text_whole

# Bootstrap resamples drawn at once: (chunk, images) int64 indices stay under about 80 MB for a
# split of 10,000 images.
_CHUNK = 1000


class Evaluation:
    """One evaluation's per-image counts (an eval JSON's result), in the order of its image ids;
    ValueError where it has none."""

    def __init__(self, result: dict, name: str):
        try:
            rows = sorted(result["per_image"], key=lambda row: row["id"])
            self.counts = {k: np.array([row[k] for row in rows], np.int64)
                           for k in ("tp", "fp", "fn")}
            self.ids = [row["id"] for row in rows]
            self.dataset, self.split = result["dataset"], result["split"]
        except (KeyError, TypeError, ValueError) as e:  # not what evaluate writes
            raise ValueError(f"{name} is not an eval JSON of jaxseg.evaluate with per-image "
                             f"counts ({type(e).__name__}: {e})") from None
        if not self.ids:
            raise ValueError(f"{name} scores no images")
        options = [option for option in ("flip_tta", "refine") if result.get(option)]
        if result.get("members"):
            options.append(f"members {result['members']}")
        self.label = " --".join([str(result.get("model") or name)] + options)

    @classmethod
    def read(cls, path: pathlib.Path) -> "Evaluation":
        """The eval JSON at PATH; SystemExit with one line where it cannot be read or used."""
        try:
            return cls(json.loads(path.read_text()), str(path))
        except OSError as e:
            raise SystemExit(f"error: {path}: cannot read it ({e.strerror or e})") from None
        except ValueError as e:  # not JSON (JSONDecodeError), or not what evaluate writes
            raise SystemExit(f"error: {e}" if str(e).startswith(str(path)) else
                             f"error: {path} is not an eval JSON ({e})") from None


def sign_test_p(wins: int, trials: int) -> float:
    """One-sided exact sign test: the chance of WINS or more of TRIALS fair coin tosses."""
    return sum(math.comb(trials, k) for k in range(wins, trials + 1)) / 2 ** trials


def dataset_iou(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    """Dataset IoU of the counts summed over the last axis (1 where nothing is person)."""
    return metrics.image_iou({"tp": tp.sum(-1), "fp": fp.sum(-1), "fn": fn.sum(-1)})


def compare(a: Evaluation, b: Evaluation, samples: int = 10_000, seed: int = 0) -> dict:
    """A minus B: point estimates, paired-bootstrap 95% intervals and per-image wins."""
    if a.ids != b.ids:
        # Counted, not as sets: an id scored twice in one (a split of several folders' photos
        # repeats ids) and once in the other was "0 only in the first; 0 only in the second".
        count_a, count_b = collections.Counter(a.ids), collections.Counter(b.ids)
        only_a, only_b = (sorted((x - y).elements()) for x, y in ((count_a, count_b),
                                                                 (count_b, count_a)))
        raise ValueError(f"the two evaluations score different images ({len(only_a)} only in "
                         f"the first, e.g. {only_a[:3]}; {len(only_b)} only in the second, e.g. "
                         f"{only_b[:3]}): compare evaluations of one split")
    image_a, image_b = metrics.image_iou(a.counts), metrics.image_iou(b.counts)
    rng = np.random.default_rng(seed)
    draws = {"iou": [], "mean_image_iou": []}
    for start in range(0, samples, _CHUNK):
        rows = rng.integers(0, len(a.ids), (min(_CHUNK, samples - start), len(a.ids)))
        draws["iou"].append(dataset_iou(*(a.counts[k][rows] for k in ("tp", "fp", "fn")))
                            - dataset_iou(*(b.counts[k][rows] for k in ("tp", "fp", "fn"))))
        draws["mean_image_iou"].append(image_a[rows].mean(1) - image_b[rows].mean(1))
    result = {}
    for name, a_value, b_value in (
            ("iou", dataset_iou(*(a.counts[k] for k in ("tp", "fp", "fn"))),
             dataset_iou(*(b.counts[k] for k in ("tp", "fp", "fn")))),
            ("mean_image_iou", image_a.mean(), image_b.mean())):
        low, high = np.percentile(np.concatenate(draws[name]), [2.5, 97.5])
        result[name] = {"a": float(a_value), "b": float(b_value),
                        "difference": float(a_value - b_value),
                        "interval_95": [float(low), float(high)]}
    wins, losses = int(np.sum(image_a > image_b)), int(np.sum(image_a < image_b))
    result["images"] = {"count": len(a.ids), "a_higher": wins, "b_higher": losses,
                        "sign_test_p": sign_test_p(wins, wins + losses),
                        "median_difference": float(np.median(image_a - image_b))}
    return result


def main(argv=None) -> None:
    """Entry point: compare two eval JSONs and print the figures (and --output them as JSON)."""
    parser = argparse.ArgumentParser(
        prog="python -m jaxseg.compare", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", type=pathlib.Path, help="eval JSON of the system in question")
    parser.add_argument("b", type=pathlib.Path, help="eval JSON of the one it is compared with")
    parser.add_argument("--samples", type=at_least(100), default=10_000,
                        help="bootstrap resamples (default 10000)")
    parser.add_argument("--seed", type=at_least(0), default=0, help="bootstrap seed (default 0)")
    parser.add_argument("--output", type=pathlib.Path, help="also write the figures here as JSON")
    args = parser.parse_args(argv)
    a, b = Evaluation.read(args.a), Evaluation.read(args.b)
    if (a.dataset, a.split) != (b.dataset, b.split):
        sys.exit(f"error: {args.a} scores {a.dataset}/{a.split} and {args.b} "
                 f"{b.dataset}/{b.split}: compare evaluations of one split")
    try:
        result = compare(a, b, args.samples, args.seed)
    except ValueError as e:
        sys.exit(f"error: {e}")
    result = {"dataset": a.dataset, "split": a.split, "a": str(args.a), "b": str(args.b),
              "samples": args.samples, "seed": args.seed, **result}
    print(f"{a.dataset}/{a.split}, {len(a.ids)} images; A = {a.label}, B = {b.label}")
    for name in ("iou", "mean_image_iou"):
        r = result[name]
        print(f"  {name}: A {r['a']:.4f}, B {r['b']:.4f}, A - B {r['difference']:+.4f} "
              f"(95% interval {r['interval_95'][0]:+.4f} to {r['interval_95'][1]:+.4f})")
    images = result["images"]
    print(f"  per image: A higher on {images['a_higher']}, B on {images['b_higher']} "
          f"(one-sided sign test p = {images['sign_test_p']:.2g}), median A - B "
          f"{images['median_difference']:+.4f}")
    if args.output:
        try:
            write_text_whole(args.output, json.dumps(result, indent=2) + "\n")
        except OSError as e:
            sys.exit(f"error: cannot write {args.output} ({e.strerror or e})")
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
