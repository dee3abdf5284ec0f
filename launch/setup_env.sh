#!/usr/bin/env bash
# Sourced by .ci/run and launch/cpu.sh, or by you (`source launch/setup_env.sh`): creates .venv with
# Python 3.12+ and installs requirements.txt, and points the datasets at ../shared/data (or
# $JAXSEG_MANUAL_DIR) and a local TFDS data dir. Sourced into an interactive shell, it leaves that
# shell's options as they were and returns (never exits) on failure.
# It finds the repository through bash's BASH_SOURCE: another shell (zsh, dash) would make .venv
# in the wrong folder.
[ -n "${BASH_VERSION:-}" ] || {
  echo "error: source launch/setup_env.sh from bash (run bash first)" >&2
  return 1 2>/dev/null || exit 1
}
_jaxseg_setup_env() {
  local repo python_bin candidate needs_312='import sys; sys.exit(sys.version_info < (3, 12))'
  repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd) || return 1
  python_bin=${PYTHON:-}
  if [ -z "$python_bin" ]; then
    # pyenv shims exist for versions that are not active, so each candidate is tried, not just found.
    for candidate in python3 python3.12 python3.13 "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.1[2-9]*/bin/python; do
      if "$candidate" -c "$needs_312" 2>/dev/null; then
        python_bin=$candidate
        break
      fi
    done
  fi
  if [ -z "$python_bin" ]; then
    echo "error: Python 3.12 or newer is needed (jax 0.12); set PYTHON=/path/to/python3.12" >&2
    return 1
  fi
  if [ ! -x "$repo/.venv/bin/python" ]; then
    "$python_bin" -m venv "$repo/.venv" || return 1
  elif ! "$repo/.venv/bin/python" -c "$needs_312"; then
    echo "error: $repo/.venv has $("$repo/.venv/bin/python" --version 2>&1), and jax 0.12 needs" \
         "3.12 or newer: remove that folder, then source this again" >&2
    return 1
  fi
  "$repo/.venv/bin/pip" install -q --disable-pip-version-check -r "$repo/requirements.txt" || return 1
  export JAXSEG_MANUAL_DIR=${JAXSEG_MANUAL_DIR:-$(cd "$repo/.." && pwd)/shared/data}
  export TFDS_DATA_DIR=${TFDS_DATA_DIR:-$repo/.tfds}
  export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
  export PATH="$repo/.venv/bin:$PATH"
  echo "environment ready: $(python --version), data from $JAXSEG_MANUAL_DIR, built data in $TFDS_DATA_DIR"
}
_jaxseg_setup_env
_jaxseg_status=$?
unset -f _jaxseg_setup_env
# `return` when sourced (the usual way), `exit` when run as `bash launch/setup_env.sh`.
return $_jaxseg_status 2>/dev/null || exit $_jaxseg_status
