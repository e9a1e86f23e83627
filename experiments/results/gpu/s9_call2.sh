#!/bin/bash
# Session 9's second device call: the NaN's cause (self-slot rule off, then on, same machine) and the decode-loop
# early-stop check every N steps.
set -u
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.6 SFPO_BENCH_DIR=/tmp
DEADLINE=$(( $(date +%s) + ${BUDGET:-300} ))
left() { echo $(( DEADLINE - $(date +%s) )); }
exec > >(tee -a "$OUT/all.log") 2>&1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
export PYTHONPATH=$PWD
echo "== load $(cut -d' ' -f1-3 /proc/loadavg)"
for s in 1 2; do
  timeout 60 python3 .whl/s9/nan_cause.py --shapes 16x192 --repeats 3 --out $OUT/nan_off_$s.json 2>&1 | grep -v Warning
  echo "== self-slot OFF run $s rc=${PIPESTATUS[0]} ($(left) s left)"
done
timeout 60 python3 experiments/attention_check.py --shapes 16x192 --repeats 3 --out $OUT/nan_on.json 2>&1 | grep -v Warning
echo "== self-slot ON rc=${PIPESTATUS[0]} ($(left) s left) load $(cut -d' ' -f1-3 /proc/loadavg)"
for dt in bfloat16 float32; do
  timeout $(( $(left) - 5 )) python3 .whl/s9/decode_chunk.py $dt 7 2>&1 | grep -v "Loading weights"
  echo "== decode_chunk $dt rc=${PIPESTATUS[0]} ($(left) s left)"
done
