#!/usr/bin/env bash
# One NVIDIA GPU: venv with the CUDA build of jax, train configs/gpu.py, then evaluate the best
# checkpoint on the test splits. Rerunning resumes from the workdir's latest checkpoint.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/gpu.sh [--dry-run] [--skip-install] [--] [TRAIN_ARGS...]

TRAIN_ARGS go to jaxseg.train: config overrides (--config.FIELD=VALUE); anything else is refused
before anything runs.

  1. checks nvidia-smi (an NVIDIA driver) is there
  2. creates $VENV if needed; pip installs requirements.txt, then jax[$JAX_CUDA] at the pinned version
  3. python -m jaxseg.train --config $CONFIG --workdir $WORKDIR TRAIN_ARGS...
  4. python -m jaxseg.evaluate --workdir $WORKDIR --checkpoint best --split test
       --dataset portrait_segmentation, then --dataset ccp_person
       (results in $WORKDIR/eval/best_<dataset>_test.json)

  --dry-run       print the commands without running them
  --skip-install  use $VENV as it is (no pip)
  -h, --help      this help

Environment: VENV (default .venv), WORKDIR (default runs/gpu), CONFIG (default configs/gpu.py),
JAX_CUDA (default cuda12; cuda13 for CUDA 13 drivers),
PYTHON (interpreter that creates the venv, default python3; needs 3.12+), and the data settings
JAXSEG_MANUAL_DIR (folder with portraits/ and ccp/; unset = download the public archives) and
TFDS_DATA_DIR (built datasets, default ~/tensorflow_datasets).
Relative paths are relative to the repository root.

Example: launch/gpu.sh --config.train.num_steps=100
EOF
}

die() { echo "gpu.sh: error: $*" >&2; exit 2; }
run() { echo "+ $(printf '%q ' "$@")"; [[ -n $dry_run ]] || "$@"; }

dry_run="" skip_install=""
while (($#)); do
  case $1 in
    --dry-run) dry_run=1; shift ;;
    --skip-install) skip_install=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) break ;;  # TRAIN_ARGS, checked below
  esac
done

cd "$(dirname "$0")/.."
source launch/train_args.sh
check_train_args gpu.sh ${1+"$@"}
VENV=${VENV:-.venv} WORKDIR=${WORKDIR:-runs/gpu} CONFIG=${CONFIG:-configs/gpu.py} JAX_CUDA=${JAX_CUDA:-cuda12}
check_workdir gpu.sh "$WORKDIR"
# pip installs the CPU jax for an extra it does not know (cuda-12), and says so in a warning only.
[[ $JAX_CUDA =~ ^cuda[0-9]+$ ]] || die "JAX_CUDA=$JAX_CUDA: name jax's CUDA extra, cuda12 or cuda13"
command -v nvidia-smi >/dev/null ||
  die "nvidia-smi not found: this script needs an NVIDIA GPU and its driver (for CPU runs use" \
      "python -m jaxseg.train directly or launch/local_cluster.sh)"
[[ -f $CONFIG ]] || die "config not found: $CONFIG"
jax_version=$(sed -n 's/^jax==\([^ ;#]*\).*/\1/p' requirements.txt)
[[ -n $jax_version ]] || die "no 'jax==VERSION' line in requirements.txt"
if [[ -n ${JAXSEG_MANUAL_DIR:-} && ! -d $JAXSEG_MANUAL_DIR/portraits && ! -d $JAXSEG_MANUAL_DIR/ccp ]]; then
  die "JAXSEG_MANUAL_DIR=$JAXSEG_MANUAL_DIR has neither portraits/ nor ccp/"
fi
echo "GPU run: config $CONFIG, workdir $WORKDIR, venv $VENV, jax[$JAX_CUDA]==$jax_version," \
     "JAXSEG_MANUAL_DIR=${JAXSEG_MANUAL_DIR:-<unset>} TFDS_DATA_DIR=${TFDS_DATA_DIR:-<unset>}"

run nvidia-smi -L
python=$VENV/bin/python
# jax 0.12 needs Python 3.12+: a venv of an older one would fail at every install, and be reused.
needs_312='import sys; sys.exit(sys.version_info < (3, 12))'
if [[ -z $skip_install ]]; then
  if [[ ! -x $python ]]; then
    [[ -n $dry_run ]] || "${PYTHON:-python3}" -c "$needs_312" 2>/dev/null \
      || die "${PYTHON:-python3} is not Python 3.12 or newer (jax $jax_version needs it): set PYTHON=/path/to/python3.12"
    run "${PYTHON:-python3}" -m venv "$VENV"
  elif [[ -z $dry_run ]] && ! "$python" -c "$needs_312"; then
    die "$VENV has $("$python" --version 2>&1), and jax $jax_version needs 3.12 or newer: remove it and run again"
  fi
  run "$python" -m pip install -r requirements.txt
  run "$python" -m pip install -U "jax[$JAX_CUDA]==$jax_version"
elif [[ ! -x $python && -z $dry_run ]]; then
  die "--skip-install: no virtual environment at $VENV"
fi
run "$python" -c 'import jax; d = jax.devices(); print(d); assert d[0].platform == "gpu", "jax sees no GPU"'
run "$python" -m jaxseg.train --config "$CONFIG" --workdir "$WORKDIR" ${1+"$@"}
for dataset in portrait_segmentation ccp_person; do
  run "$python" -m jaxseg.evaluate --workdir "$WORKDIR" --checkpoint best --dataset "$dataset" --split test
done
