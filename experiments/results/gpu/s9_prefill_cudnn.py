"""A one-off check (session 9, call 4, run from .whl/s9/; kept as the record):
the sampler's prefill through cuDNN flash attention (CausalLM(attention="cudnn")) against einsum,
on the bench model in bf16: the same first sampled token's log-prob, finite outputs, the prefill
program's temporary memory and the generate time. Half the prompts are shorter (left padding)."""
import statistics
import sys
import time

import jax
import numpy as np

sys.path.insert(0, "experiments")
from bench_gpu import STANDARD, TINY, build_model
from flax import nnx

from sfpo_jax.models import transformer
from sfpo_jax.sampling import Sampler, SamplingConfig

cpu = "--xla" in sys.argv
if cpu:  # the CPU dry run: JAX's reference in place of the cuDNN kernel
    fused = transformer.attend_fused
    transformer.attend_fused = lambda *a, **k: fused(*a, **{**k, "implementation": "xla"})
sizes = TINY if cpu else STANDARD
shapes = [(4, 32)] if cpu else [(16, 64), (8, 1024)]
print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)
for rows, plen in shapes:
    rng = np.random.default_rng(0)
    prompts = [rng.integers(2, sizes.arch["vocab_size"], plen if i % 2 == 0 else plen * 3 // 4).tolist()
               for i in range(rows)]
    config = SamplingConfig(max_new_tokens=16, temperature=1.0)
    out = {}
    for attention in ("einsum", "cudnn"):
        sampler = Sampler(build_model(sizes, "bfloat16", attention=attention), prompt_buckets=(plen,))
        r = sampler.generate(prompts, config, jax.random.key(0))
        times = []
        for i in range(5):
            t0 = time.perf_counter()
            sampler.generate(prompts, config, jax.random.key(i + 1))
            times.append(time.perf_counter() - t0)
        (prog,) = sampler._programs.values()
        state = sampler._compute_params(nnx.state(sampler.model))
        ids = np.ones((rows, plen - 1), np.int32)
        temp = prog.prefill.lower(state, ids, ids > 0).compile().memory_analysis().temp_size_in_bytes
        out[attention] = r, 1e3 * statistics.median(times), temp / 1e9
    (r, t, m), (r_f, t_f, m_f) = out["einsum"], out["cudnn"]
    same_first = (r.tokens[:, 0] == r_f.tokens[:, 0]).mean()
    dlogp = np.abs(r.logprobs[:, 0] - r_f.logprobs[:, 0])[r.tokens[:, 0] == r_f.tokens[:, 0]]
    print(f"{rows}x{plen}: finite {np.isfinite(r_f.logprobs).all()}; first token same in {same_first:.2f} of rows, "
          f"|dlogp| max {dlogp.max():.3g} mean {dlogp.mean():.3g}; "
          f"all tokens same {(r.tokens == r_f.tokens).mean():.2f}; "
          f"generate {t:.1f} -> {t_f:.1f} ms; prefill temp {m:.3f} -> {m_f:.3f} GB", flush=True)
