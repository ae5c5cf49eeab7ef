#!/usr/bin/env bash
# The GPU measurements in one prepared command, for a machine lent for a few minutes.
# Usage (repository root, CIFAR-10 archive copied to data/cifar10-jpeg.tar.gz beforehand):
#   bash benchmarks/gpu_session.sh budget       # ~8.5 min: the 8-minute CIFAR-10 budget run
#   bash benchmarks/gpu_session.sh throughput   # ~2-3 min: images/s, ours vs baseline
# Results go to $OUT (or ./gpu-results): JSON lines and logs, to copy into RESULTS.md.
set -euo pipefail
mode="${1:?budget or throughput}"
shift  # further arguments go to the benchmark script (e.g. --quick on a CPU dry run)
out="${OUT:-gpu-results}"
mkdir -p "$out"
archive="${CIFAR10_ARCHIVE:-data/cifar10-jpeg.tar.gz}"
# The GPU image has torch, torchvision, scikit-learn, PyYAML, tqdm and matplotlib; the scripts
# import scanclust from this checkout, so nothing is installed.
py="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" || true
data=/tmp/cifar10-jpeg
if [ ! -d "$data/test" ]; then
  mkdir -p "$data" && tar xzf "$archive" -C "$data"
  sub=$(dirname "$(find "$data" -maxdepth 3 -type d -name test | head -n 1)")
  [ "$sub" != "$data" ] && data="$sub"
fi
case "$mode" in
  budget)
    run=/tmp/budget-run  # checkpoints stay on the machine; the small files come back
    rm -rf "$run"
    "$py" benchmarks/cifar10_budget.py --data "$data" --budget 480 --out "$run" "$@" \
      2>&1 | tee "$out/budget.log"
    cp "$run/budget.json" "$run/metrics.json" "$run/log.jsonl" "$out/" ;;
  throughput)
    "$py" benchmarks/throughput.py --data "$data" "$@" 2>&1 | tee "$out/throughput.log"
    "$py" benchmarks/mining.py --repeats 2 2>&1 | tee "$out/mining.log" ;;
  *) echo "unknown mode $mode" >&2; exit 2 ;;
esac
