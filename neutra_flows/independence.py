"""Independence Metropolis-Hastings proposals from the flow, mixed with NeuTra's HMC or NUTS.

Where the flow ``q`` (``z = f(u)``, ``u ~ N(0, I)``) is close to the target,
a fresh draw from it is a good proposal on its own: accept ``z' = f(u')`` with
probability ``min(1, w(u') / w(u))``, ``log w(u) = log p(f(u)) + log|det f'(u)|
- log N(u; 0, I)``. Each proposal costs one density evaluation and no
gradient, and an accepted one is independent of the chain's past. This is the
global move of flowMC (Gabrié et al., 2022; Wong et al., 2023), there mixed
with MALA; here it is mixed with NeuTra's HMC or NUTS in the flow's latent
space, which keeps the chain moving where the flow is poor (a low weight's
neighbourhood, a tail the flow misses).

The schedule is a fixed cycle after the warm-up: one NeuTra transition, then
``independence_steps`` independence transitions, each kept as a draw. Every
kernel in the cycle leaves the target invariant, so the draws are exact; the
warm-up's adaptation (step size, ChEES, latent scale, flow refits) never sees
an independence step. A proposal whose flow gives a non-finite log density or
log-det is rejected, never accepted.

The HMC or NUTS transition needs the gradient at its starting point: after an
accepted proposal it is re-evaluated once, for every chain of the batch, just
before the next NeuTra transition (counted with the gradients).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import tensorflow as tf
import tensorflow_probability as tfp
from tensorflow_probability.python.internal import unnest

__all__ = ["NeuTraIndependenceResults", "count_proposals", "is_independence_step", "propose"]


class NeuTraIndependenceResults(NamedTuple):
    """Kernel results of :class:`~neutra_flows.NeuTraKernel` with independence proposals.

    ``inner_results`` are the NeuTra stack's own results (dual averaging outermost).
    """

    inner_results: Any
    # Transitions taken since bootstrap (NeuTra's and independence ones), int32 scalar.
    transition: tf.Tensor
    # Whether the transition that produced these results was an independence proposal.
    independence_step: tf.Tensor
    # Per chain: the proposal was accepted (False on NeuTra transitions).
    independence_accepted: tf.Tensor
    # Per chain: min(0, log w(u') - log w(u)); 0 on NeuTra transitions.
    independence_log_accept_ratio: tf.Tensor
    # Some chain moved since its gradient was last evaluated (a NeuTra step refreshes it first).
    stale_gradients: tf.Tensor
    # Whether the transition re-evaluated the gradient before its NeuTra step.
    refreshed_gradients: tf.Tensor


def wrap(inner_results: Any, num_chains_like: tf.Tensor) -> NeuTraIndependenceResults:
    """Fresh wrapper results around the stack's bootstrap results."""
    false = tf.zeros(tf.shape(num_chains_like), tf.bool)
    return NeuTraIndependenceResults(
        inner_results=inner_results,
        transition=tf.zeros([], tf.int32),
        independence_step=tf.constant(False),
        independence_accepted=false,
        independence_log_accept_ratio=tf.zeros_like(num_chains_like),
        stale_gradients=tf.constant(False),
        refreshed_gradients=tf.constant(False),
    )


def is_independence_step(transition: tf.Tensor, num_adaptation_steps: int,
                         independence_steps: int) -> tf.Tensor:
    """Whether transition ``transition`` (0-based) is an independence proposal in the cycle."""
    after = transition - num_adaptation_steps
    return (after >= 0) & (tf.math.floormod(after, independence_steps + 1) != 0)


def count_proposals(first: int, num_steps: int, num_adaptation_steps: int, independence_steps: int) -> int:
    """Independence transitions among transitions ``first ... first + num_steps - 1`` (per chain)."""
    if independence_steps <= 0:
        return 0
    cycle = independence_steps + 1

    def upto(n: int) -> int:  # proposals among transitions 0 ... n - 1
        after = max(0, n - num_adaptation_steps)
        return after - math.ceil(after / cycle)

    return upto(first + num_steps) - upto(first)


def log_base_density(u: tf.Tensor) -> tf.Tensor:
    """``log N(u; 0, I)`` over the last axis."""
    d = tf.cast(tf.shape(u)[-1], u.dtype)
    return -0.5 * tf.reduce_sum(tf.square(u), axis=-1) - 0.5 * d * tf.constant(math.log(2 * math.pi), u.dtype)


def propose(*, latent_fn, bijector, latent_scale, v, current_lp, seed) -> tuple[tf.Tensor, ...]:
    """One independence step for every chain at latent ``v`` (``u = s * v``).

    ``latent_fn(v)`` is the pulled-back log density the NeuTra kernel moves on,
    ``log p(f(s v)) + log|det f'(s v)| + sum log s``; the proposal's density in
    ``v`` is ``N(s v) prod s``, so ``log w(v) = latent_fn(v) - log N(s v)`` up to
    ``sum log s``, which cancels in the ratio.
    Returns ``(v_new, z_new, lp_new, accepted, log_accept_ratio)``.
    """
    dtype = v.dtype
    proposal_seed, accept_seed = tfp.random.split_seed(seed, n=2)
    u_new = tf.random.stateless_normal(tf.shape(v), seed=proposal_seed, dtype=dtype)
    scale = tf.convert_to_tensor(latent_scale, dtype)
    v_new = u_new / scale
    lp_new = latent_fn(v_new)
    log_w_new = lp_new - log_base_density(u_new)
    log_w_old = current_lp - log_base_density(v * scale)
    log_ratio = log_w_new - log_w_old
    finite = tf.math.is_finite(log_w_new) & tf.reduce_all(tf.math.is_finite(v_new), axis=-1)
    z_new = bijector.forward(v_new)
    finite &= tf.reduce_all(tf.math.is_finite(z_new), axis=-1)
    log_uniform = tf.math.log(tf.random.stateless_uniform(tf.shape(log_ratio), seed=accept_seed, dtype=dtype))
    accepted = finite & (log_uniform < log_ratio)
    safe_ratio = tf.where(finite, tf.minimum(log_ratio, tf.zeros_like(log_ratio)),
                          tf.constant(-math.inf, dtype))
    return v_new, z_new, lp_new, accepted, safe_ratio


def move(inner_results: Any, z: tf.Tensor, *, v_new, z_new, lp_new, accepted) -> tuple[tf.Tensor, Any]:
    """The chains' state and stack results after the accepted proposals (gradients left stale)."""
    keep = accepted[..., tf.newaxis]
    v_old = unnest.get_innermost(inner_results, "transformed_state")
    v = tf.where(keep, v_new, v_old)
    z = tf.where(keep, z_new, z)
    lp = tf.where(accepted, lp_new, unnest.get_innermost(inner_results, "target_log_prob"))
    inner_results = unnest.replace_innermost(inner_results, transformed_state=v, target_log_prob=lp)
    return z, inner_results


def refresh_gradients(inner_results: Any, latent_fn) -> Any:
    """The stack results with the log density and its gradient re-evaluated at the chains' ``v``."""
    v = unnest.get_innermost(inner_results, "transformed_state")
    lp, grad = tfp.math.value_and_gradient(latent_fn, v)
    old = unnest.get_innermost(inner_results, "grads_target_log_prob")
    grads = [grad] if isinstance(old, (list, tuple)) else grad
    return unnest.replace_innermost(inner_results, target_log_prob=lp, grads_target_log_prob=grads)
