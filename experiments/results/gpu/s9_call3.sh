#!/bin/bash
# Session 9's third device call: the trainer end to end with model.attention=cudnn (arith-tiny, 6 steps, against
# einsum), and cudnn under remat (the paper configs set remat: true).
set -u
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.6 SFPO_JAX_CACHE=$PWD/.whl/cache PYTHONPATH=$PWD
DEADLINE=$(( $(date +%s) + ${BUDGET:-200} ))
left() { echo $(( DEADLINE - $(date +%s) )); }
exec > >(tee -a "$OUT/all.log") 2>&1
nvidia-smi --query-gpu=name --format=csv,noheader; echo "== load $(cut -d' ' -f1-3 /proc/loadavg)"
for a in cudnn einsum; do
  /usr/bin/time -f "%e s" timeout 70 python3 experiments/train.py --config experiments/configs/arith-tiny.yaml --steps 6 \
    --out /tmp/r_$a model.compute_dtype=bfloat16 model.attention=$a run.progress=false eval.every=3 2>&1 | grep -v Warning | tail -3
  echo "== train $a ($(left) s left)"
  cp /tmp/r_$a/metrics.jsonl $OUT/train_$a.jsonl 2>/dev/null
  python3 -c "
import json,sys
for l in open('/tmp/r_$a/metrics.jsonl'):
    m=json.loads(l); print('$a', {k: m.get(k) for k in ('step','reward/mean','train/loss','train/approx_kl','nonfinite_total','eval/accuracy') if k in m})"
done
timeout $(( $(left) - 3 )) python3 .whl/s9/remat_cudnn.py 2>&1 | grep -v Warning
echo "== remat rc=${PIPESTATUS[0]} ($(left) s left)"
