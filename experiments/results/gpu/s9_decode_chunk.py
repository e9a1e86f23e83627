"""A one-off experiment (session 9, run by s9_call2.sh from .whl/s9/; kept as the record):
does checking the early stop every N decode steps, instead of every step, speed up W1?
The variants patch sfpo_jax.sampling.sampler._decode_loop; outputs must equal the current loop's bit for bit."""
import functools
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

sys.path.insert(0, "experiments")
from pathlib import Path

from bench_sampler import ARCH, BATCH, NEW_TOKENS, PROMPT_LEN, make_checkpoint

from sfpo_jax.models import from_pretrained
from sfpo_jax.sampling import Sampler, SamplingConfig
from sfpo_jax.sampling import sampler as S
from sfpo_jax.sampling.ops import sample_with_logprobs

original = S._decode_loop

def chunked(model, cache, last, key, spec, chunk=8, unroll=False):
    b, m = last.shape[0], spec.max_new_tokens
    assert m % chunk == 0
    eos_ids = jnp.asarray(spec.eos_token_ids, jnp.int32)
    def cond(carry):
        step, _, _, done, *_ = carry
        return (step < m) & ~jnp.all(done)
    def one(carry):
        step, cache, token, done, tokens, logprobs, lengths = carry
        logits, cache = model(token[:, None], cache=cache)
        new, logp = sample_with_logprobs(jax.random.fold_in(key, step), logits[:, 0], temperature=spec.temperature,
                                         top_k=spec.top_k, top_p=spec.top_p)
        new = jnp.where(done, spec.pad_token_id, new)
        logp = jnp.where(done, 0.0, logp)
        tokens = lax.dynamic_update_slice(tokens, new[:, None], (0, step))
        logprobs = lax.dynamic_update_slice(logprobs, logp[:, None], (0, step))
        lengths = lengths + (~done).astype(jnp.int32)
        done = done | jnp.isin(new, eos_ids)
        return step + 1, cache, new, done, tokens, logprobs, lengths
    body = lambda carry: lax.fori_loop(0, chunk, lambda i, c: one(c), carry, unroll=unroll)
    init = (jnp.zeros((), jnp.int32), cache, last, jnp.zeros((b,), jnp.bool_),
            jnp.full((b, m), spec.pad_token_id, jnp.int32), jnp.zeros((b, m), jnp.float32), jnp.zeros((b,), jnp.int32))
    _, cache, _, done, tokens, logprobs, lengths = lax.while_loop(cond, body, init)
    return tokens, logprobs, lengths, done, cache

variants = {"every step (current)": original,
            "every 8, fori": functools.partial(chunked, chunk=8),
            "every 8, unrolled": functools.partial(chunked, chunk=8, unroll=True),
            "every 32, fori": functools.partial(chunked, chunk=32),
            "once (128, fori)": functools.partial(chunked, chunk=128)}
dtype = sys.argv[1] if len(sys.argv) > 1 else "bfloat16"
repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 5
path = make_checkpoint(Path(os.environ.get("SFPO_BENCH_DIR", "/tmp")) / "sfpo_bench_qwen2")
model = from_pretrained(path, dtype=jnp.float32, compute_dtype=jnp.dtype(dtype))
prompts = np.random.default_rng(0).integers(0, ARCH["vocab_size"], (BATCH, PROMPT_LEN)).tolist()
config = SamplingConfig(max_new_tokens=NEW_TOKENS, temperature=1.0)
samplers, ref = {}, None
for name, fn in variants.items():
    S._decode_loop = fn
    sampler = Sampler(model, prompt_buckets=(PROMPT_LEN,))
    t0 = time.perf_counter()
    r = sampler.generate(prompts, config, jax.random.key(0))
    compile_s = time.perf_counter() - t0
    ref = r if ref is None else ref
    same = all(np.array_equal(getattr(r, f), getattr(ref, f)) for f in ("tokens", "logprobs", "lengths"))
    samplers[name] = sampler
    print(f"{name:22s} first call (compile) {compile_s:6.2f} s; identical to current: {same}", flush=True)
S._decode_loop = original
times = {n: [] for n in variants}
for i in range(1, repeats + 1):
    for name, sampler in samplers.items():  # interleaved
        t0 = time.perf_counter()
        sampler.generate(prompts, config, jax.random.key(i))
        times[name].append(time.perf_counter() - t0)
print(f"jax {jax.__version__} {jax.devices()[0].device_kind}; {dtype}; median of {repeats} interleaved generate calls; "
      f"load {os.getloadavg()[0]:.1f}")
base = statistics.median(times["every step (current)"])
for name, t in times.items():
    m = statistics.median(t)
    print(f"  {name:22s} {1e3*m:8.2f} ms/call ({min(t)*1e3:.2f}-{max(t)*1e3:.2f})  {BATCH*NEW_TOKENS/m:9.0f} tok/s  "
          f"{base/m:.2f}x current")
