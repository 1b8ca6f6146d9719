#!/usr/bin/env bash
# The README's GPU row in one call: OSEDiff vs AdcSR at LR 128 -> SR 512 (random-init full-size
# models), fp32/bf16/fp16, eager, torch.compile (+ CUDA graphs) and the exported ONNX on
# onnxruntime's CUDA provider when it has one -> reports/gpu-latency.md and .csv. Prepared to
# fit in about 8 minutes on an H100/H200: the measurements stop starting at --budget-s 420
# (eager rows first, then bf16 compiled, ...; see profiling/gpu_bench.py), and the report is
# rewritten after every row.
#
#   profiling/gpu_bench.sh [more options of python -m profiling.gpu_bench; later ones win]
#
# Packages. torch is never installed, upgraded or replaced: a CUDA build must already be there.
# What the project needs and the machine lacks (a bare CUDA image has torch, transformers, peft,
# accelerate and onnxruntime, not diffusers or torch-pruning) comes from wheels in .whl/ (git-ignored;
# the README's "Deploy" section has the pip download line), installed offline into $ADC_SITE
# (default /tmp/site) and put first on PYTHONPATH:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
# only when the imports fail without them (ADC_FORCE_WHEELS=1: always). Without .whl/, the old
# path: pip install -e . with torch pinned by a constraint (torch==<installed version>), needs a network.
#
# PYTHON=/path/to/python selects the interpreter (default python3). ADC_GPU_BENCH_DRY_RUN=1 runs
# everything above, then the Python part on the CPU with tiny models into $ADC_DRY_OUT (default
# /tmp/adc-gpu-bench-dry): the install path can be tested on a machine without a GPU.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
SITE="${ADC_SITE:-/tmp/site}"
DRY="${ADC_GPU_BENCH_DRY_RUN:-0}"
IMPORTS='import compress, profiling.gpu_bench, diffusers, transformers, peft, pandas, psutil, torch_pruning'

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
if [ "$cuda_ok" != 1 ] && [ "$DRY" != 1 ]; then
    die "torch $torch_before (CUDA build: ${info#* }) sees no CUDA GPU; run this on a GPU machine (CPU dry run: ADC_GPU_BENCH_DRY_RUN=1 $0)"
fi

shopt -s nullglob
wheels=(.whl/*.whl)
shopt -u nullglob
if [ "${ADC_FORCE_WHEELS:-0}" = 1 ] || ! "$PYTHON" -c "$IMPORTS" 2>/dev/null; then
    if [ "${#wheels[@]}" -gt 0 ]; then
        for w in "${wheels[@]}"; do
            case "$(basename "$w")" in torch-[0-9]*) die "$w: .whl/ must not carry torch (the machine's CUDA build is kept)";; esac
        done
        echo "gpu_bench.sh: installing ${#wheels[@]} wheels from .whl/ into $SITE (offline, no dependencies)" >&2
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}" \
            || die "installing .whl/*.whl into $SITE failed"
        export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "gpu_bench.sh: no .whl/; installing the project (pip install -e .), torch pinned at $torch_before" >&2
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
    fi
    torch_after="$("$PYTHON" -c 'import torch; print(torch.__version__)')"
    [ "$torch_after" = "$torch_before" ] || die "torch changed from $torch_before to $torch_after during the install"
    missing="$("$PYTHON" -c "$IMPORTS" 2>&1 | tail -n 1)" || die "still cannot import the project's needs: $missing"
fi
"$PYTHON" -c 'import torch, diffusers, torch_pruning, sys
print(f"gpu_bench.sh: python {sys.version.split()[0]}, torch {torch.__version__}, diffusers {diffusers.__version__} "
      f"({diffusers.__file__.rsplit(chr(47), 2)[0]}), torch-pruning from {torch_pruning.__file__.rsplit(chr(47), 2)[0]}",
      file=sys.stderr)'

if [ "$DRY" = 1 ]; then
    exec "$PYTHON" -m profiling.gpu_bench --device cpu --size tiny --lr-size 32 --dtypes fp32 --modes eager \
        --warmup 0 --repeats 2 --threads 1 --out "${ADC_DRY_OUT:-/tmp/adc-gpu-bench-dry}" "$@"
fi
exec "$PYTHON" -m profiling.gpu_bench --device cuda --modes eager,compile,compile-cudagraphs,onnx \
    --dtypes fp32,bf16,fp16 --warmup 10 --repeats 30 --budget-s 420 "$@"
