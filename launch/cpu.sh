#!/usr/bin/env bash
# The main job on a CPU machine: set up, train configs/default.py (rerunning resumes), then
# evaluate the best checkpoint on both test splits at original resolution.
# Usage: bash launch/cpu.sh [WORKDIR (default runs/default)] [--] [--config.field=value ...]
# A first argument starting with '-' is not a WORKDIR: `bash launch/cpu.sh --config.x=1` trains
# into runs/default. Arguments other than config overrides are refused before the setup.
# A relative WORKDIR is relative to the repository root. Another config file: after
# `source launch/setup_env.sh`, `python -m jaxseg.train --config FILE --workdir DIR`.
set -euo pipefail
usage() { sed -n '2,8p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
workdir=runs/default
case ${1:-} in
  -h|--help) usage; exit 0 ;;
  -*) ;;  # options (or --) only: the default workdir
  '') if (($#)); then shift; fi ;;  # none, or an empty WORKDIR: the default
  *) workdir=$1; shift ;;
esac
[[ ${1:-} != -- ]] || shift
cd "$(dirname "$0")/.."
source launch/train_args.sh
check_train_args cpu.sh ${1+"$@"}
check_workdir cpu.sh "$workdir"
source launch/setup_env.sh
echo "+ python -m jaxseg.train --config configs/default.py --workdir $workdir $*"
python -m jaxseg.train --config configs/default.py --workdir "$workdir" "$@"
for dataset in portrait_segmentation ccp_person; do
  echo "+ python -m jaxseg.evaluate --workdir $workdir --dataset $dataset --split test"
  python -m jaxseg.evaluate --workdir "$workdir" --dataset "$dataset" --split test
done
