# Source this (run_tests.sh, run_demo.sh and run_pretraining.sh do): it makes .venv with plain pip
# when it is missing or was installed from another requirements.txt or requirements.lock (the verified
# version of every package, as pip constraints; scripts/lock_requirements.py regenerates it), installs
# espeak-ng when missing, and sets the environment every run needs. Safe to source in an interactive
# shell from any folder: it changes no shell options and not the working directory (the scripts find
# the repository themselves).
_FEDHUBERT_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# Every step ends in `|| exit 1`: bash ignores `set -e` inside a subshell that stands left of `||`, so
# without them a failed install would go on and write the stamp, and the next run would skip it.
(
  set -uo pipefail
  root="$_FEDHUBERT_ROOT"
  venv="$root/.venv"
  want="$(cat "$root/requirements.txt" "$root/requirements.lock" | sha256sum | cut -d' ' -f1)" || exit 1
  if [ ! -x "$venv/bin/python" ] || [ "$(cat "$venv/.requirements.sha256" 2>/dev/null)" != "$want" ]; then
    echo "setup: installing the Python stack into .venv (a few minutes, once)"
    python3 -m venv "$venv" || exit 1
    "$venv/bin/python" -m pip install --quiet --upgrade pip || exit 1
    "$venv/bin/python" -m pip install --quiet -r "$root/requirements.txt" -c "$root/requirements.lock" || exit 1
    echo "$want" > "$venv/.requirements.sha256" || exit 1
  fi
  if ! command -v espeak-ng >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      echo "setup: installing espeak-ng (synthetic speakers for the tests)"
      { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng >/dev/null; } || exit 1
    else
      echo "setup: espeak-ng not found; tests that synthesize speakers will be skipped" >&2
    fi
  fi
) || { echo "setup: failed (see above)" >&2; return 1 2>/dev/null || exit 1; }

export PATH="$_FEDHUBERT_ROOT/.venv/bin:$PATH"
export PYTHONPATH="$_FEDHUBERT_ROOT${PYTHONPATH:+:$PYTHONPATH}"
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0
