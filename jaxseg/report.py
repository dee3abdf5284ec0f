"""Analysis of a run: where the model works, where it fails, and what to do next.

    python -m jaxseg.report --workdir DIR [--output DIR] [--k 6] [--peer_dir DIR] [--checkpoint C]

Reads the workdir's training log (metrics.jsonl), every eval JSON directly in WORKDIR/eval/ written by
`python -m jaxseg.evaluate` (the model's own rows), and the eval JSONs of other models found
directly in --peer_dir (default WORKDIR/../peers, where launch/mediapipe_peer.sh writes; a peer
is shown beside the model's rows of the same dataset and split). The own eval JSONs of the
checkpoint named by --checkpoint (default best) get the detailed analysis: per-image IoU,
failure buckets, threshold sweep, calibration, best and worst predictions (recomputed with the
model and the dataset) and recommendations derived from those numbers.

Writes OUTPUT/report.html (self-contained: figures embedded as base64 data URLs) and
OUTPUT/report.md with the same figures as files beside it: charts as PNG, photo overlays as JPEG
(a fifth of their PNG size, which kept the HTML of a two-split report near 60 MB). A
single-process tool: run it on one host.
"""
from __future__ import annotations

import base64
import dataclasses
import datetime
import html
import io
import json
import os
import re
import sys

import cv2
import numpy as np
from etils import epath
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from jaxseg import compare, config_check, inference, input_pipeline, metric_writer, metrics, refine
from jaxseg.arg_types import refuse_positional, run_absl
from jaxseg.models import LogitAverage, of_members
from jaxseg.predict import Renderer
from jaxseg.workdir import local_folder_problem, workdir_path, write_text_whole

# Person area (fraction of the image) and ground-truth region count buckets: (label, low, high).
# Images without a person are in no area bucket (their errors are the people "0" bucket's): in
# "<10%" their false positives would read as trouble with small people.
_ANY_PERSON = np.finfo(np.float64).tiny
AREA_BUCKETS = (("<10%", _ANY_PERSON, 0.10), ("10-25%", 0.10, 0.25), ("25-50%", 0.25, 0.50),
                (">50%", 0.50, np.inf))
REGION_BUCKETS = (("0", 0, 1), ("1", 1, 2), ("2", 2, 3), ("3+", 3, np.inf))
# Below these differences a recommendation says "keep as is": smaller gains are within the noise
# of one validation split.
THRESHOLD_MIN_GAIN = 0.005
RESOLUTION_MIN_GAP = 0.01
BOUNDARY_MIN_GAP = 0.10
IMBALANCE_RATIO = 1.25
EVAL_KEYS = {"iou", "dataset", "split", "precision", "recall"}
# What the detailed analysis reads besides EVAL_KEYS: every eval JSON jaxseg.evaluate has written
# holds them; one without them (cut down, or another tool's) is a row of the metric tables only.
ANALYSIS_KEYS = ("num_images", "per_image", "threshold", "threshold_sweep", "mean_image_iou",
                 "boundary_f1")
ERROR_COLOURS = {"tp": (40, 190, 40), "fp": (230, 30, 30), "fn": (30, 90, 255)}


# ----------------------------------------------------------------------------- document model
# One list of blocks is rendered twice, as HTML and as Markdown, so the two can never disagree.

@dataclasses.dataclass
class Heading:
    """A section heading (level 2 or 3)."""

    text: str
    level: int = 2


@dataclasses.dataclass
class Text:
    """A paragraph of plain text."""

    text: str


@dataclasses.dataclass
class Bullets:
    """A bulleted list of plain-text items."""

    items: list[str]


@dataclasses.dataclass
class Table:
    """A table of already formatted cells."""

    header: list[str]
    rows: list[list[str]]
    text_columns: int = 1  # the first columns hold labels; the rest are numbers (right-aligned)


@dataclasses.dataclass
class Image:
    """A figure: encoded bytes, embedded in the HTML and written beside the Markdown."""

    name: str  # file stem beside the Markdown
    data: bytes
    caption: str
    format: str = "png"  # or "jpeg"

    @property
    def file_name(self) -> str:
        """The figure's file beside the Markdown."""
        return f"{self.name}.{'jpg' if self.format == 'jpeg' else self.format}"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def to_html(title: str, blocks: list) -> str:
    """A self-contained HTML page: styles inline, figures as base64 data URLs."""
    parts = [f"<h1>{html.escape(title)}</h1>"]
    for b in blocks:
        if isinstance(b, Heading):
            parts.append(f"<h{b.level}>{html.escape(b.text)}</h{b.level}>")
        elif isinstance(b, Text):
            parts.append(f"<p>{html.escape(b.text)}</p>")
        elif isinstance(b, Bullets):
            parts.append("<ul>" + "".join(f"<li>{html.escape(i)}</li>" for i in b.items) + "</ul>")
        elif isinstance(b, Table):
            rows = [_html_row(b.header, "th", b.text_columns)]
            rows += [_html_row(r, "td", b.text_columns) for r in b.rows]
            parts.append('<div class="scroll"><table><thead>' + rows[0] + "</thead><tbody>"
                         + "".join(rows[1:]) + "</tbody></table></div>")
        elif isinstance(b, Image):
            data = base64.b64encode(b.data).decode("ascii")
            parts.append(f'<figure><img src="data:image/{b.format};base64,{data}" '
                         f'alt="{html.escape(b.name)}"><figcaption>{html.escape(b.caption)}'
                         "</figcaption></figure>")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>\n<body>\n"
            + "\n".join(parts) + "\n</body></html>\n")


def _html_row(cells: list[str], tag: str, text_columns: int) -> str:
    return "<tr>" + "".join(
        f'<{tag}{"" if j < text_columns else " class=n"}>{html.escape(c)}</{tag}>'
        for j, c in enumerate(cells)) + "</tr>"


_CSS = """
body{font-family:"DejaVu Sans",Helvetica,Arial,sans-serif;max-width:1160px;margin:0 auto;
 padding:12px 24px 48px;color:#1d1d1f;line-height:1.45;font-size:15px}
h1{font-size:26px;margin:12px 0 4px}
h2{font-size:21px;border-bottom:2px solid #d0d4da;padding-bottom:4px;margin-top:36px}
h3{font-size:17px;margin-top:24px}
p{margin:6px 0}
ul{margin:6px 0 10px;padding-left:22px} li{margin:4px 0}
.scroll{overflow-x:auto}
table{border-collapse:collapse;font-size:13px;margin:8px 0}
th,td{border:1px solid #c9ced6;padding:3px 8px;white-space:nowrap}
th{background:#eef1f5;text-align:center;white-space:normal;vertical-align:bottom}
td.n{text-align:right;font-variant-numeric:tabular-nums}
tbody tr:nth-child(even){background:#f8f9fb}
figure{margin:10px 0 18px} figure img{max-width:100%;height:auto;display:block}
figcaption{font-size:13px;color:#555;margin-top:4px}
"""


def to_markdown(title: str, blocks: list) -> str:
    """Markdown with figures referenced as files beside it."""
    def cell(text):
        return text.replace("|", "\\|")

    parts = [f"# {title}"]
    for b in blocks:
        if isinstance(b, Heading):
            parts.append(f"{'#' * b.level} {b.text}")
        elif isinstance(b, Text):
            parts.append(b.text)
        elif isinstance(b, Bullets):
            parts.append("\n".join(f"- {i}" for i in b.items))
        elif isinstance(b, Table):
            align = ["---" if j < b.text_columns else "---:" for j in range(len(b.header))]
            lines = [b.header, align] + b.rows
            parts.append("\n".join("| " + " | ".join(cell(c) for c in line) + " |"
                                    for line in lines))
        elif isinstance(b, Image):
            parts.append(f"![{b.name}]({b.file_name})\n\n*{b.caption}*")
    return "\n\n".join(parts) + "\n"


def _encode(fig: Figure, format: str = "png") -> bytes:
    FigureCanvasAgg(fig)  # the Agg canvas: no display, no pyplot global state
    buffer = io.BytesIO()
    options = {"pil_kwargs": {"quality": 90}} if format == "jpeg" else {}
    fig.savefig(buffer, format=format, dpi=100, **options)
    return buffer.getvalue()


def _fmt(value) -> str:
    return "—" if value is None or not np.isfinite(value) else f"{value:.3f}"


# ----------------------------------------------------------------------------- inputs

@dataclasses.dataclass
class EvalFile:
    """One eval JSON and how the report labels it."""

    path: epath.Path
    result: dict
    peer: bool

    @property
    def key(self) -> tuple[str, str, str]:
        """(dataset, split, folder or ""): which rows it sits beside (results of two folders
        scored as person_folder are two tables)."""
        return self.result["dataset"], self.result["split"], self.result.get("folder", "")

    @property
    def label(self) -> str:
        """The row label: checkpoint name and step (own) or model name (peer)."""
        # Default names are <checkpoint or model>_<dataset>_<split><options> (evaluate's
        # _default_output: _flip, _refine, _members, _r.._eps.., _t.., a folder's part): what is
        # left once dataset and split go is the label.
        stem = self.path.stem.replace(f"_{self.result['dataset']}_{self.result['split']}", "")
        stem = stem or self.path.stem
        if self.peer:
            return f"{stem} (peer)"
        return f"{stem} (step {self.result.get('checkpoint_step')})"


def find_evals(folder: epath.Path, *, peer: bool) -> list[EvalFile]:
    """The eval JSONs directly in `folder` (other JSON files, and hidden ones such as a write's
    partial file that a kill left, are ignored; unreadable ones named on stderr), sorted by name."""
    found = []
    if folder.is_dir():
        # iterdir, not glob: a glob reads a '[' in the folder's own path as a pattern.
        for path in sorted(p for p in folder.iterdir()
                           if p.suffix == ".json" and not p.name.startswith(".")):
            try:
                result = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
                # Said, not skipped without a word: an eval JSON cut short (a copy interrupted)
                # made a report that read as if that evaluation had never run.
                print(f"warning: {path} left out: not a readable JSON file ({err})",
                      file=sys.stderr)
                continue
            if isinstance(result, dict) and EVAL_KEYS <= result.keys():
                found.append(EvalFile(path, result, peer))
    return found


def _prepared_source(dataset: str, split: str, folder: str | None, data_dir: str | None):
    from jaxseg import datasets

    return datasets.data_source(dataset, split, folder=folder, data_dir=data_dir)


class ModelExamples:
    """Examples by id with the model's probabilities at their own size: the overlays' input."""

    def __init__(self, model, image_size: int, step, *, source_for=None):
        """`source_for(dataset, split, folder, data_dir)`: a random-access source (default: the
        prepared data; `folder` is person_folder's root and `data_dir` evaluate's --data_dir,
        from the eval file, else None)."""
        self.model = model
        self.image_size = image_size
        self.step = step
        self._source_for = source_for or _prepared_source
        self._sources = {}  # (dataset, split, folder, data_dir) -> (source, id -> index)
        self._predictors = {}  # (flip_tta, refined, members) -> Predictor (one jit cache each)

    @classmethod
    def from_workdir(cls, workdir: str | os.PathLike, checkpoint: str = "best") -> "ModelExamples":
        """The workdir's checkpoint and the prepared datasets."""
        model, config, described = inference.load(str(workdir), checkpoint)
        return cls(model, config.data.image_size, described["checkpoint_step"])

    def _source(self, dataset: str, split: str, folder: str | None, data_dir: str | None):
        key = dataset, split, folder, data_dir
        if key not in self._sources:
            source = self._source_for(*key)
            self._sources[key] = source, {source[i]["id"]: i for i in range(len(source))}
        return self._sources[key]

    def fetch(self, dataset: str, split: str, ids: list[str], *, flip_tta: bool = False,
              refined: bool = False, members: int | None = None,
              folder: str | None = None, data_dir: str | None = None) -> list[dict]:
        """[{image, mask (H, W) bool, probs (H, W)}] for the ids, in order, predicted with the
        eval file's options (flip TTA, refinement, the first `members` of an ensemble); `folder`
        (person_folder's root, as evaluate --images/--masks records it) and `data_dir` (evaluate's
        --data_dir): where the eval read the photos."""
        from jaxseg.predict import Predictor

        source, index = self._source(dataset, split, folder, data_dir)
        examples = [source[index[i]] for i in ids]
        key = flip_tta, refined, members
        if key not in self._predictors:
            self._predictors[key] = Predictor(first_members(self.model, members), self.image_size,
                                              flip_tta=flip_tta, refined=refined)
        probs = self._predictors[key].probabilities([e["image"] for e in examples])
        return [{"image": e["image"], "mask": e["mask"][..., 0] > 0, "probs": p}
                for e, p in zip(examples, probs)]


def first_members(model, members: int | None):
    """The model an eval with --members N scored: an ensemble's first N members (else MODEL)."""
    if not members or not isinstance(model, LogitAverage) or members >= len(model.members):
        return model
    return of_members(list(model.members)[:members])


# ----------------------------------------------------------------------------- analysis

def threshold_curves(sweep: dict) -> dict:
    """IoU, precision and recall per sweep threshold from the cumulative counts.

    tp(t) = person[t]; fp(t) = pixels[t] - person[t]; fn(t) = person[0] - person[t]
    (at t = 0 every pixel is predicted person, so person[0] is all ground-truth person pixels).
    """
    t = np.asarray(sweep["thresholds"], np.float64)
    person = np.asarray(sweep["person"], np.int64)
    pixels = np.asarray(sweep["pixels"], np.int64)
    tp, fp, fn = person, pixels - person, person[0] - person
    return {"thresholds": t, "tp": tp, "fp": fp, "fn": fn,
            "iou": metrics.image_iou({"tp": tp, "fp": fp, "fn": fn}),
            # Nothing predicted means no false positives: precision 1, as metrics_from_counts says.
            "precision": np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), 1.0),
            "recall": np.where(tp + fn > 0, tp / np.maximum(tp + fn, 1), 1.0)}


def best_threshold_index(curves: dict) -> int:
    """The sweep threshold of highest IoU, ties to the lowest; never the sweep's 0 (every pixel
    a person), which is no setting that evaluate or predict take."""
    return 1 + int(np.argmax(curves["iou"][1:]))


def calibration(sweep: dict) -> dict:
    """Observed person fraction per probability bin [t_i, t_i+1) against the bin centre, and ECE."""
    t = np.asarray(sweep["thresholds"], np.float64)
    person = np.asarray(sweep["person"], np.int64)
    pixels = np.asarray(sweep["pixels"], np.int64)
    upper = np.append(t[1:], 1.0)
    bin_person = person - np.append(person[1:], 0)
    bin_pixels = pixels - np.append(pixels[1:], 0)
    fraction = np.where(bin_pixels > 0, bin_person / np.maximum(bin_pixels, 1), np.nan)
    centre = (t + upper) / 2
    filled = bin_pixels > 0
    ece = float(np.sum(bin_pixels[filled] * np.abs(fraction[filled] - centre[filled]))
                / max(int(bin_pixels.sum()), 1))
    return {"centre": centre, "fraction": fraction, "pixels": bin_pixels, "ece": ece}


def bucket_rows(per_image: list[dict], key: str, buckets) -> list[dict]:
    """Per bucket of `key`: images, mean image IoU, error pixels, their share, and the IoU lost.

    IoU lost = how much the dataset IoU would rise if that bucket's images had no errors.
    """
    values = np.array([r[key] for r in per_image], np.float64)
    counts = {c: np.array([r[c] for r in per_image], np.int64) for c in ("tp", "fp", "fn")}
    ious = metrics.image_iou(counts)
    tp, fp, fn = (int(counts[c].sum()) for c in ("tp", "fp", "fn"))
    iou = float(metrics.image_iou({"tp": [tp], "fp": [fp], "fn": [fn]})[0])
    rows = []
    for label, low, high in buckets:
        inside = (values >= low) & (values < high)
        bfp, bfn = int(counts["fp"][inside].sum()), int(counts["fn"][inside].sum())
        fixed = float(metrics.image_iou({"tp": [tp + bfn], "fp": [fp - bfp], "fn": [fn - bfn]})[0])
        rows.append({"bucket": label, "images": int(inside.sum()),
                     "image_share": float(inside.mean()) if len(values) else 0.0,
                     "mean_iou": float(ious[inside].mean()) if inside.any() else float("nan"),
                     "errors": bfp + bfn, "fp": bfp, "fn": bfn,
                     "error_share": (bfp + bfn) / max(fp + fn, 1), "iou_lost": fixed - iou})
    return rows


# Advice per failure bucket: what kind of data or training change addresses it.
_BUCKET_ADVICE = {
    ("person area", "<10%"): "small people: train at a higher resolution and add zoom-out "
                             "(scale < 1) augmentation",
    ("person area", ">50%"): "close-ups: add zoom-in (scale > 1) augmentation and more close-up "
                             "portraits",
    ("people", "0"): "false positives on person-free images: add images without people to the "
                     "training mixture",
    ("people", "2"): "several people: weight multi-person data (e.g. ccp_person) up in the mixture",
    ("people", "3+"): "crowded scenes: weight multi-person data (e.g. ccp_person) up in the "
                      "mixture",
}


def _bucket_words(family: str, bucket: str) -> str:
    """A bucket in words: 'images with 2 people', 'images whose person covers <10% of them'."""
    if family == "people":
        return {"0": "images with no person", "1": "images with 1 person"}.get(
            bucket, f"images with {bucket} people")
    return f"images whose person covers {bucket} of them"


def _advice(family: str, bucket: str) -> str:
    return _BUCKET_ADVICE.get((family, bucket),
                              "look at the worst predictions below for the common pattern")


def _bucket_recommendations(area: list[dict], people: list[dict], num_images: int) -> list[str]:
    """The bucket that costs the most IoU and, when another one, the most disproportionate one:
    the biggest bucket often costs the most by its size alone."""
    buckets = [("person area", r) for r in area] + [("people", r) for r in people]
    family, worst = max(buckets, key=lambda fr: fr[1]["iou_lost"])
    if worst["errors"] == 0:
        return []
    excess = worst["error_share"] / worst["image_share"]
    text = (f"Most IoU is lost on {_bucket_words(family, worst['bucket'])}: {worst['images']} "
            f"images ({worst['image_share']:.0%}) hold {worst['error_share']:.0%} of all error pixels, "
            f"mean image IoU {_fmt(worst['mean_iou'])}; without those errors IoU would rise by "
            f"{worst['iou_lost']:.3f}.")
    if excess >= IMBALANCE_RATIO:
        text += f" Suggested: {_advice(family, worst['bucket'])}."
    else:  # a bucket-specific fix would be aimed at a bucket that only fails by its size
        text += " That is in proportion to their number: no single kind of image dominates."
    recs = [text]
    sizeable = [(f, r) for f, r in buckets
                if r["images"] >= max(3, 0.05 * num_images) and r is not worst]
    if sizeable:
        family, odd = max(sizeable, key=lambda fr: fr[1]["error_share"] / fr[1]["image_share"])
        excess = odd["error_share"] / odd["image_share"]
        if excess >= IMBALANCE_RATIO:
            recs.append(
                f"Out of proportion: {_bucket_words(family, odd['bucket'])} are "
                f"{odd['image_share']:.0%} of the images but {odd['error_share']:.0%} of the "
                f"error pixels ({excess:.1f}x), mean image IoU {_fmt(odd['mean_iou'])}. "
                f"Suggested: {_advice(family, odd['bucket'])}.")
    return recs


def _threshold_recommendation(result: dict) -> str:
    if result.get("predictions_read_as") == "masks":
        return "No threshold to tune: the predictions scored are 0/1 masks."
    curves = threshold_curves(result["threshold_sweep"])
    best = best_threshold_index(curves)
    best_t, best_iou = float(curves["thresholds"][best]), float(curves["iou"][best])
    used, gain = result["threshold"], best_iou - result["iou"]
    if gain < THRESHOLD_MIN_GAIN:
        return (f"Keep the threshold at {used:g}: the best sweep threshold ({best_t:g}) gains "
                f"only {max(gain, 0):.3f} IoU.")
    caution = (" Choose it on a validation split: tuned on this test split, the gain is "
               "optimistic." if "test" in config_check.split_names(result["split"]) else "")
    return (f"{'Lower' if best_t < used else 'Raise'} the threshold from {used:g} to {best_t:g}: "
            f"IoU {best_iou:.3f} instead of {result['iou']:.3f} (+{gain:.3f}); pass --threshold "
            f"{best_t:g} to evaluate and predict.{caution}")


def _balance_recommendation(result: dict) -> str:
    fp = sum(r["fp"] for r in result["per_image"])
    fn = sum(r["fn"] for r in result["per_image"])
    pr = f"precision {result['precision']:.3f}, recall {result['recall']:.3f}"
    if fn > IMBALANCE_RATIO * fp:
        ratio = (f"{fn / fp:.1f} missed person pixels per false positive" if fp
                 else "no false positives")
        # Thresholds are left to _threshold_recommendation, which reads the sweep.
        return (f"The model under-segments: {ratio} ({pr}). Weight the person class up "
                "(dice_weight, or a positive weight in the cross-entropy).")
    if fp > IMBALANCE_RATIO * fn:
        ratio = (f"{fp / fn:.1f} false-positive pixels per missed person pixel" if fn
                 else "no misses")
        return (f"The model over-segments: {ratio} ({pr}). Add harder backgrounds (person-free "
                "images, clutter).")
    return f"Errors are balanced between false positives and misses ({pr}): no bias to correct."


def _edge_share(result: dict) -> str:
    """How the wrong pixels split between edges and whole regions ('' for older eval files)."""
    tolerance = (result.get("boundary_tolerance_px") or {}).get("original")
    if "near_edge_error_share" not in result or tolerance is None or result["iou"] >= 1.0:
        return ""  # (an IoU of 1: no wrong pixels to split)
    share = result["near_edge_error_share"]
    return (f" {share:.0%} of the wrong pixels lie within {tolerance} px of the true edge (IoU "
            f"{result['iou_without_edge_errors']:.3f} if they were right, the most any edge "
            f"work can reach); the other {1 - share:.0%} are regions missed or added.")


def _boundary_recommendation(result: dict) -> str:
    bf1, iou = result["boundary_f1"], result["iou"]
    edges = _edge_share(result)
    if bf1 >= iou - BOUNDARY_MIN_GAP:
        return (f"Boundary quality keeps pace with the regions (boundary F1 {bf1:.3f}, "
                f"IoU {iou:.3f}).{edges}")
    at_model = (result.get("model_resolution") or {}).get("boundary_f1", 0.0)
    upsampling = (f"; at model resolution boundary F1 is {at_model:.3f}, so edges are lost in "
                  "upsampling" if at_model > bf1 + BOUNDARY_MIN_GAP else "")
    remedies = "a boundary-aware loss term or a higher training resolution"
    # Not for a scored predictions folder: evaluate refuses --refine with --predictions.
    if not result.get("refine") and "predictions_read_as" not in result:
        remedies = ("edge refinement (--refine in evaluate and predict), " + remedies)
    return (f"Boundaries are the weak point: boundary F1 {bf1:.3f} against IoU {iou:.3f}"
            f"{upsampling}. Try {remedies}.{edges}")


def _resolution_recommendation(result: dict, image_size: int | None) -> str:
    at_model, iou = result["model_resolution"]["iou"], result["iou"]
    numbers = f"model resolution {at_model:.3f}, original {iou:.3f}"
    if at_model - iou > RESOLUTION_MIN_GAP:
        size = f" (now {image_size}px; try {2 * image_size}px)" if image_size else ""
        return (f"Upsampling costs {at_model - iou:.3f} IoU ({numbers}): train at a higher "
                f"resolution{size}.")
    return (f"Upsampling costs under {RESOLUTION_MIN_GAP} IoU ({numbers}): resolution is not "
            "the bottleneck.")


def recommendations(result: dict, area: list[dict], people: list[dict], peers: list[EvalFile],
                    image_size: int | None) -> list[str]:
    """Concrete next steps for one evaluation, each stating the numbers it follows from."""
    recs = _bucket_recommendations(area, people, len(result["per_image"]))
    recs += [_threshold_recommendation(result), _balance_recommendation(result),
             _boundary_recommendation(result)]
    if result.get("model_resolution"):  # absent for scored prediction folders
        recs.append(_resolution_recommendation(result, image_size))
    recs += [peer_comparison(result, peer) for peer in peers]
    return recs


def peer_comparison(result: dict, peer: EvalFile) -> str:
    """How far ahead of (or behind) PEER the evaluation RESULT is, and, where both score the same
    images, whether that is more than the split's noise (jaxseg.compare, image by image)."""
    diff = result["iou"] - peer.result["iou"]
    text = (f"{'Ahead of' if diff >= 0 else 'Behind'} {peer.label} by {abs(diff):.3f} IoU "
            f"({result['iou']:.3f} vs {peer.result['iou']:.3f})")
    try:
        paired = compare.compare(compare.Evaluation(result, "this evaluation"),
                                 compare.Evaluation(peer.result, peer.label))
    except ValueError:  # another cut of the split, or a peer JSON without per-image counts
        paired = None
    if paired:
        low, high = paired["iou"]["interval_95"]
        images = paired["images"]
        text += (f", a difference whose 95% interval over images is {low:+.4f} to {high:+.4f}"
                 f"{' (within noise)' if low <= 0 <= high else ''}; higher IoU on "
                 f"{images['a_higher']} of {images['count']} images, {peer.label} on "
                 f"{images['b_higher']}")
    return (f"{text}; boundary F1 {result['boundary_f1']:.3f} vs "
            f"{_fmt(peer.result.get('boundary_f1'))}.")


# ----------------------------------------------------------------------------- figures

def training_figure(records: list[dict]) -> Image | None:
    """Loss, learning rate and validation IoU per dataset against the step (None: no log)."""
    train = [r for r in records if r.get("kind") == "train"]
    val = [r for r in records if r.get("kind") == "validation"]
    if not train and not val:
        return None
    fig = Figure(figsize=(12, 3.4), layout="constrained")
    ax_loss, ax_lr, ax_iou = fig.subplots(1, 3)
    for key, style in (("loss", "-"), ("ce", ":"), ("dice_loss", "--"), ("lovasz_loss", "-.")):
        points = [(r["step"], r[key]) for r in train if key in r]
        if points:
            ax_loss.plot(*zip(*points), style, label=key)
    ax_loss.set(title="training loss", xlabel="step")
    ax_loss.legend(fontsize=8)
    points = [(r["step"], r["learning_rate"]) for r in train if "learning_rate" in r]
    if points:
        ax_lr.plot(*zip(*points))
    ax_lr.set(title="learning rate", xlabel="step")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    names = sorted({k[: -len("/iou")] for r in val for k in r if k.endswith("/iou")})
    for i, name in enumerate(names):
        colour = f"C{i}"
        for key, style, label in ((f"{name}/iou", "o-", name),
                                  (f"{name}/model_res_iou", "x--", f"{name} (model res)")):
            points = [(r["step"], r[key]) for r in val if key in r]
            if points:
                ax_iou.plot(*zip(*points), style, color=colour, label=label, markersize=4)
    ax_iou.set(title="validation IoU", xlabel="step")
    if names:
        ax_iou.legend(fontsize=8)
    return Image("training_curves", _encode(fig),
                 "Training loss (total and its cross-entropy, Dice and any Lovász parts), "
                 "learning rate, and "
                 "validation person IoU per dataset at original resolution (solid) and model "
                 "resolution (dashed).")


def distribution_figure(name: str, result: dict, area: list[dict], people: list[dict]) -> Image:
    """Per-image IoU histogram and mean IoU / error share per area and people bucket."""
    ious = np.array([r["iou"] for r in result["per_image"]])
    fig = Figure(figsize=(12, 4), layout="constrained")
    ax_hist, ax_area, ax_people = fig.subplots(1, 3)
    ax_hist.hist(ious, bins=np.linspace(0, 1, 21), color="C0", edgecolor="white")
    ax_hist.axvline(result["mean_image_iou"], color="k", linestyle="--",
                    label=f"mean image IoU {result['mean_image_iou']:.3f}")
    ax_hist.axvline(result["iou"], color="C3", linestyle=":",
                    label=f"dataset IoU {result['iou']:.3f}")
    ax_hist.set(title="per-image IoU", xlabel="IoU", ylabel="images", xlim=(0, 1))
    ax_hist.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)
    for ax, rows, title in ((ax_area, area, "by person area"),
                            (ax_people, people, "by people (GT regions)")):
        x = np.arange(len(rows))
        ax.bar(x - 0.2, [np.nan_to_num(r["mean_iou"]) for r in rows], 0.4, label="mean image IoU")
        ax.bar(x + 0.2, [r["error_share"] for r in rows], 0.4, label="share of error pixels")
        ax.set(title=title, xticks=x, xticklabels=[f"{r['bucket']}\nn={r['images']}" for r in rows],
               ylim=(0, 1))
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)
    return Image(f"{name}_distribution", _encode(fig),
                 "Left: per-image IoU. Middle and right: per bucket, mean image IoU and the "
                 "bucket's share of all error pixels (fp + fn); n = images in the bucket.")


def threshold_figure(name: str, result: dict) -> Image:
    """Threshold sweep (IoU, precision, recall) and reliability diagram from the sweep counts."""
    curves = threshold_curves(result["threshold_sweep"])
    cal = calibration(result["threshold_sweep"])
    best = best_threshold_index(curves)
    fig = Figure(figsize=(12, 3.8), layout="constrained")
    ax_sweep, ax_cal = fig.subplots(1, 2)
    for key in ("iou", "precision", "recall"):
        ax_sweep.plot(curves["thresholds"], curves[key], "o-", markersize=3, label=key)
    ax_sweep.axvline(result["threshold"], color="k", linestyle="--",
                     label=f"used {result['threshold']:g}")
    ax_sweep.axvline(curves["thresholds"][best], color="C3", linestyle=":",
                     label=f"best IoU at {curves['thresholds'][best]:g}")
    ax_sweep.set(title="threshold sweep (original resolution)", xlabel="threshold", xlim=(0, 1))
    ax_sweep.legend(fontsize=8)
    ax_cal.plot([0, 1], [0, 1], color="0.6", linestyle="--", label="perfect calibration")
    ax_cal.plot(cal["centre"], cal["fraction"], "o-", color="C0", label="observed")
    ax_cal.set(title=f"calibration (ECE {cal['ece']:.3f})", xlim=(0, 1), ylim=(0, 1),
               xlabel="predicted P(person), bin centre", ylabel="fraction of person pixels")
    ax_cal.legend(fontsize=8, loc="upper left")
    share = ax_cal.twinx()
    share.set_zorder(ax_cal.get_zorder() - 1)  # bars behind the curve, whose background goes
    ax_cal.patch.set_visible(False)
    share.bar(cal["centre"], cal["pixels"] / max(int(cal["pixels"].sum()), 1), width=0.045,
              color="C1", alpha=0.25)
    share.set(yscale="log", ylabel="share of pixels (bars)")
    return Image(f"{name}_threshold", _encode(fig),
                 "Left: IoU, precision and recall of the person class against the probability "
                 "threshold. Right: fraction of person pixels among pixels whose probability falls "
                 "in each 0.05 bin, against the bin centre (on the diagonal = calibrated); bars: "
                 "share of all pixels in each bin.")


def _thumbnail(array: np.ndarray, max_side: int) -> np.ndarray:
    """Downscaled for display only: the figures would resample anyway, this keeps them small."""
    h, w = array.shape[:2]
    scale = min(1.0, max_side / max(h, w))
    if scale == 1.0:
        return array
    return cv2.resize(array, (max(1, round(w * scale)), max(1, round(h * scale))),
                      interpolation=cv2.INTER_AREA)


def error_map(image: np.ndarray, target: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """The photo dimmed to grey with TP, FP and FN pixels tinted (green, red, blue)."""
    grey = np.repeat(image.astype(np.float32).mean(axis=2, keepdims=True), 3, axis=2) * 0.5
    for kind, where in (("tp", target & pred), ("fp", ~target & pred), ("fn", target & ~pred)):
        grey[where] = 0.3 * grey[where] + 0.7 * np.array(ERROR_COLOURS[kind], np.float32)
    return grey.astype(np.uint8)


def overlay_figure(name: str, title: str, records: list[dict], examples: list[dict],
                   threshold: float) -> Image:
    """Rows of (image, ground truth, prediction, error map) for the given per-image records."""
    tint = Renderer(mode="overlay", threshold=0.5)
    # The figure's width follows the photos' shape, so portrait photos leave no empty margins.
    aspect = float(np.median([ex["image"].shape[1] / ex["image"].shape[0] for ex in examples]))
    panel = 2.6
    fig = Figure(figsize=(min(12.0, 4 * panel * min(max(aspect, 0.6), 1.6) + 0.8),
                          panel * len(records) + 0.7), layout="constrained")
    axes = fig.subplots(len(records), 4, squeeze=False)
    for row, record, ex in zip(axes, records, examples):
        pred = ex["probs"] >= threshold
        panels = (ex["image"], tint.render(ex["image"], ex["mask"].astype(np.float32)),
                  tint.render(ex["image"], pred.astype(np.float32)),
                  error_map(ex["image"], ex["mask"], pred))
        for ax, image in zip(row, panels):
            ax.imshow(_thumbnail(image, 320))
            ax.set_xticks([])
            ax.set_yticks([])
        row[0].set_ylabel(f"{record['id']}\nIoU {record['iou']:.3f}", fontsize=9)
    for ax, heading in zip(axes[0], ("image", "ground truth", "prediction", "errors")):
        ax.set_title(heading, fontsize=10)
    fig.legend(handles=[Patch(color=np.array(ERROR_COLOURS[k]) / 255, label=label)
                        for k, label in (("tp", "correct person"), ("fp", "false positive"),
                                         ("fn", "missed person"))],
               loc="outside upper center", ncol=3, fontsize=9, title=title)
    return Image(name, _encode(fig, "jpeg"),
                 f"{title}: photo, ground truth and prediction (threshold {threshold:g}) tinted, "
                 "and the error map (green = correct person, red = false positive, blue = missed "
                 "person); IoU as scored by the evaluator.", format="jpeg")


# ----------------------------------------------------------------------------- sections

def metric_tables(own: list[EvalFile], peers: list[EvalFile]) -> list:
    """Per dataset and split, a heading and one row per eval file, peers after the model's rows."""
    header = ["model", "IoU", "IoU (model res)", "mean image IoU", "mIoU", "Dice", "precision",
              "recall", "pixel acc.", "boundary F1", "BF1 (model res)", "images"]
    blocks = []
    for key in sorted({e.key for e in own}):
        rows = []
        for e in [e for e in own if e.key == key] + [p for p in peers if p.key == key]:
            r, m = e.result, e.result.get("model_resolution") or {}
            rows.append([e.label, _fmt(r["iou"]), _fmt(m.get("iou")),
                         _fmt(r.get("mean_image_iou")), _fmt(r.get("miou")), _fmt(r.get("dice")),
                         _fmt(r["precision"]), _fmt(r["recall"]), _fmt(r.get("pixel_accuracy")),
                         _fmt(r.get("boundary_f1")), _fmt(m.get("boundary_f1")),
                         str(r.get("num_images", len(r.get("per_image", []))))])
        folder = f" ({key[2]})" if key[2] else ""
        blocks += [Heading(f"{key[0]} / {key[1]}{folder}", 3), Table(header, rows)]
    return blocks


def _bucket_table(title: str, rows: list[dict]) -> Table:
    return Table([title, "images", "mean image IoU", "fp pixels", "fn pixels", "share of errors",
                  "IoU lost"],
                 [[r["bucket"], str(r["images"]), _fmt(r["mean_iou"]), f"{r['fp']:,}",
                   f"{r['fn']:,}", f"{r['error_share']:.1%}", f"{r['iou_lost']:.3f}"]
                  for r in rows])


def pick_examples(per_image: list[dict], k: int) -> tuple[list[dict], list[dict]]:
    """(best k, worst k) by IoU; images with neither person nor prediction are no example."""
    scored = sorted((r for r in per_image if r["tp"] + r["fp"] + r["fn"] > 0),
                    key=lambda r: (r["iou"], r["id"]))
    return scored[::-1][:k], scored[:k]


def eval_section(e: EvalFile, peers: list[EvalFile], examples, k: int,
                 image_size: int | None) -> tuple[list, list[str]]:
    """(blocks, recommendations) of the detailed analysis of one own eval file."""
    r = e.result
    missing = [key for key in ANALYSIS_KEYS if key not in r]
    if missing:  # else a KeyError's traceback, and no report at all
        note = (f"Not analysed: {e.path.name} lacks {', '.join(missing)}, which every eval JSON "
                "of jaxseg.evaluate holds; evaluate again for the analysis.")
        return [Heading(f"{r['dataset']} / {r['split']}: {e.label}"), Text(note)], [note]
    if not r["num_images"]:  # its ratios would read as a perfect or undefined score
        return ([Heading(f"{r['dataset']} / {r['split']}: {e.label}"), Text("No images.")],
                ["No images were evaluated: nothing to analyse."])
    name = _slug(e.path.stem)
    area = bucket_rows(r["per_image"], "person_fraction", AREA_BUCKETS)
    people = bucket_rows(r["per_image"], "regions", REGION_BUCKETS)
    recs = recommendations(r, area, people, peers, image_size)
    options = [o for o, on in (("flip TTA", r.get("flip_tta")), ("refinement", r.get("refine")))
               if on]
    applied = " with " + " and ".join(options) if options else ""
    tolerance = (r.get("boundary_tolerance_px") or {}).get("original", "?")
    blocks = [Heading(f"{r['dataset']} / {r['split']}: {e.label}{applied}"),
              Text(f"{r['num_images']} images, threshold {r['threshold']:g}, IoU {r['iou']:.3f} "
                   f"(mean image IoU {r['mean_image_iou']:.3f}), boundary F1 "
                   f"{r['boundary_f1']:.3f} at a tolerance of {tolerance} px."),
              Heading("Where it fails", 3),
              distribution_figure(name, r, area, people),
              Text("IoU lost = how much the dataset IoU would rise if the bucket's images had no "
                   "errors. People = 8-connected ground-truth regions covering at least "
                   f"{input_pipeline.MIN_REGION_FRACTION:.1%} of the image, as the evaluator "
                   "counts them. Images without any person pixel are in no person-area bucket "
                   "(their errors are people 0's)."),
              _bucket_table("person area", area), _bucket_table("people", people),
              Heading("Threshold and calibration", 3), threshold_figure(name, r),
              Heading("Best and worst predictions", 3)]
    best, worst = pick_examples(r["per_image"], k)
    custom_refine = r.get("refine") and (r.get("refine_radius", refine.RADIUS),
                                         r.get("refine_eps", refine.EPS)) != (refine.RADIUS,
                                                                              refine.EPS)
    if not worst:
        blocks.append(Text("No overlays: no image has a person or a prediction to show."))
    elif examples is None:
        blocks.append(Text("Overlays skipped: the model could not be loaded from the workdir."))
    elif custom_refine:
        blocks.append(Text("Overlays skipped: they refine with the default radius and eps, and "
                           "this evaluation used others."))
    else:
        try:
            for which, records in (("worst", worst), ("best", best)):
                fetched = examples.fetch(r["dataset"], r["split"], [x["id"] for x in records],
                                         flip_tta=bool(r.get("flip_tta")),
                                         refined=bool(r.get("refine")), members=r.get("members"),
                                         folder=r.get("folder"), data_dir=r.get("data_dir"))
                blocks.append(overlay_figure(f"{name}_{which}", f"{which} {len(records)} by IoU",
                                             records, fetched, r["threshold"]))
        except (FileNotFoundError, KeyError, ValueError) as err:
            blocks.append(Text(f"Overlays skipped: {err.__class__.__name__}: {err}"))
    return blocks, recs


def build_report(workdir: str | os.PathLike, output: str | os.PathLike | None = None, *,
                 k: int = 6, peer_dir: str | os.PathLike | None = None, examples=None,
                 checkpoint: str = "best") -> dict:
    """Writes report.html and report.md (+ figure files) to `output`; returns their paths.

    `examples` supplies the overlays (`.step` and `.fetch`, see ModelExamples); own eval files of
    that checkpoint step get the detailed analysis (all own eval files when it is None).
    `checkpoint`: the name `examples` was loaded by, for the evaluate command the report gives
    when no eval JSON is of its step.
    """
    # workdir_path: a gs:// workdir stays a URL (pathlib would make it a local 'gs:/' folder).
    workdir = workdir_path(workdir)
    output = workdir_path(output) if output else workdir / "report"
    peer_dir = workdir_path(peer_dir) if peer_dir else workdir.parent / "peers"
    own = find_evals(workdir / "eval", peer=False)
    peers = [p for p in find_evals(peer_dir, peer=True) if p.key in {e.key for e in own}]
    config_path = workdir / "config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    image_size = config.get("data", {}).get("image_size")
    step = getattr(examples, "step", None)
    detailed = [e for e in own if examples is None or e.result.get("checkpoint_step") in (
        step, inference.member_steps(step, e.result.get("members")))]

    model = config.get("model", {})
    blocks = [Text(f"Workdir {workdir} · model depth {model.get('depth', '?')}, "
                   f"{model.get('base_features', '?')} base features, trained at "
                   f"{image_size or '?'}px · generated {datetime.datetime.now():%Y-%m-%d %H:%M}.")]
    sections, all_recs = [], []
    for e in detailed:
        section, recs = eval_section(e, [p for p in peers if p.key == e.key], examples, k,
                                     image_size)
        sections += section
        all_recs.append((e, recs))
    blocks.append(Heading("Recommendations"))
    if not all_recs:
        from jaxseg.evaluate import PRETRAINED_RUN_DIR

        pretrained = workdir == workdir_path(PRETRAINED_RUN_DIR)  # evaluate needs no --workdir
        # Without the checkpoint's name the command scored 'best', whose eval JSONs another
        # --checkpoint's report still would not analyse; without a model there is no step.
        options = ("" if pretrained else f" --workdir {workdir}") + (
            "" if checkpoint == "best" else f" --checkpoint {checkpoint}")
        of_step = "" if examples is None else f" of checkpoint step {step}"
        blocks.append(Text(
            f"No eval JSON{of_step} under {workdir / 'eval'}: run python -m jaxseg.evaluate"
            f"{options} --dataset NAME --split SPLIT first."))
    for e, recs in all_recs:
        blocks += [Heading(f"{e.result['dataset']} / {e.result['split']}: {e.label}", 3),
                   Bullets(recs)]
    blocks.append(Heading("Training"))
    training = training_figure(metric_writer.read_metrics(workdir))
    blocks.append(training or Text(f"No {metric_writer.METRICS_FILE} in the workdir."))
    blocks += [Heading("Metrics"),
               Text("Original resolution is the headline; model-resolution columns beside it. "
                    f"Peers: eval JSONs of other models in {peer_dir} for the same dataset and "
                    "split.")]
    blocks += metric_tables(own, peers)
    blocks += sections

    # Slugs drop punctuation, so test[:50%] and test[50%:] named their figures alike, and the
    # Markdown showed one section's charts in both: later figures of a taken name are numbered.
    taken = set()
    for b in blocks:
        if isinstance(b, Image):
            name, n = b.name, 1
            while name in taken:
                n += 1
                name = f"{b.name}-{n}"
            b.name = name
            taken.add(name)
    title = f"jaxseg report: {workdir.name}"
    output.mkdir(parents=True, exist_ok=True)
    for b in blocks:
        if isinstance(b, Image):
            (output / b.file_name).write_bytes(b.data)
    write_text_whole(output / "report.html", to_html(title, blocks))
    write_text_whole(output / "report.md", to_markdown(title, blocks))
    return {"html": output / "report.html", "markdown": output / "report.md",
            "figures": [output / b.file_name for b in blocks if isinstance(b, Image)]}


def main(argv):
    """Entry point: load the model for the overlays, build the report, print where it went."""
    refuse_positional(argv)
    from absl import flags
    from absl import logging as absl_logging

    from jaxseg import evaluate

    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every restore at INFO

    f = flags.FLAGS
    workdir = f.workdir
    if f.peer_dir and not workdir_path(f.peer_dir).is_dir():
        raise SystemExit(f"error: --peer_dir {f.peer_dir}: no such folder")
    problem = inference.checkpoint_problem(workdir, f.checkpoint)  # as evaluate says it
    if problem:
        raise SystemExit(f"error: {problem}")
    # The pretrained model's eval JSONs are where jaxseg.evaluate put them.
    workdir = workdir or workdir_path(evaluate.PRETRAINED_RUN_DIR)
    output = workdir_path(f.output) if f.output else workdir_path(workdir) / "report"
    # Before the minutes of predicting the overlays, and before the pretrained model's config is
    # written (a refused --output left runs/pretrained/config.json in the current folder).
    problem = local_folder_problem(output)
    if problem:
        raise SystemExit(f"error: report folder {output}: {problem}; "
                         "give --output a writable folder")
    if not f.workdir:
        try:
            model, config, card = inference.load_pretrained()
        except FileNotFoundError as e:  # weights lost or cut short: one line, as predict says it
            raise SystemExit(f"error: {e}") from None
        workdir.mkdir(parents=True, exist_ok=True)
        write_text_whole(workdir / "config.json", config.to_json(indent=2))
    try:
        examples = (ModelExamples.from_workdir(workdir, f.checkpoint) if f.workdir else
                    ModelExamples(model, config.data.image_size, card.get("steps")))
    except FileNotFoundError as err:  # eval JSONs without checkpoints still make a report
        print(f"no model for the overlays ({err}); reporting every eval JSON without them")
        examples = None
    paths = build_report(workdir, f.output or None, k=f.k, peer_dir=f.peer_dir or None,
                         examples=examples, checkpoint=f.checkpoint)
    print(f"wrote {paths['html']} and {paths['markdown']} ({len(paths['figures'])} figures)")


def _define_flags():
    from absl import flags

    flags.DEFINE_string("workdir", "", "Training workdir; empty = the pretrained model.")
    flags.DEFINE_string("output", "", "Report folder (default WORKDIR/report).")
    flags.DEFINE_integer("k", 6, "Best and worst predictions shown per evaluation.", lower_bound=1)
    flags.DEFINE_string("peer_dir", "", "Eval JSONs of other models (default WORKDIR/../peers).")
    flags.DEFINE_string("checkpoint", "best",
                        "Checkpoint whose eval JSONs get the detailed analysis and overlays.")


if __name__ == "__main__":
    _define_flags()
    run_absl(main)
