#!/usr/bin/env bash
# Every GPU measurement of the project in one prepared run (issue 12), about 8 minutes on one H200:
# cached vs end-to-end epochs, extraction vs a bare forward (float32 and bf16), a bank of 32 and of 256 heads
# against one, and the tests marked `cuda`. Results: benchmarks/results/*_cuda*.json.
#
#   bash benchmarks/gpu.sh          # on a machine with a GPU
#   bash benchmarks/gpu.sh cpu      # the same steps, small, on the CPU: shows the script works
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
device=${1:-cuda}
if [ "$device" = cpu ]; then  # a smoke run: its results are named *_smoke and say nothing about speed
    patients=100; epochs=2; extract_patients=100; sweep_epochs=2; repeats=1; tag=_smoke
else
    patients=4000; epochs=10; extract_patients=2000; sweep_epochs=30; repeats=3; tag=
fi
step() { echo; echo "== $* ($(date +%T))"; }

step "tests marked cuda"
python -m pytest -q -m cuda -p no:cacheprovider tests
step "bench_epoch: cached vs end-to-end epochs"
python benchmarks/bench_epoch.py --device "$device" --patients "$patients" --cached-epochs "$epochs" \
    --name "bench_epoch_$device$tag"
step "bench_extract: extraction vs a bare forward pass, float32"
python benchmarks/bench_extract.py --device "$device" --patients "$extract_patients" --name "bench_extract_${device}_fp32$tag"
if [ "$device" != cpu ]; then
    step "bench_extract: the same in bf16"
    python benchmarks/bench_extract.py --device "$device" --amp bf16 --patients "$extract_patients" \
        --name "bench_extract_${device}_bf16"
fi
step "bench_sweep: banks of 32 and 256 heads against one"
python benchmarks/bench_sweep.py --device "$device" --epochs "$sweep_epochs" --repeats "$repeats" \
    --cases pooled,pooled-256 --patients "$patients" --cache "cache/benchmarks/sweep_$patients/cache.h5" \
    --name "bench_sweep_$device$tag"
step "done"
