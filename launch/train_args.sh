# Sourced by the launch scripts (not run on its own). check_train_args SCRIPT ARGS... exits
# with status 2 and a usage message unless every ARG is something `python -m jaxseg.train` takes
# after the script's own --config/--workdir, so that a mistyped option (--dryrun) stops the script
# before it installs anything or creates a VM, not jaxseg.train after that work: config overrides
# --config.FIELD=VALUE (also --config.FIELD VALUE and --noconfig.FIELD for booleans) and
# --coordinator_address, --num_processes, --process_id (jaxseg.distributed's flags).
# A word that is not an option is only accepted as the value of the option before it; after a
# --config.FIELD without =, a word that does not start with -- is its value (-1 included), and
# one that does is the next option (--config.FIELD alone sets a boolean), as absl reads them.
check_train_args() {
  local script=$1 arg name value_next="" bad=""
  shift
  local valued="coordinator_address num_processes process_id"
  for arg; do
    if [[ -n $value_next && $arg != --* ]]; then
      value_next=""
      continue
    fi
    value_next=""
    if [[ $arg != -* ]]; then
      bad="unexpected argument '$arg'"
      break
    fi
    name=${arg#--} name=${name%%=*}
    if [[ $arg == --* && ( $name == config.?* || $name == noconfig.?* ) ]]; then
      [[ $arg == *=* || $name == noconfig.* ]] || value_next=1
    elif [[ $arg == --* && " $valued " == *" $name "* ]]; then
      [[ $arg == *=* ]] || value_next=1
    elif [[ $arg == --* && ( $name == workdir || $name == config ) ]]; then
      bad="'$arg': $script sets jaxseg.train's --$name itself (its help says how to choose it)"
      break
    else
      bad="unknown option '$arg'"
      break
    fi
  done
  [[ -n $bad ]] || return 0
  {
    echo "$script: error: $bad"
    echo "  $script's own options go first; what follows goes to jaxseg.train and may only be"
    echo "  config overrides (--config.FIELD=VALUE, e.g. --config.train.num_steps=100) or"
    echo "  --coordinator_address/--num_processes/--process_id"
    if declare -F usage >/dev/null; then usage | sed -n '/Usage/{p;q;}'; fi
    echo "  (see $script --help)"
  } >&2
  exit 2
}

# refuse_process_flags SCRIPT ARGS... exits with status 2 if an ARG is one of jaxseg.distributed's
# flags. For the scripts that start every process of a cluster with one command line (their
# places come from the environment: the script's, SLURM's or the TPU VM's): such a flag, the same
# on every process, would override each one's place, all of them process 0 or a count that never
# gathers, which JAX waits for through its 5-minute start-up timeout.
refuse_process_flags() {
  local script=$1 arg
  shift
  for arg; do
    case $arg in
      --coordinator_address|--coordinator_address=*|--num_processes|--num_processes=*|\
      --process_id|--process_id=*)
        {
          echo "$script: error: '$arg': $script gives each process its place in the cluster" \
               "itself; the same flag on every process would override it"
          echo "  (see $script --help)"
        } >&2
        exit 2 ;;
    esac
  done
}

# check_workdir SCRIPT WORKDIR exits with status 2 where WORKDIR exists and is no folder:
# jaxseg.train refuses it too, but only after the script's setup (a venv, pip installs).
check_workdir() {
  [[ ! -e $2 || -d $2 ]] && return 0
  echo "$1: error: workdir $2 exists and is not a folder: name a folder (new or a run's)" >&2
  exit 2
}
