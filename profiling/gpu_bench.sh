#!/usr/bin/env bash
# OSEDiff vs AdcSR GPU latency at LR 128 -> SR 512 (random-init full-size models, fp16/bf16/fp32)
# -> reports/gpu-latency.md and reports/gpu-latency.csv. Takes 1-3 minutes on an A100/H100.
#
#   profiling/gpu_bench.sh [options of python -m profiling.gpu_bench, e.g. --compile --channels-last]
#
# Installs the project from this checkout (pip install -e .) only if it does not import yet, and
# never installs, upgrades or replaces torch: a CUDA build must already be there; the installed
# torch version is pinned with a pip constraint and checked again after the install.
# PYTHON=/path/to/python selects the interpreter.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python}"

die() { echo "gpu_bench.sh: $*" >&2; exit 2; }

command -v "$PYTHON" >/dev/null 2>&1 || die "no '$PYTHON' on PATH (set PYTHON=/path/to/python)"
# One interpreter start: print the torch version, then assert torch.cuda.is_available().
if info="$("$PYTHON" -c 'import torch; print(torch.__version__, torch.version.cuda); assert torch.cuda.is_available()' 2>/dev/null)"; then
    cuda_ok=1
else
    cuda_ok=0
fi
[ -n "$info" ] || die "torch does not import with $PYTHON; install a CUDA build of torch first (this script never installs torch)"
torch_before="${info%% *}"
[ "$cuda_ok" = 1 ] || die "torch $torch_before (CUDA build: ${info#* }) sees no CUDA GPU; run this on a GPU machine (CPU dry run: python -m profiling.gpu_bench --size tiny --device cpu)"

if ! "$PYTHON" -c 'import compress, profiling.gpu_bench, diffusers, transformers, peft, pandas, psutil' 2>/dev/null; then
    echo "gpu_bench.sh: installing the project (pip install -e .), torch pinned at $torch_before" >&2
    constraints="$(mktemp)"
    trap 'rm -f "$constraints"' EXIT
    echo "torch==$torch_before" >"$constraints"
    pip_flags=()
    # offline-friendly: build the editable wheel with the setuptools already installed, if it is new enough
    if "$PYTHON" -c 'import setuptools, sys; sys.exit(int(setuptools.__version__.split(".")[0]) < 64)' 2>/dev/null; then
        pip_flags+=(--no-build-isolation)
    fi
    "$PYTHON" -m pip install ${pip_flags[@]+"${pip_flags[@]}"} -c "$constraints" -e . \
        || die "pip install -e . failed (torch was pinned at $torch_before, so pip refused to replace it, or no network)"
    torch_after="$("$PYTHON" -c 'import torch; print(torch.__version__)')"
    [ "$torch_after" = "$torch_before" ] || die "torch changed from $torch_before to $torch_after during the install"
    "$PYTHON" -c 'import torch; assert torch.cuda.is_available()' || die "CUDA no longer available after the install"
fi

exec "$PYTHON" -m profiling.gpu_bench --device cuda "$@"
