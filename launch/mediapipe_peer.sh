#!/usr/bin/env bash
# Peer baseline: MediaPipe Selfie Segmentation scored by jaxseg's own evaluator on the same splits.
# MediaPipe lives in its own venv (it pins numpy<2 and an old jax), never in jaxseg's.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/mediapipe_peer.sh [-d dataset]... [-s split] [-m general|landscape] [-o outdir] [-n]

For each dataset:
  1. $JAXSEG_VENV/bin/python launch/export_split.py   photos -> OUTDIR/work/<dataset>_<split>/images/<id>.png
  2. creates $MEDIAPIPE_VENV (once) and pip installs mediapipe==0.10.21 into it
  3. $MEDIAPIPE_VENV/bin/python launch/mediapipe_segment.py   -> .../masks_<model>/<id>.png (0/255)
     (prints MediaPipe's mean ms/image, batch 1, on this CPU)
  4. $JAXSEG_VENV/bin/python -m jaxseg.evaluate --dataset D --split S --predictions MASKS
       --output OUTDIR/mediapipe_<dataset>_<split>.json   (mediapipe_landscape_... for -m landscape)

  -d DATASET  portrait_segmentation or ccp_person; repeat or comma-separate
              (default: portrait_segmentation and ccp_person)
  -s SPLIT    split (default test)
  -m MODEL    general (256x256, model_selection=0; default) or landscape (144x256, 1)
  -o OUTDIR   results folder (default runs/peers)
  -n          dry run: print the commands without running them
  -h          this help

Environment: MEDIAPIPE_VENV (default .venv-mediapipe), MEDIAPIPE_PYTHON (interpreter that creates
it; default the first Python 3.9-3.12 found among python3.12 ... python3.9 on PATH and
$PYENV_ROOT/versions, as mediapipe 0.10.21 has wheels for cp39-cp312 only), JAXSEG_VENV (jaxseg's
venv, default .venv), and the data settings JAXSEG_MANUAL_DIR and TFDS_DATA_DIR as for jaxseg
(`source launch/setup_env.sh` first sets both as the other launchers use them).
Relative paths are relative to the repository root.
EOF
}

die() { echo "mediapipe_peer.sh: error: $*" >&2; exit 2; }
run() { echo "+ $(printf '%q ' "$@")"; [[ -n $dry_run ]] || "$@"; }

MEDIAPIPE_VERSION=0.10.21
datasets=() split=test model=general outdir=runs/peers dry_run=""
while getopts ":d:s:m:o:nh" opt; do
  case $opt in
    d) IFS=, read -r -a more <<<"$OPTARG"; datasets+=("${more[@]}") ;;
    s) split=$OPTARG ;;
    m) model=$OPTARG ;;
    o) outdir=$OPTARG ;;
    n) dry_run=1 ;;
    h) usage; exit 0 ;;
    :) die "option -$OPTARG needs a value (see -h)" ;;
    *) die "unknown option -$OPTARG (see -h)" ;;
  esac
done
shift $((OPTIND - 1))
(($# == 0)) || die "unexpected arguments: $* (see -h)"
((${#datasets[@]})) || datasets=(portrait_segmentation ccp_person)

cd "$(dirname "$0")/.."
MEDIAPIPE_VENV=${MEDIAPIPE_VENV:-.venv-mediapipe} JAXSEG_VENV=${JAXSEG_VENV:-.venv}

# ---- early checks: everything that can fail without running anything
for d in "${datasets[@]}"; do
  case $d in
    portrait_segmentation|ccp_person) ;;
    *) die "unknown dataset '$d': choose portrait_segmentation or ccp_person" ;;
  esac
done
case $model in
  general|landscape) ;;
  *) die "unknown model '$model': choose general or landscape" ;;
esac
[[ $split =~ ^[A-Za-z0-9_]+$ ]] || die "bad split name '$split'"
for f in launch/export_split.py launch/mediapipe_segment.py; do
  [[ -f $f ]] || die "$f not found"
done
jax_python=$JAXSEG_VENV/bin/python
[[ -x $jax_python ]] ||
  die "jaxseg's venv not found at $JAXSEG_VENV (create it: python3.12 -m venv .venv &&" \
      ".venv/bin/pip install -r requirements.txt, or set JAXSEG_VENV)"
[[ $(realpath -m "$MEDIAPIPE_VENV") != $(realpath -m "$JAXSEG_VENV") ]] ||
  die "MEDIAPIPE_VENV and JAXSEG_VENV are the same folder: mediapipe must not enter jaxseg's venv"
if [[ -n ${JAXSEG_MANUAL_DIR:-} && ! -d $JAXSEG_MANUAL_DIR ]]; then
  die "JAXSEG_MANUAL_DIR=$JAXSEG_MANUAL_DIR is not a folder"
fi

supported() {  # true if $1 is a Python that mediapipe 0.10.21 has a wheel for (3.9-3.12)
  "$1" -c 'import sys; sys.exit(not (3, 9) <= sys.version_info[:2] <= (3, 12))' 2>/dev/null
}
mp_python=$MEDIAPIPE_VENV/bin/python
if [[ -x $mp_python ]]; then
  supported "$mp_python" || die "$MEDIAPIPE_VENV holds Python $("$mp_python" -V 2>&1);" \
    "mediapipe $MEDIAPIPE_VERSION needs 3.9-3.12: remove the folder or set MEDIAPIPE_VENV"
  base_python=""
else
  base_python=${MEDIAPIPE_PYTHON:-}
  if [[ -n $base_python ]]; then
    supported "$base_python" || die "MEDIAPIPE_PYTHON=$base_python is not a Python 3.9-3.12"
  else
    pyenv_root=${PYENV_ROOT:-$HOME/.pyenv}
    for minor in 12 11 10 9; do
      for candidate in "python3.$minor" "$pyenv_root"/versions/3.$minor.*/bin/python; do
        if command -v "$candidate" >/dev/null && supported "$candidate"; then
          # the real interpreter, not a shim or a venv's link
          base_python=$("$candidate" -c 'import sys; print(getattr(sys, "_base_executable", "") or sys.executable)')
          break 2
        fi
      done
    done
    [[ -n $base_python ]] ||
      die "no Python 3.9-3.12 found for mediapipe $MEDIAPIPE_VERSION (its wheels are cp39-cp312);" \
          "set MEDIAPIPE_PYTHON=/path/to/python3.12"
  fi
fi

if [[ $model == general ]]; then tag=mediapipe; else tag=mediapipe_$model; fi
echo "MediaPipe peer: datasets ${datasets[*]}, split $split, model $model," \
     "mediapipe venv $MEDIAPIPE_VENV${base_python:+ (to create with $base_python)}," \
     "jaxseg venv $JAXSEG_VENV, results in $outdir/${tag}_<dataset>_$split.json," \
     "JAXSEG_MANUAL_DIR=${JAXSEG_MANUAL_DIR:-<unset>} TFDS_DATA_DIR=${TFDS_DATA_DIR:-<unset>}"

# ---- the mediapipe venv (its own; reused when it already has the right mediapipe)
if [[ -n $base_python ]]; then
  run "$base_python" -m venv "$MEDIAPIPE_VENV"
fi
if [[ -n $dry_run ]] || ! "$mp_python" -c \
    "import sys, mediapipe; sys.exit(mediapipe.__version__ != '$MEDIAPIPE_VERSION')" 2>/dev/null; then
  run "$mp_python" -m pip install --disable-pip-version-check -q "mediapipe==$MEDIAPIPE_VERSION"
fi
run "$mp_python" -c "import mediapipe as mp; mp.solutions.selfie_segmentation.SelfieSegmentation;
print('mediapipe', mp.__version__, 'in', mp.__file__)"

# ---- per dataset: export, segment, evaluate
for d in "${datasets[@]}"; do
  work=$outdir/work/${d}_$split
  result=$outdir/${tag}_${d}_$split.json
  echo "== $d/$split"
  run "$jax_python" launch/export_split.py --dataset "$d" --split "$split" --out "$work/images"
  run "$mp_python" launch/mediapipe_segment.py --images "$work/images" --out "$work/masks_$model" \
    --model "$model"
  run "$jax_python" -m jaxseg.evaluate --dataset "$d" --split "$split" \
    --predictions "$work/masks_$model" --output "$result"
done
if [[ -n $dry_run ]]; then
  echo "dry run: nothing was run; a real run writes $outdir/${tag}_*_$split.json"
else
  echo "done: results in $outdir/${tag}_*_$split.json"
fi
