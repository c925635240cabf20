#!/usr/bin/env bash
# `make cuda-build-check`: the install a GPU user runs (README), exercised on a machine without a GPU (issue 13).
# A venv with the CUDA torch wheel pip resolves here (torch 2.14.1 + its nvidia-* wheels) gets
# `pip install --no-build-isolation -e .` of a copy of this tree, which builds setup.py's CUDAExtension with nvcc for
# TORCH_CUDA_ARCH_LIST; csrc/cuda_build_check.py then imports models._C and checks what can be checked without a GPU
# (linked, registered, fake kernels, SASS per arch). No kernel is ever executed.
# The venv lives outside the clone (CEPDIFF_CACHE, default ~/.cache/cepdiff), so CI runs on one machine reuse the torch
# install (a fresh machine creates it); the extension is built from scratch every run (setuptools' editable build uses
# a temporary build directory). Building in a copy keeps the clone's own CPU models/_C (used by .venv) untouched.
# Environment: CEPDIFF_CACHE, CUDA_HOME (default: the toolkit of `nvcc` on PATH), PYTHON (default python3),
# TORCH_CUDA_ARCH_LIST (default "8.0;9.0"), MAX_JOBS (default 2).
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_CUDA_VERSION=2.14.1
CACHE=${CEPDIFF_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/cepdiff}
VENV=$CACHE/cuda-venv
SRC=$CACHE/cuda-src
LOG=$CACHE/cuda-build.log
PYTHON=${PYTHON:-python3}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0} MAX_JOBS=${MAX_JOBS:-2}

fail() { echo "cuda-build-check: $*" >&2; exit 1; }
seconds_since() { echo $(( $(date +%s) - $1 )); }

mkdir -p "$CACHE"
exec 9>"$CACHE/cuda-build.lock"
flock 9  # one build at a time: CI runs and developers on this machine share the cache

# torch's own lookup takes dirname(dirname(which nvcc)), i.e. /usr/local for a /usr/local/bin/nvcc wrapper script;
# nvcc itself knows its toolkit root (TOP).
if [ -z "${CUDA_HOME:-}" ]; then
  command -v nvcc >/dev/null || fail "nvcc not found: put it on PATH or set CUDA_HOME"
  CUDA_HOME=$(realpath "$(nvcc --dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p')")
fi
[ -x "$CUDA_HOME/bin/nvcc" ] || fail "CUDA_HOME=$CUDA_HOME has no bin/nvcc"
export CUDA_HOME
echo "cuda-build-check: CUDA_HOME=$CUDA_HOME ($("$CUDA_HOME/bin/nvcc" --version | tail -n 1))"

# The venv: CUDA torch plus the build tools; the other pins of constraints.txt keep the project's dependencies as in .venv.
grep -v '^torch==' constraints.txt > "$CACHE/constraints.txt"
if [ "$(cat "$VENV/.complete" 2>/dev/null)" != "$TORCH_CUDA_VERSION" ]; then
  start=$(date +%s)
  echo "cuda-build-check: creating $VENV (torch==$TORCH_CUDA_VERSION with CUDA, ~5.4 GB; once per machine)"
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install -c "$CACHE/constraints.txt" "torch==$TORCH_CUDA_VERSION" setuptools wheel ninja \
    > "$CACHE/cuda-venv.log" 2>&1 || { tail -n 30 "$CACHE/cuda-venv.log" >&2; fail "venv set-up failed"; }
  echo "$TORCH_CUDA_VERSION" > "$VENV/.complete"
  echo "cuda-build-check: venv ready in $(seconds_since "$start") s"
fi
"$VENV/bin/python" -W ignore -c "import sys, torch; sys.exit(torch.version.cuda is None)" \
  || fail "torch in $VENV is not a CUDA build (pip resolved a CPU wheel)"

# A fresh copy of the files git knows (tracked and new, as in the working tree): setup.py globs csrc/, so nothing stale
# may linger. The venv's editable install points at it, so the last build stays importable after the check.
rm -rf "$SRC" && mkdir -p "$SRC"
git ls-files --cached --others --exclude-standard | while IFS= read -r file; do [ ! -f "$file" ] || echo "$file"; done \
  | tar -cf - -T - | tar -xf - -C "$SRC"

# The README's GPU install command (its variables are exported above); PIP_CONSTRAINT pins the dependencies as in
# .venv, -v puts the compiler command lines in the log.
start=$(date +%s)
echo "cuda-build-check: pip install --no-build-isolation -e . (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST," \
  "MAX_JOBS=$MAX_JOBS; log: $LOG)"
(cd "$SRC" && PIP_CONSTRAINT="$CACHE/constraints.txt" "$VENV/bin/pip" install -v --no-build-isolation -e .) \
  > "$LOG" 2>&1 || { tail -n 60 "$LOG" >&2; fail "the build failed (full log: $LOG)"; }
grep -q "building models._C as a CUDA extension" "$LOG" || fail "setup.py did not build a CUDA extension (log: $LOG)"
echo "cuda-build-check: built in $(seconds_since "$start") s"

(cd "$SRC" && "$VENV/bin/python" csrc/cuda_build_check.py --src "$SRC")
