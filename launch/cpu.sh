#!/usr/bin/env bash
# The main job on a CPU machine: set up, train configs/default.py (rerunning resumes), then
# evaluate the best checkpoint on both test splits at original resolution.
# Usage: bash launch/cpu.sh [WORKDIR (default runs/default)] [--config.field=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/setup_env.sh
workdir=${1:-runs/default}
[ $# -gt 0 ] && shift
echo "+ python -m jaxseg.train --config configs/default.py --workdir $workdir $*"
python -m jaxseg.train --config configs/default.py --workdir "$workdir" "$@"
for dataset in portrait_segmentation ccp_person; do
  echo "+ python -m jaxseg.evaluate --workdir $workdir --dataset $dataset --split test"
  python -m jaxseg.evaluate --workdir "$workdir" --dataset "$dataset" --split test
done
