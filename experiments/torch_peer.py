"""The PyTorch side of the benchmarks, in a process of its own.

On this shared 2-core machine PyTorch collapses under load with OpenMP's default active spin-waiting (measured,
load average ~9: a 2 × 64 forward took 1.3–3.7 s with `OMP_WAIT_POLICY=ACTIVE` against 0.18–0.42 s with
`PASSIVE`), and we also saw `generate` take 31–56 s beside an initialised JAX backend in the same process against
4.6 s alone. So `bench_sampler.py` and `bench_model.py` drive their PyTorch peer through this worker, started with
`OMP_WAIT_POLICY=PASSIVE` unless the caller's environment sets it: it loads the checkpoint once, then answers one
command per stdin line with the seconds the call took, so the caller can interleave it with its own timings.

    python experiments/torch_peer.py MODEL_DIR [float32|bfloat16]
    stdin:  generate SEED NEW_TOKENS IDS.npy | rollout SEED NEW_TOKENS EOS ROWS IDS.npy | forward IDS.npy |
            grad IDS.npy | quit
    stdout: a line "ready THREADS DEVICE", then one float per command (seconds)

`rollout` (W7) samples the left-padded rows of IDS.npy (-1: padding) in calls of ROWS rows, each stopping at EOS
(`generate` runs a call until its every row has ended), and writes the completions' lengths to IDS.npy.lengths.npy.

The model runs on the GPU when PyTorch sees one (each timed call then ends with `torch.cuda.synchronize()`), else on
the CPU.

`TorchPeer` is the client the benchmarks use.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


class TorchPeer:
    """A running worker: `peer.time("forward", ids)` → seconds of that call in the worker. `dtype`: the model's
    parameters and compute ("bfloat16": the whole model cast, PyTorch's fastest CPU mode on AVX512-BF16)."""

    def __init__(self, model_dir: str | Path, dtype: str = "float32"):
        if dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype={dtype!r} must be float32 or bfloat16")
        env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ}
        self._proc = subprocess.Popen([sys.executable, __file__, str(model_dir), dtype], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True, env=env)
        self._tmp = tempfile.TemporaryDirectory()
        ready = self._proc.stdout.readline().split()
        if not ready or ready[0] != "ready":
            raise RuntimeError(f"torch_peer did not start (got {ready!r})")
        self.threads, self.device = int(ready[1]), ready[2]

    def time(self, cmd: str, ids: np.ndarray, *args) -> float:
        path = Path(self._tmp.name) / f"{ids.shape[0]}x{ids.shape[1]}.npy"
        np.save(path, ids)
        self._last = path
        self._proc.stdin.write(" ".join([cmd, *map(str, args), str(path)]) + "\n")
        self._proc.stdin.flush()
        reply = self._proc.stdout.readline()
        if not reply:
            raise RuntimeError(f"torch_peer exited during {cmd!r}")
        return float(reply)

    def last_output(self, name: str) -> Path:
        """The file of the last command's output `name` (e.g. `rollout`'s "lengths")."""
        return self._last.with_name(f"{self._last.name}.{name}.npy")

    def close(self):
        self._proc.stdin.write("quit\n")
        self._proc.stdin.close()
        self._proc.wait(timeout=60)
        self._tmp.cleanup()


def main():
    import torch
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, sys.argv[2] if len(sys.argv) > 2 else "float32")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=dtype).to(device).eval()
    print(f"ready {torch.get_num_threads()} {device}", flush=True)
    for line in sys.stdin:
        cmd, *args = line.split()
        if cmd == "quit":
            break
        ids = torch.tensor(np.load(args[-1]), dtype=torch.long, device=device)
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        if cmd == "generate":
            torch.manual_seed(int(args[0]))
            new_tokens = int(args[1])
            with torch.no_grad():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0,
                                     top_k=0, top_p=1.0, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                     pad_token_id=0)
            assert out.shape == (ids.shape[0], ids.shape[1] + new_tokens)
        elif cmd == "rollout":
            torch.manual_seed(int(args[0]))
            lengths = _rollout(model, ids, *map(int, args[1:4]))
        elif cmd == "forward":
            with torch.inference_mode():
                model(input_ids=ids)
        elif cmd == "grad":
            model.zero_grad(set_to_none=True)
            logits = model(input_ids=ids).logits
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                     ids[:, 1:].reshape(-1))
            loss.backward()
        else:
            raise ValueError(f"unknown command {cmd!r}")
        if device == "cuda":  # CUDA calls return before the GPU is done
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        if cmd == "rollout":
            np.save(f"{args[-1]}.lengths.npy", lengths)
        print(seconds, flush=True)


def _rollout(model, ids, new_tokens: int, eos: int, rows: int) -> np.ndarray:
    """`rollout`: the completions' lengths (up to and including EOS)."""
    import torch

    mask, lengths = (ids >= 0).long(), []
    ids = ids.clamp(min=0)
    with torch.no_grad():
        for start in range(0, len(ids), rows):
            part = slice(start, start + rows)
            out = model.generate(ids[part], attention_mask=mask[part], do_sample=True, temperature=1.0, top_k=0,
                                 top_p=1.0, max_new_tokens=new_tokens, eos_token_id=eos, pad_token_id=eos)
            new = (out[:, ids.shape[1]:] == eos).cpu().numpy()
            ended = new.any(axis=1)
            lengths.append(np.where(ended, new.argmax(axis=1) + 1, new.shape[1]))
    return np.concatenate(lengths)


if __name__ == "__main__":
    from sfpo_jax.host import configure_malloc

    configure_malloc()  # the same malloc settings as the JAX side, whose environment this worker inherits
    main()
