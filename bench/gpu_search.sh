#!/usr/bin/env bash
# GPU check of 'dynify search' (issue 6): a 3-trial search on the GPU, on a slice of CIFAR-10
# carried with the working tree; prints the run's summary (which names the device).
#
# 1. Here (a machine with the repository's .venv and internet access to PyPI), once:
#        bash bench/gpu_search.sh prepare
#    writes .device/cifar10-slice/train.tar (3,000 images, 300 per class, from
#    ../shared/data/cifar10/train.tar; .device/ is git-ignored) and downloads the wheels the
#    GPU image lacks (optuna, SQLAlchemy, alembic, Mako, colorlog) into .whl/ (ignored through
#    .git/info/exclude).
# 2. On the device machine (the device tool's run), with carry [".device/cifar10-slice", ".whl"]:
#        bash bench/gpu_search.sh run
#    installs the wheels into /tmp/site, runs
#        dynify search test_resnet --space bench/gpu-search-space.yaml --budget 10MFLOPs
#            --trials 3 --device cuda --data .device/cifar10-slice/train.tar
#    (about 2-4 minutes: start-up, 3 one-epoch trials, the report), prints the summary and
#    copies summary.json, trials.csv and the log (progress is on stderr, the summary on
#    stdout: both are in it) to $OUT; then times the static model as the search's estimate
#    does (dynify.search.training.training_speed) and checks that it leaves no CUDA memory
#    reserved in the process. Exits non-zero when the search fails, did not finish 3 trials,
#    its summary does not name a CUDA device, or the timing left memory reserved.
# Record the output, with the card's name, in bench/README.md ("## Search (bench/search.py)").
set -euo pipefail
cd "$(dirname "$0")/.."

SLICE=.device/cifar10-slice
WHEELS=(optuna==5.0.0 sqlalchemy==2.1.9 alembic==1.20.1 mako==1.4.3 colorlog==6.12.0)

prepare() {
    local src=${CIFAR10_TRAIN_TAR:-../shared/data/cifar10/train.tar}
    mkdir -p "$SLICE"
    .venv/bin/python - "$src" "$SLICE/train.tar" <<'EOF'
import sys
import tarfile
from collections import defaultdict

src, dst = sys.argv[1], sys.argv[2]
per_class = 300
taken = defaultdict(int)
with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
    for member in tin:
        if not member.isfile():
            continue
        parts = member.name.split("/")  # train/<class>/<file>
        if len(parts) != 3 or taken[parts[1]] >= per_class:
            continue
        taken[parts[1]] += 1
        tout.addfile(member, tin.extractfile(member))
print(f"{dst}: {sum(taken.values())} images, {len(taken)} classes")
EOF
    grep -qxF "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >>.git/info/exclude
    mkdir -p .whl
    .venv/bin/python -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform any -d .whl "${WHEELS[@]}"
    ls -la "$SLICE" .whl
    du -sh "$SLICE" .whl
}

run() {
    [ -f "$SLICE/train.tar" ] || { echo "no $SLICE/train.tar: run 'prepare' and carry it" >&2; exit 2; }
    if ! python3 -c "import optuna" 2>/dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl
        export PYTHONPATH=/tmp/site
    fi
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
    local device=${DEVICE:-cuda}  # DEVICE=cpu: a smoke test of this script without a GPU
    local out=${OUT:-runs}/gpu-search
    rm -rf "$out" runs/gpu-search-run
    mkdir -p "$out"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    python3 -c "import torch, timm, optuna; print('torch', torch.__version__, 'timm', timm.__version__, 'optuna', optuna.__version__, 'cuda', torch.cuda.is_available())"
    set -o pipefail
    python3 -m dynify search test_resnet --space bench/gpu-search-space.yaml \
        --data "$SLICE/train.tar" --budget 10MFLOPs --trials 3 --device "$device" \
        --output runs/gpu-search-run 2>&1 | tee "$out/log.txt"
    cp runs/gpu-search-run/summary.json runs/gpu-search-run/trials.csv "$out/"
    python3 - runs/gpu-search-run/summary.json "$device" <<'EOF'
import json
import sys

summary = json.load(open(sys.argv[1]))
finished = summary["trials"].get("COMPLETE", 0) + summary["trials"].get("PRUNED", 0)
device = summary.get("best", {}).get("device", "")
print(f"check: {finished} finished trials, device {device!r}")
sys.exit(0 if finished == 3 and device.startswith(sys.argv[2]) else 1)
EOF
    python3 - "$SLICE/train.tar" "$device" <<'EOF'
import sys

import torch

from dynify.search import SearchSettings, prepare
from dynify.search.training import training_speed

data, device = sys.argv[1:]
settings = SearchSettings(
    budget="10MFLOPs", model="test_resnet", space="bench/gpu-search-space.yaml", data=data,
    device=device, output="runs/gpu-search-run", progress=False,
)
ctx = prepare(settings)
cuda = ctx.device.startswith("cuda")
before = torch.cuda.memory_reserved(ctx.device) if cuda else 0
speed = training_speed(ctx)
after = torch.cuda.memory_reserved(ctx.device) if cuda else 0
print(f"check: training_speed {speed:,.0f} images/s on {ctx.device}; CUDA memory reserved "
      f"{before:,} -> {after:,} bytes")
sys.exit(0 if after <= before else 1)
EOF
}

case "${1:-}" in
prepare) prepare ;;
run) run ;;
*)
    echo "usage: bash bench/gpu_search.sh prepare|run" >&2
    exit 2
    ;;
esac
