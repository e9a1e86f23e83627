"""LoRA (Hu et al., arXiv 2106.09685) as a split of the training state, not of the model code.

With LoRA the learner trains one low-rank adapter ``(A, B)`` per targeted kernel and keeps the base weights frozen.
Every forward (the update, the old / reference log-prob passes, sampling, evaluation) runs the unmodified model on
merged params, ``W_eff = W + (alpha / r) · A @ B``, written in the kernel's own layout ``[*in, *out]``::

    W: [*in, *out]      A: [*in, r]      B: [r, *out]      A @ B = tensordot(A, B, 1): [*in, *out]

so ``q_proj``'s ``[E, H, D]`` kernel gets ``A [E, r]`` and ``B [r, H, D]``, ``o_proj``'s ``[H, D, E]`` gets
``A [H, D, r]`` and ``B [r, E]``, and each factor keeps its kernel's logical axes (the rank axis is replicated):
the adapters shard over a mesh by the same rules as the weights they adapt. Gradients reach A and B through the
merge (``dL/dA = s · dL/dW · Bᵀ``, ``dL/dB = s · Aᵀ · dL/dW`` with ``s = alpha / r``, contracting the ``*out``
resp. ``*in`` axes), so the optimizer state, the gradients and SFPO's slow copy are all adapter-sized.

B starts at zero (a fresh LoRA policy *is* the base model) and A from PEFT's default, Kaiming-uniform with
``a = sqrt(5)``: ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``, seeded. The KL reference is the base itself (adapters off),
never a copy.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from sfpo_jax.parallel import param_shardings

# The Dense modules of `sfpo_jax.models.CausalLM` (their attribute names, as in the Hugging Face module tree).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")
DEFAULT_LORA_TARGETS = LORA_TARGETS[:-1]  # every projection of every layer, as PEFT's "all-linear" minus the head


@dataclasses.dataclass(frozen=True)
class LoRA:
    """Low-rank adapters on the kernels of the modules named in ``targets`` (see the module docstring).

    Errors name the config fields (``model.lora_rank``, ``model.lora_alpha``, ``model.lora_targets``) that
    :class:`sfpo_jax.train.config.PolicyConfig` builds this from.

    Attributes:
      rank: r, the adapters' inner dimension (>= 1).
      alpha: the scale's numerator: ``W_eff = W + (alpha / rank) · A @ B`` (PEFT's ``lora_alpha``).
      targets: module names from :data:`LORA_TARGETS` whose kernels get an adapter, in every layer.
      dtype: the adapters' dtype: the master weights of what is trained (and so of the optimizer state).
      seed: A's initialisation seed.
    """

    rank: int
    alpha: float
    targets: tuple[str, ...] = DEFAULT_LORA_TARGETS
    dtype: str = "float32"
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"lora_rank={self.rank!r} must be an int >= 1 (0: no LoRA)")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"lora_alpha={self.alpha!r} must be a finite number > 0")
        unknown = [t for t in self.targets if t not in LORA_TARGETS]
        if not self.targets or unknown or len(set(self.targets)) != len(self.targets):
            raise ValueError(f"lora_targets={list(self.targets)!r} must be distinct names from {list(LORA_TARGETS)}"
                             + (f" (unknown: {unknown})" if unknown else ""))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def init(self, model: nnx.Module, *, mesh=None, rules: Mapping | None = None) -> nnx.State:
        """The initial adapters of ``model`` (a :class:`sfpo_jax.models.CausalLM`, concrete or abstract).

        Returns:
          an ``nnx.State`` of ``nnx.Param`` leaves beside each targeted kernel's path: ``(..., "q_proj",
          "lora_a")`` ``[*in, r]`` (uniform, seeded) and ``(..., "q_proj", "lora_b")`` ``[r, *out]`` (zeros), in
          ``dtype``, carrying the kernel's logical axes (placed on ``mesh`` by them when given).

        Raises:
          ValueError: a target names no kernel of this model (e.g. ``lm_head`` with tied embeddings).
        """
        kernels = list(_target_kernels(model, self.targets))
        if missing := [t for t in self.targets if t not in {path[-1] for path, _, _ in kernels}]:
            raise ValueError(f"lora_targets={list(self.targets)!r}: {missing} name no kernel of this model "
                             "(lm_head is absent where the embeddings are tied)")
        specs = [(path, kernel.shape, n_in, kernel.get_metadata().get("out_sharding") or (None,) * kernel.ndim)
                 for path, kernel, n_in in kernels]

        def build() -> nnx.State:
            key, dtype, entries = jax.random.key(self.seed), jnp.dtype(self.dtype), []
            for i, (path, shape, n_in, axes) in enumerate(specs):
                bound = 1 / math.sqrt(math.prod(shape[:n_in]))
                a = jax.random.uniform(jax.random.fold_in(key, i), (*shape[:n_in], self.rank), dtype, -bound, bound)
                b = jnp.zeros((self.rank, *shape[n_in:]), dtype)
                entries += [((*path, "lora_a"), nnx.Param(a, out_sharding=(*axes[:n_in], None), eager_sharding=False)),
                            ((*path, "lora_b"), nnx.Param(b, out_sharding=(None, *axes[n_in:]), eager_sharding=False))]
            return nnx.from_flat_state(entries)

        # One jitted program that writes every adapter where it lives (each process its own shards, on a pod).
        placed = {} if mesh is None else {"out_shardings": param_shardings(jax.eval_shape(build), mesh, rules)}
        return jax.jit(build, **placed)()

    def merge(self, base: nnx.State, adapters: nnx.State) -> nnx.State:
        """The policy's params: ``base`` (the model's full state) with every adapted kernel replaced by
        ``W + scale · A @ B``, computed in float32 and stored in the kernel's dtype (the base's: the compute dtype,
        which each product would cast to anyway). Pure and differentiable in ``adapters``; the result has
        ``base``'s structure, so the model's graph (and the sampler's compiled programs) take it as they are."""
        flat = dict(nnx.to_flat_state(base))
        pairs = dict(nnx.to_flat_state(adapters))
        for path, a in pairs.items():
            if path[-1] != "lora_a":
                continue
            module = path[:-1]
            kernel, b = flat[(*module, "kernel")], pairs[(*module, "lora_b")]
            delta = jnp.tensordot(a[...].astype(jnp.float32), b[...].astype(jnp.float32), axes=1)
            merged = kernel[...].astype(jnp.float32) + self.scale * delta
            flat[(*module, "kernel")] = kernel.replace(merged.astype(kernel.dtype))
        return nnx.from_flat_state(list(flat.items()))


def _target_kernels(model: nnx.Module, targets: tuple[str, ...]) -> Iterator[tuple[tuple, nnx.Variable, int]]:
    """``(module path, kernel, n_in)`` of every Dense module of ``model`` named in ``targets``, in graph order
    (``n_in``: how many leading kernel axes are contracted with the input)."""
    for path, node in nnx.iter_graph(model):
        kernel = getattr(node, "kernel", None)
        if path and path[-1] in targets and isinstance(kernel, nnx.Variable) and hasattr(node, "n_in"):
            yield tuple(path), kernel, node.n_in
