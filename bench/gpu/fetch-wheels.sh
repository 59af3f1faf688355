#!/usr/bin/env bash
# Fetch the wheels listed in bench/gpu/wheels.txt into <repo>/.whl/ for the GPU machine
# (Python 3.12.3, x86-64, no internet). bench/gpu/run.sh installs them there; by hand, a
# machine installs them with:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit;
#
# Idempotent: a wheel already in .whl/ at the listed version is reused; wheels of other
# versions, or of packages no longer listed, are removed first (two versions of one package
# in .whl/ would stop the whole install there).
# Exits non-zero if the wheels total 60 MiB or more (a device call carries at most 64 MiB,
# working tree included).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
LIST="$HERE/wheels.txt"
DEST="$ROOT/.whl"
LIMIT_MIB=60
PY="${PYTHON:-python3}"            # any local Python: --python-version picks the target

PLATFORMS=(
  manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64
  manylinux2014_x86_64 manylinux1_x86_64 any
)
DL_ARGS=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp)
for p in "${PLATFORMS[@]}"; do DL_ARGS+=(--platform "$p"); done

# PEP 503-style name as it appears in wheel file names: lower case, runs of -_. -> _
norm() { printf '%s' "$1" | tr '[:upper:]' '[:lower:]' | sed -E 's/[-_.]+/_/g'; }

# --- read wheels.txt -------------------------------------------------------------------
declare -A WANT=()      # normalised name -> version
declare -a ORDER=()     # name==version, in file order
while IFS= read -r line || [[ -n "$line" ]]; do
  line="${line%%#*}"
  line="$(printf '%s' "$line" | tr -d '[:space:]')"
  [[ -z "$line" ]] && continue
  if [[ "$line" != *==* ]]; then
    echo "wheels.txt: expected name==version, got '$line'" >&2; exit 2
  fi
  name="${line%%==*}"; ver="${line#*==}"
  WANT["$(norm "$name")"]="$ver"
  ORDER+=("$name==$ver")
done <"$LIST"

mkdir -p "$DEST"

# --- clear stale wheels ------------------------------------------------------------------
shopt -s nullglob
for f in "$DEST"/*.whl; do
  base="${f##*/}"; dist="$(norm "${base%%-*}")"; rest="${base#*-}"; ver="${rest%%-*}"
  if [[ "${WANT[$dist]:-}" != "$ver" ]]; then
    echo "removing stale $base"
    rm -f -- "$f"
  fi
done
rm -rf "$DEST"/.build-*   # leftovers of an interrupted deepspeed build

have() {  # have NAME VERSION -> prints the wheel's path if present
  local n; n="$(norm "$1")"
  for f in "$DEST"/*.whl; do
    local base="${f##*/}"; local rest="${base#*-}"
    if [[ "$(norm "${base%%-*}")" == "$n" && "${rest%%-*}" == "$2" ]]; then
      printf '%s\n' "$f"; return 0
    fi
  done
  return 1
}

# --- deepspeed: sdist only on PyPI, so build a pure-Python wheel here --------------------
build_deepspeed() {
  local ver="$1" bpy="" tmp whl
  local venv="$ROOT/.venv"
  # deepspeed's setup.py imports torch (for its accelerator/op tables): use the repo venv,
  # which has torch, once `make setup` has finished writing it.
  if [[ -x "$venv/bin/python" ]]; then
    local waited=0
    while [[ ! -e "$venv/.ftlaunch-installed" ]]; do
      if (( waited >= 1200 )); then
        echo "timed out waiting for $venv/.ftlaunch-installed (make setup)" >&2; return 1
      fi
      (( waited == 0 )) && echo "waiting for make setup to finish ($venv/.ftlaunch-installed)..."
      sleep 10; waited=$((waited + 10))
    done
    bpy="$venv/bin/python"
  elif "$PY" -c 'import torch' 2>/dev/null; then
    bpy="$PY"
  else
    echo "need a Python with torch to build deepspeed (run make setup)" >&2; return 1
  fi
  tmp="$(mktemp -d "$DEST/.build-XXXXXX")"
  # DS_BUILD_OPS=0: no op is compiled ahead; deepspeed JIT-builds any op it needs with
  # ninja + nvcc, both on the GPU machine. --no-binary forces the sdist even if some
  # find-links folder holds a (possibly compiled) deepspeed wheel; --no-cache-dir stops pip
  # from reusing the wheel it cached when `make setup` built deepspeed in an isolated
  # environment without torch.
  ( cd "$tmp" && DS_BUILD_OPS=0 "$bpy" -m pip wheel -q --no-cache-dir --no-deps \
      --no-build-isolation --no-binary deepspeed "deepspeed==$ver" -w "$tmp" 2>&1 \
      | grep -v "is ignored: it is neither a file nor a directory" || true ) >&2
  whl=("$tmp"/deepspeed-*.whl)
  if (( ${#whl[@]} != 1 )); then echo "deepspeed build produced no wheel" >&2; return 1; fi
  # No compiled code may be inside: it would be built for this machine's Python and torch.
  if "$bpy" -m zipfile -l "${whl[0]}" | grep -Eq '\.(so|pyd|dylib)([[:space:]]|$)'; then
    echo "deepspeed wheel contains compiled ops; refusing" >&2; return 1
  fi
  if ! unzip -p "${whl[0]}" 'deepspeed/git_version_info_installed.py' \
       | grep -q '^installed_ops=' ; then
    echo "deepspeed wheel lacks git_version_info_installed.py" >&2; return 1
  fi
  if unzip -p "${whl[0]}" 'deepspeed/git_version_info_installed.py' | grep -q ': True'; then
    echo "deepspeed wheel records pre-built ops; refusing" >&2; return 1
  fi
  # It must install on Python 3.12 there though it was built by this venv's Python: with no
  # ext_modules setuptools tags it py3-none-any already; if it came out tagged for this
  # interpreter/platform instead (cpXY-cpXY-linux_x86_64), retag it, which is sound only
  # because the check above found no compiled file in it.
  local base="${whl[0]##*/}"
  if [[ "$base" != *-py3-none-any.whl ]]; then
    echo "retagging $base as py3-none-any (pure Python, no compiled ops)"
    "$bpy" -m wheel tags --remove --python-tag py3 --abi-tag none --platform-tag any "${whl[0]}" >/dev/null
    whl=("$tmp"/deepspeed-*-py3-none-any.whl)
  fi
  mv -- "${whl[0]}" "$DEST/"
  rm -rf -- "$tmp"
}

# --- fetch --------------------------------------------------------------------------------
for spec in "${ORDER[@]}"; do
  name="${spec%%==*}"; ver="${spec#*==}"
  if have "$name" "$ver" >/dev/null; then continue; fi
  if [[ "$(norm "$name")" == deepspeed ]]; then
    echo "building $spec (pure Python, DS_BUILD_OPS=0)"
    build_deepspeed "$ver"
  else
    echo "downloading $spec"
    "$PY" -m pip download -q "${DL_ARGS[@]}" -d "$DEST" "$spec" 2>&1 \
      | grep -v "is ignored: it is neither a file nor a directory" >&2 || true
  fi
  have "$name" "$ver" >/dev/null || { echo "missing after fetch: $spec" >&2; exit 1; }
done

# --- report -------------------------------------------------------------------------------
echo
printf '%-78s %10s\n' "wheel (in ${DEST#"$ROOT"/}/)" "MiB"
total=0
for f in "$DEST"/*.whl; do
  sz=$(stat -c %s "$f"); total=$((total + sz))
  printf '%-78s %10.2f\n' "${f##*/}" "$(awk -v s="$sz" 'BEGIN{print s/1048576}')"
done
total_mib="$(awk -v s="$total" 'BEGIN{printf "%.2f", s/1048576}')"
printf '%-78s %10s\n' "total ($(ls "$DEST"/*.whl | wc -l) wheels)" "$total_mib"
if awk -v s="$total" -v l="$LIMIT_MIB" 'BEGIN{exit !(s >= l*1048576)}'; then
  echo "total ${total_mib} MiB is ${LIMIT_MIB} MiB or more: too much to carry with the working tree" >&2
  exit 1
fi
