"""A one-off check (session 9, run by s9_call3.sh from .whl/s9/; kept as the record):
CausalLM(attention="cudnn") under remat gives the same loss and gradient as without it, finite,
at the NaN shape (16 x 192, left-padded) and 4 x 2048; and the timings of both."""
import statistics
import sys
import time

import jax
import numpy as np

sys.path.insert(0, "experiments")
import attention_check
from bench_gpu import STANDARD, TINY, build_model
from flax import nnx

from sfpo_jax.models import transformer

if "--xla" in sys.argv:  # the CPU dry run: JAX's reference in place of the cuDNN kernel
    fused = transformer.attend_fused
    transformer.attend_fused = lambda *a, **k: fused(*a, **{**k, "implementation": "xla"})
sizes = TINY if "--tiny" in sys.argv else STANDARD
shapes = ["2x32"] if "--tiny" in sys.argv else ["16x192", "4x2048"]
attention_check.STANDARD = sizes
grad = jax.jit(jax.value_and_grad(attention_check.nll), static_argnums=1)
for shape in shapes:
    rows, length = (int(x) for x in shape.split("x"))
    ids, mask = attention_check.batch(rows, length)
    out = {}
    for remat in (False, True):
        model = build_model(sizes, "bfloat16", attention="cudnn")
        model.remat = remat
        graphdef, state = nnx.split(model)
        loss, g = jax.block_until_ready(grad(state, graphdef, ids, mask))
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            jax.block_until_ready(grad(state, graphdef, ids, mask))
            times.append(time.perf_counter() - t0)
        flat = np.concatenate([np.ravel(np.asarray(x, np.float32)) for x in jax.tree.leaves(g)])
        out[remat] = (float(loss), flat, 1e3 * statistics.median(times))
    (l0, g0, t0), (l1, g1, t1) = out[False], out[True]
    print(f"{shape} cudnn: finite {np.isfinite(g0).all()} / remat {np.isfinite(g1).all()}; loss {l0:.6f} / {l1:.6f}; "
          f"gradient max |diff| {np.abs(g0 - g1).max():.3g} (max |g| {np.abs(g0).max():.3g}); "
          f"fwd+bwd {t0:.2f} / remat {t1:.2f} ms", flush=True)
