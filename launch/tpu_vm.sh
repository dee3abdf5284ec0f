#!/usr/bin/env bash
# Cloud TPU VM or pod slice: create (or reuse) it, copy the code and data to every worker, install,
# train configs/tpu.py on all workers at once, then evaluate the best checkpoint on the test splits.
# Rerunning with the same --name and --workdir reuses the VM and resumes from the last checkpoint.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/tpu_vm.sh --zone ZONE --workdir gs://BUCKET/PATH [options] [--] [TRAIN_ARGS...]

  --name NAME               TPU VM name (default jaxseg-tpu); reused if it exists
  --zone ZONE               required, e.g. us-west4-a (v5e), us-central2-b (v4)
  --accelerator-type TYPE   default v5litepod-8; e.g. v4-8, v4-32, v5litepod-32, v5p-8, v6e-8
  --runtime-version V       default from TYPE: v4 tpu-ubuntu2204-base, v5litepod v2-alpha-tpuv5-lite,
                            v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e
  --workdir DIR             required: checkpoints and logs, on storage every worker shares
                            (gs://...; a local path only on single-host types, numbered up to 8)
  --manual-dir DIR          raw data (portraits/ and ccp/), gs://... or a local folder, copied to
                            every worker's disk (default: each worker downloads the public
                            archives); each worker builds its TFDS datasets on its own disk
  --project PROJECT         default: gcloud's configured project
  --dry-run                 print the commands without running them
  -h, --help                this help

TRAIN_ARGS go to jaxseg.train: config overrides (e.g. --config.train.num_steps=100); anything
else, and any bad setting above, is refused before gcloud is called. CONFIG (default configs/tpu.py)
picks another config (a path from your folder or the repository's; one outside configs/ travels as
configs/launch_NAME). Workers get Python 3.12 (uv if the image lacks it) in ~/jaxseg-venv and
`pip install -r requirements.txt "jax[tpu]==<version pinned there>"`; results of the test
evaluation land in WORKDIR/eval/. The TPU VM keeps running (and billing) afterwards: delete it with
  gcloud compute tpus tpu-vm delete NAME --zone ZONE

Example:
  launch/tpu_vm.sh --zone us-west4-a --accelerator-type v5litepod-32 \
      --workdir gs://my-bucket/jaxseg/run1 --manual-dir gs://my-bucket/jaxseg/data
EOF
}

die() { echo "tpu_vm.sh: error: $*" >&2; exit 2; }
run() { echo "+ $(printf '%q ' "$@")"; [[ -n $dry_run ]] || "$@"; }

name=jaxseg-tpu zone="" accelerator=v5litepod-8 runtime="" workdir="" manual_dir="" project=""
dry_run=""
while (($#)); do
  case $1 in
    --name|--zone|--accelerator-type|--runtime-version|--workdir|--manual-dir|--project)
      [[ $# -ge 2 && $2 != -* ]] || die "$1 needs a value"
      case $1 in
        --name) name=$2 ;; --zone) zone=$2 ;; --accelerator-type) accelerator=$2 ;;
        --runtime-version) runtime=$2 ;; --workdir) workdir=$2 ;; --manual-dir) manual_dir=$2 ;;
        --project) project=$2 ;;
      esac
      shift 2 ;;
    --name=*|--zone=*|--accelerator-type=*|--runtime-version=*|--workdir=*|--manual-dir=*|--project=*)
      set -- "${1%%=*}" "${1#*=}" "${@:2}" ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) break ;;  # TRAIN_ARGS, checked below
  esac
done

[[ -z $manual_dir || $manual_dir == gs://* || $manual_dir == /* ]] || manual_dir=$PWD/$manual_dir
config_file=${CONFIG:-}  # relative to the caller's folder, else to the repository (gpu.sh's way)
[[ -z $config_file || $config_file == /* || ! -f $config_file ]] || config_file=$PWD/$config_file
cd "$(dirname "$0")/.."
source launch/train_args.sh
check_train_args tpu_vm.sh ${1+"$@"}
refuse_process_flags tpu_vm.sh ${1+"$@"}
command -v gcloud >/dev/null ||
  die "gcloud not found: install the Google Cloud CLI (https://cloud.google.com/sdk) and run 'gcloud auth login'"
[[ -n $zone ]] || die "--zone is required (see --help)"
[[ -n $workdir ]] || die "--workdir is required: gs://BUCKET/PATH, readable and writable by the TPU VM"
data_dir="" fetch_data=true
if [[ $manual_dir == gs://* ]]; then
  data_dir=jaxseg_data
elif [[ -n $manual_dir ]]; then
  [[ -d $manual_dir/portraits || -d $manual_dir/ccp ]] ||
    die "--manual-dir $manual_dir has neither portraits/ nor ccp/"
  data_dir=$(basename "$manual_dir")
  [[ $data_dir =~ ^[A-Za-z0-9._-]+$ ]] ||
    die "--manual-dir: use a folder name without spaces or odd characters (got '$data_dir')"
fi
if [[ -z $runtime ]]; then
  case $accelerator in
    v2-*|v3-*|v4-*) runtime="tpu-ubuntu2204-base" ;;
    v5litepod-*|v5e-*) runtime="v2-alpha-tpuv5-lite" ;;
    v5p-*) runtime="v2-alpha-tpuv5" ;;
    v6e-*) runtime="v2-alpha-tpuv6e" ;;
    *) die "no default runtime for --accelerator-type $accelerator: pass --runtime-version" ;;
  esac
fi
config_file=${config_file:-$PWD/configs/tpu.py}
[[ -f $config_file ]] || die "config not found: ${CONFIG:-configs/tpu.py}"
# The workers get configs/ only: a config kept elsewhere travels as configs/launch_<name>.
config_dir=$(cd "$(dirname "$config_file")" && pwd -P)
if [[ $config_dir == "$(pwd -P)/configs" ]]; then
  CONFIG=configs/$(basename "$config_file") extra_config=""
else
  CONFIG=configs/launch_$(basename "$config_file") extra_config=$config_file
fi
if [[ $workdir != gs://* && ${accelerator##*-} =~ ^[0-9]+$ ]] && ((${accelerator##*-} > 8)); then
  die "--workdir $workdir: $accelerator spans several hosts, which must share the workdir: use gs://BUCKET/PATH"
fi
jax_version=$(sed -n 's/^jax==\([^ ;#]*\).*/\1/p' requirements.txt)
[[ -n $jax_version ]] || die "no 'jax==VERSION' line in requirements.txt"

g=(--zone="$zone")
[[ -z $project ]] || g+=(--project="$project")
tpu=(gcloud compute tpus tpu-vm)
on_all() {  # one shell command on every worker, in parallel
  echo "+ ${tpu[*]} ssh $name ${g[*]} --worker=all --command=<<"
  printf '%s\n' "$1" | sed 's/^/    /'
  [[ -n $dry_run ]] || "${tpu[@]}" ssh "$name" "${g[@]}" --worker=all --command="$1"
}
q() { local a out=(); for a; do out+=("$(printf '%q' "$a")"); done; echo "${out[*]}"; }  # for the remote shell

echo "TPU VM $name ($accelerator, $runtime) in $zone: config $CONFIG, workdir $workdir," \
     "data ${manual_dir:-<downloaded on each worker>}"

# 1. The VM: reuse a READY one, otherwise create it.
state=""
[[ -n $dry_run ]] || state=$("${tpu[@]}" describe "$name" "${g[@]}" --format='value(state)' 2>/dev/null || true)
if [[ -z $state ]]; then
  run "${tpu[@]}" create "$name" "${g[@]}" --accelerator-type="$accelerator" --version="$runtime"
elif [[ $state == READY ]]; then
  echo "reusing $name (READY)"
else
  die "$name exists but is $state; start it, or delete it and rerun"
fi

# 2. Code (as a tarball: the working tree's jaxseg/, configs/, requirements.txt) and data.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
run mkdir "$tmp/code"
run cp -R jaxseg configs requirements.txt "$tmp/code/"
[[ -z $extra_config ]] || run cp "$extra_config" "$tmp/code/$CONFIG"
run tar czf "$tmp/jaxseg.tgz" -C "$tmp/code" --exclude=__pycache__ jaxseg configs requirements.txt
run "${tpu[@]}" scp "$tmp/jaxseg.tgz" "$name:jaxseg.tgz" "${g[@]}" --worker=all
if [[ $manual_dir == gs://* ]]; then
  fetch_data="mkdir -p ~/$data_dir && gcloud storage rsync --recursive $(q "$manual_dir") ~/$data_dir"
elif [[ -n $manual_dir ]]; then
  run "${tpu[@]}" scp --recurse "$manual_dir" "$name:~/" "${g[@]}" --worker=all
fi

# 3. Install on every worker: Python 3.12 venv, requirements, jax[tpu] at the pinned version.
on_all "set -e; mkdir -p ~/jaxseg && cd ~/jaxseg && rm -rf jaxseg configs && tar xzf ~/jaxseg.tgz && $fetch_data
if [ ! -x ~/jaxseg-venv/bin/python ]; then
  if command -v python3.12 >/dev/null; then python3.12 -m venv ~/jaxseg-venv
  else python3 -m pip install -q --user uv && ~/.local/bin/uv venv --seed --python 3.12 ~/jaxseg-venv; fi
fi
cd ~/jaxseg && ~/jaxseg-venv/bin/python -m pip install -q -r requirements.txt $(q "jax[tpu]==$jax_version") \
  google-cloud-storage==3.17.1"  # TensorBoard events into a gs:// workdir (tensorboardX)

# 4. Train on all workers at once, then evaluate; process 0 writes the results, copied into
#    WORKDIR/eval/. JAXSEG_DISTRIBUTED=auto: jax.distributed.initialize() finds the slice's hosts
#    in the VM's metadata.
setup="cd ~/jaxseg && export TFDS_DATA_DIR=\$HOME/tensorflow_datasets JAXSEG_DISTRIBUTED=auto ${data_dir:+JAXSEG_MANUAL_DIR=\$HOME/$data_dir} &&"
on_all "set -o pipefail; $setup ~/jaxseg-venv/bin/python -m jaxseg.train --config $(q "$CONFIG") \
--workdir $(q "$workdir") ${1+$(q "$@")} 2>&1 | tee -a ~/jaxseg_train.log"
evaluate="set -e; $setup rm -rf ~/jaxseg_eval"
for dataset in portrait_segmentation ccp_person; do
  evaluate+="; ~/jaxseg-venv/bin/python -m jaxseg.evaluate --workdir $(q "$workdir") --checkpoint best \
--dataset $dataset --split test --output ~/jaxseg_eval/best_${dataset}_test.json"
done
if [[ $workdir == gs://* ]]; then
  evaluate+="; if [ -d ~/jaxseg_eval ]; then gcloud storage cp ~/jaxseg_eval/*.json $(q "$workdir/eval/"); fi"
else
  evaluate+="; if [ -d ~/jaxseg_eval ]; then mkdir -p $(q "$workdir/eval") && cp ~/jaxseg_eval/*.json $(q "$workdir/eval/"); fi"
fi
on_all "$evaluate"
