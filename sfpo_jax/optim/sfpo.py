"""Slow-Fast Policy Optimization (SFPO) as an optax gradient transformation.

SFPO ("Slow-Fast Policy Optimization: Reposition-Before-Update for LLM Reasoning", arXiv 2510.04072) turns
every batch of rollouts into a short fast trajectory of optimizer steps, a reposition of the parameters back
towards the point the rollouts were drawn at, and one slow correction step. Here it is a transformation chained
*after* any optax optimizer, so the optimizer's state (moments, step counts, schedules) simply carries on through
every call::

  tx = optax.chain(optax.adamw(1e-6), sfpo(num_fast_steps=3, alpha=0.8))

The training loop asks the optimizer state how many calls the current batch gets
(:func:`calls_per_batch`) and calls ``tx.update`` that many times on the same batch.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

# Added to the population std of the entropy window, as in the official code.
_ZSCORE_EPS = 1e-9


class SFPOState(NamedTuple):
    """State of :func:`sfpo`.

    Attributes:
      count: int32 scalar, the index of the next call within the current cycle (batch).
      cycle_length: int32 scalar, calls in the current cycle: ``(K+1)·M`` while SFPO is active (``K·M`` without
        the slow correction), ``M`` once it has switched to plain calls (and always ``M`` when ``K = 0``).
      num_batches: int32 scalar, completed cycles (batches); the step at which an ``alpha`` schedule is read.
      active: bool scalar, whether SFPO is on; the entropy switch turns it off for good.
      slow_params: the slow point θ_s, a copy of the params with their shapes, dtypes and shardings; the only
        parameter-sized buffer. ``None`` when ``K = 0``, which keeps nothing.
      entropy_history: float32 ``[W]`` ring buffer of the entropies recorded at the end of each batch
        (``[0]`` when the switch is disabled or ``K = 0``).
      entropy_count: int32 scalar, entropies recorded so far (the ring buffer holds the last ``min(W, n)``).
      entropy_sum: float32 scalar, the sum of the entropies passed so far in the current cycle's last epoch.
      num_minibatches: int32 scalar, M, the calls per epoch (a constant): what a learner checks its mini-batch
        split against, so that M has one source (:func:`minibatches_per_epoch`).
    """

    count: jax.Array
    cycle_length: jax.Array
    num_batches: jax.Array
    active: jax.Array
    slow_params: optax.Params | None
    entropy_history: jax.Array
    entropy_count: jax.Array
    entropy_sum: jax.Array
    num_minibatches: jax.Array


def _check_args(num_fast_steps, alpha, num_minibatches, entropy_window, entropy_threshold, slow_correction) -> None:
    def is_int(x):
        return isinstance(x, numbers.Integral) and not isinstance(x, bool)

    if not is_int(num_fast_steps) or num_fast_steps < 0:
        raise ValueError(f"num_fast_steps must be an integer >= 0, got num_fast_steps={num_fast_steps!r}")
    if not isinstance(slow_correction, bool):
        raise ValueError(f"slow_correction must be a bool, got slow_correction={slow_correction!r}")
    if not slow_correction and num_fast_steps == 0:
        raise ValueError(
            "slow_correction=False needs num_fast_steps >= 1 (a batch would get no optimizer call at all), "
            f"got num_fast_steps={num_fast_steps!r}"
        )
    if not is_int(num_minibatches) or num_minibatches < 1:
        raise ValueError(f"num_minibatches must be an integer >= 1, got num_minibatches={num_minibatches!r}")
    if entropy_window is not None and (not is_int(entropy_window) or entropy_window < 2):
        raise ValueError(f"entropy_window must be None or an integer >= 2, got entropy_window={entropy_window!r}")
    if (
        not isinstance(entropy_threshold, numbers.Real)
        or isinstance(entropy_threshold, bool)
        or not math.isfinite(entropy_threshold)
    ):
        raise ValueError(f"entropy_threshold must be a finite number, got entropy_threshold={entropy_threshold!r}")
    if callable(alpha):
        return
    if isinstance(alpha, jax.core.Tracer):
        return  # A traced alpha (e.g. from `inject_hyperparams`) can only be checked where it is made.
    try:
        value = float(alpha)
    except (TypeError, ValueError):
        raise ValueError(f"alpha must be a number in [0, 1] or a schedule, got alpha={alpha!r}") from None
    if not 0.0 <= value <= 1.0:  # Also rejects NaN.
        raise ValueError(f"alpha must be in [0, 1], got alpha={alpha!r}")


def sfpo(
    num_fast_steps: int = 3,
    alpha: float | optax.ScalarOrSchedule = 0.8,
    num_minibatches: int = 1,
    entropy_window: int | None = 30,
    entropy_threshold: float = 1.0,
    slow_correction: bool = True,
) -> optax.GradientTransformationExtraArgs:
    r"""Slow-Fast Policy Optimization, chained after any optax optimizer.

    With :math:`u = \mathrm{inner}(g)` the update the preceding optimizer makes from a gradient :math:`g`,
    each batch of rollouts (sampled at the slow point :math:`\theta_s`) runs three stages:

    .. math::

      \theta_0 &= \theta_s \\
      \theta_{k+1} &= \theta_k + \mathrm{inner}(\nabla L(\theta_k)), \quad k = 0, \dots, K-1
          \quad \text{(fast trajectory)} \\
      \tilde\theta &= \theta_s + \alpha (\theta_K - \theta_s) \quad \text{(reposition)} \\
      \theta_s' &= \tilde\theta + \mathrm{inner}(\nabla L(\tilde\theta)) \quad \text{(slow correction)}

    and the next batch is sampled at :math:`\theta_s'`. As in the official code, each arrow is an epoch of
    ``M = num_minibatches`` optimizer calls (one per mini-batch), so a batch gets ``(K+1)·M`` calls. This
    transformation only sees ``u`` and the params, and emits, at call ``c`` of a cycle:

    * ``c = 0``: stores :math:`\theta_s` = params (the only parameter-sized buffer kept) and emits ``u``;
    * ``c = K·M − 1`` (the last fast call): emits :math:`\theta_s + \alpha(\text{params} + u - \theta_s)
      - \text{params}`, so that ``optax.apply_updates`` lands on :math:`\tilde\theta`;
    * every other call, including the ``M`` slow-correction calls: emits ``u`` unchanged.

    **Ablation without the slow correction** (``slow_correction=False``, the paper's "w/o slow correction"):
    stage III is dropped and the batch ends at the repositioned point, :math:`\theta_s' = \tilde\theta =
    \theta_s + \alpha(\theta_K - \theta_s)`. A batch then gets ``K·M`` calls, the last of which repositions
    (and records the entropy, being the batch's last call); after the entropy switch a batch gets ``M`` plain
    calls as usual. It needs ``K >= 1``.

    ``num_fast_steps=0`` is the inner optimizer bit for bit (GRPO): the updates pass through untouched and
    nothing parameter-sized is stored. A constant ``alpha=1`` keeps :math:`\theta_K`: the reposition is the
    identity, θ_s is never stored (its buffer stays as initialised), and a batch is ``(K+1)·M`` calls of the inner
    optimizer bit for bit, i.e. GRPO with K+1 epochs per batch (the compute-matched baseline, ``algo: grpo-epochs``
    in the trainer). With donated buffers the overhead is about one copy of the params per cycle (W3 in
    BENCHMARKS.md).

    **Switch to GRPO.** Pass each call's mini-batch mean token entropy as ``tx.update(..., entropy=h)`` (the
    entropy of the policy being updated, on the mini-batch of that call). At the end of each batch the mean of
    the values passed during its last epoch (its last ``M`` calls: the slow correction while active) is
    recorded, the official signal (verl's ``actor/entropy_loss`` averaged over the slow epoch's mini-batches);
    values passed at other calls are ignored. Once at least ``W = entropy_window`` values exist, the newest
    recorded value ``H`` is scored against the last
    ``W`` recorded values, *including* ``H`` itself (as the official code does: it appends first, then
    scores ``H[-1]`` against ``H[-W:]``)::

      z = (H − mean(H[-W:])) / (std(H[-W:]) + 1e-9)     # population std, float32

    and ``z >= entropy_threshold`` switches SFPO off for good once the current cycle has completed: every
    later batch gets ``M`` plain calls of the inner optimizer. Callers that never pass ``entropy`` get pure
    SFPO; ``entropy_window=None`` disables the switch; a non-finite entropy is not recorded (the official code
    would carry it in its window, and never switch while it is there); ``num_fast_steps=0`` ignores it.

    Args:
      num_fast_steps: ``K >= 0``, the fast epochs per batch.
      alpha: the reposition weight in ``[0, 1]`` (0: back to :math:`\theta_s`, 1: keep :math:`\theta_K`),
        or an optax schedule evaluated at the number of completed batches.
      num_minibatches: ``M >= 1``, optimizer calls per epoch.
      entropy_window: ``W >= 2``, the window of the entropy z-score, or ``None`` to disable the switch.
      entropy_threshold: ``τ``, a finite z-score at or above which SFPO switches off.
      slow_correction: ``False`` for the ablation that ends each batch at :math:`\tilde\theta` (``K·M`` calls
        per batch); requires ``num_fast_steps >= 1``.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` whose ``update(updates, state, params, *,
      entropy=None)`` requires ``params``. ``entropy`` is a float32-castable scalar.

    Raises:
      ValueError: at construction, naming the argument, for ``K < 0``, ``M < 1``, ``alpha`` outside
        ``[0, 1]``, ``W < 2``, a non-finite threshold, or ``slow_correction=False`` with ``K = 0``; in
        ``update`` when ``params`` is missing.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from sfpo_jax.optim import sfpo, calls_per_batch
      >>> tx = optax.chain(optax.adamw(1e-3), sfpo(num_fast_steps=3, alpha=0.8))
      >>> params = {"w": jnp.ones(3)}
      >>> state = tx.init(params)
      >>> for _ in range(calls_per_batch(state)):  # 4 calls on the same batch
      ...     grads = {"w": 2.0 * params["w"]}
      ...     updates, state = tx.update(grads, state, params, entropy=1.0)
      ...     params = optax.apply_updates(params, updates)
      >>> calls_per_batch(state)
      4

    References:
      `Slow-Fast Policy Optimization: Reposition-Before-Update for LLM Reasoning
      <https://arxiv.org/abs/2510.04072>`_, 2025; official code https://github.com/Urheen/SFPO.
    """
    _check_args(num_fast_steps, alpha, num_minibatches, entropy_window, entropy_threshold, slow_correction)
    K, M = int(num_fast_steps), int(num_minibatches)
    # Without the slow correction the cycle ends with the reposition call; the next cycle's call 0 then stores
    # θ̃ as the new slow point.
    sfpo_length, plain_length = (K + 1 if slow_correction else K) * M, M
    last_fast = K * M - 1
    use_switch = K > 0 and entropy_window is not None
    W = int(entropy_window) if use_switch else 0
    # A constant α = 1 keeps θ_K: the reposition is the identity, so nothing is stored or moved and a batch is
    # exactly K+1 epochs of the inner optimizer (GRPO with K+1 epochs, the compute-matched baseline), bit for bit.
    repositions = K > 0 and not (isinstance(alpha, numbers.Real) and alpha == 1)  # a traced α may be anything

    def init_fn(params):
        return SFPOState(
            count=jnp.zeros([], jnp.int32),
            cycle_length=jnp.asarray(sfpo_length, jnp.int32),
            num_batches=jnp.zeros([], jnp.int32),
            active=jnp.asarray(K > 0),
            # A copy (not zeros) so that θ_s is the initial point even before the first call; jnp.copy keeps
            # each leaf's sharding.
            # Kept whenever K > 0, so that the state's structure does not depend on α's value (a traced α may
            # update a state built with a constant one).
            slow_params=jax.tree.map(jnp.copy, params) if K > 0 else None,
            entropy_history=jnp.zeros([W], jnp.float32),
            entropy_count=jnp.zeros([], jnp.int32),
            entropy_sum=jnp.zeros([], jnp.float32),
            num_minibatches=jnp.asarray(M, jnp.int32),
        )

    def update_fn(updates, state, params=None, *, entropy=None, **extra_args):
        del extra_args
        if params is None:
            raise ValueError(
                "sfpo needs the current params: call tx.update(updates, state, params) "
                "(it stores the slow point and repositions from it)."
            )
        c = state.count
        is_last = c == state.cycle_length - 1
        new_count = jnp.where(is_last, 0, c + 1).astype(jnp.int32)
        new_num_batches = (state.num_batches + is_last).astype(jnp.int32)
        if K == 0:
            # Bit for bit the inner optimizer: the updates are not touched at all.
            return updates, state._replace(count=new_count, num_batches=new_num_batches)

        new_updates, slow = (_store_and_reposition(updates, state, params, alpha, last_fast) if repositions
                             else (updates, state.slow_params))
        active, history, n, h_sum = state.active, state.entropy_history, state.entropy_count, state.entropy_sum
        if use_switch and entropy is not None:
            in_last_epoch = c >= state.cycle_length - M
            h_sum = jnp.where(in_last_epoch, h_sum + jnp.asarray(entropy, jnp.float32).reshape(()), 0.0)
            h = h_sum / M
            h_sum = jnp.where(is_last, 0.0, h_sum)
            # A non-finite entropy is not recorded: it would poison the window for good.
            record = jnp.logical_and(is_last, jnp.isfinite(h))
            history = jnp.where(record, history.at[n % W].set(h), history)
            n = (n + record).astype(jnp.int32)
            # Once n >= W the ring buffer holds exactly the last W values, the newest (h) included.
            z = (h - jnp.mean(history)) / (jnp.std(history) + _ZSCORE_EPS)
            spike = jnp.logical_and(n >= W, z >= entropy_threshold)
            active = jnp.logical_and(active, jnp.logical_not(jnp.logical_and(record, spike)))
        # The switch only changes the cycle length at a cycle boundary (is_last), so the next batch is plain.
        cycle_length = jnp.where(active, sfpo_length, plain_length).astype(jnp.int32)
        new_state = SFPOState(
            count=new_count,
            cycle_length=cycle_length,
            num_batches=new_num_batches,
            active=active,
            slow_params=slow,
            entropy_history=history,
            entropy_count=n,
            entropy_sum=h_sum.astype(jnp.float32),
            num_minibatches=state.num_minibatches,
        )
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _store_and_reposition(updates, state: SFPOState, params, alpha, last_fast: int):
    """``(updates, slow_params)``: θ_s stored at a cycle's call 0 (while active), and the updates of the last fast
    call replaced by the move to θ̃ = θ_s + α(θ_K − θ_s)."""
    c = state.count
    a = alpha(state.num_batches) if callable(alpha) else alpha
    is_store = jnp.logical_and(state.active, c == 0)
    is_repos = jnp.logical_and(state.active, c == last_fast)
    # Selects with a scalar predicate rather than lax.cond/switch: a conditional over the updates makes them
    # materialise as its operands (measured 5.7x adamw on CPU), while these selects fuse into the inner
    # optimizer's loops, which LLVM unswitches on the loop-invariant predicate. On XLA:CPU (checked in the
    # emitted IR) the store's loop is skipped outright when not storing (its output aliases θ_s in place) and
    # the plain version of the update loop never loads θ_s, so the calls that neither store nor reposition
    # cost what adamw costs; storing costs one read of the params and one write of θ_s, repositioning one read
    # of θ_s (W3 in BENCHMARKS.md). With K·M = 1 the one fast call does both, and the reposition then reads
    # the θ_s it has just stored.
    slow = jax.tree.map(lambda s, p: jnp.where(is_store, p, s), state.slow_params, params)

    def reposition(u, s, p):
        # θ_s + α(θ_K − θ_s) − params with θ_K = params + u, in at least float32 (bf16 params round once).
        dtype = jnp.promote_types(p.dtype, jnp.float32)
        s, p32 = s.astype(dtype), p.astype(dtype)
        moved = s + jnp.asarray(a, dtype) * (p32 + u.astype(dtype) - s) - p32
        return jnp.where(is_repos, moved.astype(u.dtype), u)

    new_updates = jax.tree.map(reposition, updates, slow, params)
    return new_updates, slow


def _find_state(opt_state: Any) -> SFPOState:
    found = [
        leaf
        for leaf in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, SFPOState))
        if isinstance(leaf, SFPOState)
    ]
    if len(found) != 1:
        raise ValueError(
            f"expected exactly one SFPOState in the optimizer state, found {len(found)}; "
            "chain sfpo(...) after the optimizer (use sfpo(num_fast_steps=0) for plain GRPO)."
        )
    return found[0]


def calls_per_batch(opt_state: Any) -> int:
    """The optimizer calls left in the current cycle: ``(K+1)·M`` at the start of a batch while SFPO is active
    (``K·M`` with ``slow_correction=False``), ``M`` once it has switched off (or when ``K = 0``).

    Finds the :class:`SFPOState` anywhere in ``opt_state`` (inside ``optax.chain``, ``named_chain``,
    ``MultiSteps``, ``apply_if_finite``, ``inject_hyperparams``). Under ``MultiSteps(every_k_schedule=k)``
    each SFPO call is ``k`` calls of the wrapper's ``update``; this counts SFPO calls.

    Reads device scalars, so call it outside ``jit`` (once per batch: a host sync).

    Raises:
      ValueError: when ``opt_state`` holds no SFPOState or more than one. A plain optimizer has no notion of
        calls per batch with mini-batches; chain ``sfpo(num_fast_steps=0, num_minibatches=M)`` for GRPO.
    """
    state = _find_state(opt_state)
    return int(state.cycle_length) - int(state.count)


def minibatches_per_epoch(opt_state: Any) -> int:
    """M, the optimizer calls per epoch over a batch (``sfpo(num_minibatches=M)``): a learner splits each batch
    into this many mini-batches and gives call ``c`` mini-batch ``c % M``.

    Same lookup and errors as :func:`calls_per_batch`; a host sync.
    """
    return int(_find_state(opt_state).num_minibatches)


def sfpo_active(opt_state: Any) -> bool:
    """Whether SFPO is still on (``False`` after the entropy switch, and always for ``num_fast_steps=0``).

    Same lookup and errors as :func:`calls_per_batch`; a host sync.
    """
    return bool(_find_state(opt_state).active)
