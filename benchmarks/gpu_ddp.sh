#!/usr/bin/env bash
# The single-GPU measurements behind the README's multi-GPU section, as one prepared command
# (about 4 minutes on one H100): JPEG input (PIL in workers vs decode_jpeg on the GPU), mining
# memory at ImageNet scale, and the per-stage images/s that the ImageNet-1k estimate needs.
#   bash benchmarks/gpu_ddp.sh            # logs and JSON lines in $OUT (or ./gpu-results)
# PYTHON and WORKERS (DataLoader workers for the JPEG benchmark) may be set.
set -uo pipefail
out="${OUT:-gpu-results}"
py="${PYTHON:-python3}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1 || true

# run NAME SECONDS ARGS...: one benchmark with a time limit, its output kept in $out/NAME.log
run() {
  local name="$1" limit="$2"; shift 2
  echo "== $name: $*" | tee "$out/$name.log"
  timeout --signal=INT "$limit" "$py" "$@" 2>&1 | tee -a "$out/$name.log" | grep -v '^{'
}

run jpeg_decode 150 benchmarks/jpeg_decode.py --workers "${WORKERS:-16}" --batch-size 256 --batches 8
run mining_scale 150 benchmarks/mining_scale.py
run mining_scale_w8 60 benchmarks/mining_scale.py --world 8
feed=$(grep -o '"pil_simclr": [0-9.]*' "$out/jpeg_decode.log" | grep -o '[0-9.]*$' | head -n 1)
run imagenet_rate 240 benchmarks/imagenet_rate.py --world 8 ${feed:+--input-rate "$feed"}
