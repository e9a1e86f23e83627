#!/bin/bash
# Session 9's one device call: (1) the cuDNN self-slot NaN check, (2) model fwd/fwd+bwd vs PyTorch with the cuDNN
# attention variant, (3) W2 steps with each attention path, (4) W1 vs tunix with a cProfile of our generate calls.
set -u
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.6 SFPO_BENCH_DIR=/tmp
DEADLINE=$(( $(date +%s) + ${BUDGET:-500} ))
left() { echo $(( DEADLINE - $(date +%s) )); }
exec > >(tee -a "$OUT/all.log") 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
python3 -m pip list 2>/dev/null | grep -iE "^(jax|jaxlib|jax-cuda13-plugin|flax|optax|chex|orbax-checkpoint|transformers|torch) "
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/tunix/*.whl
export PYTHONPATH=$PWD:/tmp/site
cd experiments
echo "== load $(cut -d' ' -f1-3 /proc/loadavg)"
timeout 150 python3 attention_check.py --shapes 16x192 8x512 4x2048 --repeats 5 --out $OUT/attention_check.json 2>&1 | grep -v Warning
echo "== attention rc=${PIPESTATUS[0]} ($(left) s left) load $(cut -d' ' -f1-3 /proc/loadavg)"
timeout $(( $(left) - 200 )) python3 bench_model.py --shapes 16x192 8x512 4x2048 --dtypes bfloat16 \
  --attention einsum,cudnn --repeats 5 2>&1 | grep -v "Loading weights"
echo "== model rc=${PIPESTATUS[0]} ($(left) s left)"
for a in cudnn einsum; do
  timeout 75 python3 bench_gpu.py --workloads w2 --attention $a --out $OUT/w2_$a.json > $OUT/w2_$a.log 2>&1
  echo "== w2 $a rc=$? ($(left) s left)"; grep -E "w2/|load" $OUT/w2_$a.log
done
timeout $(( $(left) - 5 )) python3 bench_sampler.py --peers tunix --dtypes float32,bfloat16 --repeats 5 --host-profile \
  > $OUT/w1.log 2>&1
echo "== w1 rc=$? ($(left) s left)"; grep -v "^{" $OUT/w1.log | grep -v "Loading weights" | head -60
