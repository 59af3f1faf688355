#!/usr/bin/env bash
# The GPU check in one command: bench/gpu/run.sh [--cpu-dry-run] OUT_DIR [driver options]
#
# On a GPU machine: installs the wheels carried in .whl/ (bench/gpu/fetch-wheels.sh) into a private directory
# (no network, nothing of the machine's own torch touched), then runs bench/gpu/driver.py, which writes
# OUT_DIR/results.jsonl, log.txt, summary.md. With --cpu-dry-run: the same steps on the CPU with a tiny model and the
# current Python's packages (what the test suite runs). PYTHON picks the interpreter (default python3).
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
dry=()
if [ "${1:-}" = "--cpu-dry-run" ]; then dry=(--cpu-dry-run); shift; fi
if [ $# -lt 1 ]; then echo "usage: bench/gpu/run.sh [--cpu-dry-run] OUT_DIR [driver options]" >&2; exit 2; fi
out="$1"; shift
mkdir -p "$out"
python="${PYTHON:-python3}"
if [ ${#dry[@]} -eq 0 ]; then
  site="${FTLAUNCH_GPU_SITE:-/tmp/ftlaunch-site}"
  if compgen -G "$root/.whl/*.whl" >/dev/null; then
    started=$(date +%s)
    # --no-deps: wheels.txt lists the whole closure of what the machine lacks; the rest is the machine's own.
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
      "$root"/.whl/*.whl > "$out/install.txt" 2>&1 || { echo "wheel install failed:"; cat "$out/install.txt"; }
    echo "installed $(ls "$root"/.whl/*.whl | wc -l) carried wheels into $site in $(( $(date +%s) - started )) s"
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "no wheels in $root/.whl (bench/gpu/fetch-wheels.sh): using the machine's packages as they are"
  fi
fi
export PYTHONPATH="$root:$root/kernels${PYTHONPATH:+:$PYTHONPATH}"
exec "$python" "$here/driver.py" "$out" "${dry[@]}" "$@"
