"""NeuTra HMC and NUTS, and the plain-NUTS baseline they are compared with.

NeuTra (Hoffman et al., 2019) runs HMC or NUTS on the *pulled-back* density of a
trained flow ``f`` (base ``u`` to the target's unconstrained ``z = f(u)``):

    log p~(u) = log p(f(u)) + log|det df/du (u)|,

which is close to a standard normal when the flow is good, so a unit mass matrix
and a short trajectory suffice. :class:`NeuTraKernel` is a TFP transition kernel
that does exactly this with TFP's own pieces (outermost first)::

    DualAveragingStepSizeAdaptation          step size, during the first
      TransformedTransitionKernel(flow)      num_adaptation_steps only
        [GradientBasedTrajectoryLengthAdaptation]   ChEES (HMC without a fixed
          HamiltonianMonteCarlo | NoUTurnSampler    leapfrog count)

The inner kernel sees ``target.unnormalized_log_prob`` (already including the
target's constraining bijector), and the transformed kernel adds the flow's
log-det. Step-size adaptation stays outermost because nesting it inside a
transformed kernel breaks (TFP issue 589); the ChEES kernel must sit inside the
transformed kernel (TFP forbids the other order), so its criterion, and the
trajectory length it learns, live in the whitened latent space.

:func:`sample` is the one-call driver. With ``flow=None`` it runs the baseline a
user would otherwise run: TFP's preconditioned NUTS (or HMC) with Stan-style
windowed adaptation of a diagonal mass matrix and the step size.

The returned :class:`arviz.InferenceData` holds

``posterior``
    ``target.named_draws(z)``: the user's variables in the constrained space,
    dims ``(chain, draw, ...)``.
``sample_stats`` (dims ``(chain, draw)``)
    ``diverging`` (bool), ``acceptance_rate``, ``step_size``, ``n_steps``
    (leapfrog steps of the transition, i.e. gradient evaluations), ``lp`` (the
    target's unnormalised log density on its unconstrained space at the draw,
    comparable between NeuTra and the baseline), ``energy`` (the Hamiltonian
    ``-log p~ + K(p)`` in the space the sampler moves in, at the state the
    transition returned, for E-BFMI), and ``tree_depth`` for NUTS.
``attrs`` (on both groups)
    ``sampler``, ``kernel``, ``flow``, ``num_chains``, ``num_warmup``,
    ``num_samples``, ``seed``, ``compile_time``, ``warmup_time``,
    ``sampling_time`` (seconds; compile time is excluded from the other two),
    ``flow_training_time`` (when a ``FitResult`` was given: its wall time; with
    ``flow="adapt"`` also the adaptation's start: whitening, short fit),
    ``num_grad_evals_warmup``, ``num_grad_evals_sampling`` (totals over all
    chains), ``num_divergences_warmup``, ``num_divergences_sampling``,
    ``step_size``, ``target_accept_prob``, ``trajectory_length`` (the frozen
    ChEES or fixed trajectory length, NaN for NUTS), ``mean_leapfrog_steps``,
    ``max_tree_depth`` (NUTS), ``adaptation``, ``target``, ``dtype``, and
    ``ground_truth`` (JSON ``{"mean": ..., "std": ...}``) when the target knows it.
    Where the time went: ``phase_times`` (JSON ``{phase: seconds}`` in order:
    a given ``FitResult``'s ``whitening``, ``training`` and ``diagnostics``, or
    ``flow="adapt"``'s ``whitening`` and ``training`` (its start); then
    ``set-up``, ``compilation``, ``warm-up``, ``refits``, ``sampling``,
    ``assembly`` and ``other``), ``time_to_first_draw`` (seconds from the call
    to the first kept draw) and ``total_time`` (to the return), both with a
    given ``FitResult``'s ``total_time`` added and every compilation included.

A *gradient evaluation* is one leapfrog step of one chain. The one gradient per
chain computed at bootstrap and the lp re-evaluation for ``sample_stats`` are not
counted. Batched NUTS pads finished chains while others still build their trees;
that padding is not counted either (it shows in the wall times instead).

References
----------
* Hoffman, M., Sountsov, P., Dillon, J. V., Langmore, I., Tran, D. and
  Vasudevan, S. "NeuTra-lizing bad geometry in Hamiltonian Monte Carlo using
  neural transport." 2019, arXiv:1903.03704.
* Hoffman, M., Radul, A. and Sountsov, P. "An adaptive-MCMC scheme for setting
  trajectory lengths in Hamiltonian Monte Carlo." AISTATS 2021 (ChEES).
* Hoffman, M. D. and Gelman, A. "The No-U-Turn Sampler: adaptively setting path
  lengths in Hamiltonian Monte Carlo." JMLR 15, 2014, arXiv:1111.4246.
* Stan Development Team. "Stan Reference Manual: HMC algorithm parameters"
  (windowed adaptation).
* Betancourt, M. "Diagnosing suboptimal cotangent disintegrations in
  Hamiltonian Monte Carlo." 2016, arXiv:1604.00695 (energy, E-BFMI).
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

# Internal TFP modules, pinned by the tensorflow-probability<0.26 requirement:
# the windowed (Stan-style) adaptation schedule and the momentum distribution it
# expects are not exported, and `unnest` is how TFP's own kernels reach into
# nested kernel results.
from tensorflow_probability.python.experimental.mcmc import (
    preconditioning_utils,
    windowed_sampling,
)
from tensorflow_probability.python.internal import unnest

from neutra_flows import independence
from neutra_flows._utils import as_seed, check_positive_int, split_seed, stan_regularised
from neutra_flows.adaptation import FlowAdaptation, FlowAdapter
from neutra_flows.derived import GROUP, truth_json

tfb = tfp.bijectors

__all__ = ["NeuTraKernel", "sample"]

KERNELS = ("hmc", "nuts")
# Stan and TFP's NUTS both call a transition divergent when the energy error
# exceeds 1000; the same threshold is used for HMC.
_DIVERGENCE_ENERGY = 1000.0
# Stan's windowed adaptation needs a few steps per window.
_MIN_WINDOWED_WARMUP = 20
_SAMPLE_CHAIN_SALT = "mcmc.sample_chain"
# Latent-scale adaptation needs enough warm-up draws for a variance per coordinate.
_MIN_LATENT_WARMUP = 100
# Vehtari et al. (2021): R-hat above 1.01 means the chains disagree; above 1.05
# the draws are very likely wrong.
_RHAT_WARN = 1.01
_RHAT_SEVERE = 1.05
# More than 1 % divergent transitions: the sampler misses part of the posterior.
_DIVERGENCE_WARN = 0.01


# Stan's default, for NUTS and HMC alike. For NeuTra-HMC with ChEES, 0.75 gave
# the same ESS per gradient on the 10-D funnel and 5 % more on the banana, but
# several times more divergences where a trained IAF's tails turn steep
# (docs/sampling.md).
_DEFAULT_TARGET_ACCEPT_PROB = 0.8


def _target_accept_prob(value: float | None) -> float:
    """``value`` (default :data:`_DEFAULT_TARGET_ACCEPT_PROB`) as a float in (0, 1), else ``ValueError``."""
    value = _DEFAULT_TARGET_ACCEPT_PROB if value is None else float(value)
    if not 0.0 < value < 1.0:
        raise ValueError(f"target_accept_prob must lie in (0, 1), got {value}")
    return value


def _step_size(value: Any) -> float | None:
    """``value`` as a positive finite float, or None (the default step size), else ``ValueError``."""
    if value is None:
        return None
    try:
        step = float(value)
    except (TypeError, ValueError):
        step = math.nan
    if isinstance(value, (bool, np.bool_)) or not (math.isfinite(step) and step > 0):
        raise ValueError(f"step_size must be a positive finite float or None (the default), got {value!r}")
    return step


def _default_step_size(event_size: int) -> float:
    # TFP's windowed-sampling heuristic (Langmore et al. 2019): a well-scaled
    # d-dimensional target wants a step of order d^(-1/4).
    return 0.5 * event_size**-0.25


def _check_kernel_name(kernel: str) -> str:
    if not isinstance(kernel, str) or kernel.lower() not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    return kernel.lower()


def _check_target(target: Any) -> None:
    for attr in ("unnormalized_log_prob", "event_size", "dtype"):
        if not hasattr(target, attr):
            raise ValueError(
                "target must be a neutra_flows.Target (or have unnormalized_log_prob, "
                f"event_size and dtype); got {type(target).__name__} without {attr!r}"
            )


def _flow_name(flow: tfb.Bijector) -> str:
    config = getattr(flow, "flow_config", None)
    if isinstance(config, dict) and "name" in config:
        return str(config["name"])
    return str(getattr(flow, "name", type(flow).__name__))


def _check_flow(flow: Any, target: Any) -> None:
    """Raises ValueError unless `flow` maps `[d]` to `[d]` with a finite exact log-det."""
    d = int(target.event_size)
    if not isinstance(flow, tfb.Bijector):
        raise ValueError(f"flow must be a tfp.bijectors.Bijector or a FitResult, got {type(flow).__name__}")
    if getattr(flow, "exact_log_det", True) is False:
        raise ValueError(
            f"flow {_flow_name(flow)!r} has a stochastic log-det estimate "
            "(exact_log_det=False); NeuTra needs the exact log-det"
        )
    config = getattr(flow, "flow_config", None)
    if isinstance(config, dict) and "event_size" in config and int(config["event_size"]) != d:
        raise ValueError(
            f"flow {_flow_name(flow)!r} has event size {config['event_size']} but the target has event size {d}"
        )
    u = tf.zeros([d], dtype=target.dtype)
    # Whatever a flow raises on one [d] vector (shape, dtype), it does not fit the target.
    try:
        z = flow.forward(u)
        ldj = flow.forward_log_det_jacobian(u, event_ndims=1)
    except Exception as err:
        raise ValueError(
            f"flow {_flow_name(flow)!r} cannot be applied to a vector of the target's event "
            f"size {d} and dtype {target.dtype.name}: {err}"
        ) from err
    if tuple(z.shape) != (d,):
        raise ValueError(
            f"flow {_flow_name(flow)!r} maps a [{d}] vector to shape {tuple(z.shape)}; its "
            f"event size must equal the target's ({d})"
        )
    if tuple(ldj.shape) != ():
        raise ValueError(
            f"flow {_flow_name(flow)!r}: forward_log_det_jacobian of one [{d}] vector has "
            f"shape {tuple(ldj.shape)}, expected a scalar (forward_min_event_ndims must be 1)"
        )
    if not (np.all(np.isfinite(z.numpy())) and np.isfinite(ldj.numpy())):
        raise ValueError(f"flow {_flow_name(flow)!r} is not finite at the origin of its base")


def _all_gathered_log_mean_exp(x, axis, keepdims=False, experimental_named_axis=None):
    """TFP's ``log mean exp`` over ``axis`` and, with an axis name, over all replicas' chains.

    The per-chain values are all-gathered (one scalar per chain) and reduced in
    chain order by the same op as on one device, so the adapted step size does not
    depend on how the chains are sharded; an all-reduced sum would round
    differently for each replica count, and MCMC amplifies such differences.
    """
    axis_value = tf.get_static_value(tf.convert_to_tensor(axis))
    reduces_chains = axis_value is not None and 0 in np.reshape(axis_value, [-1])
    if experimental_named_axis is not None and reduces_chains:
        x = tf.distribute.get_replica_context().all_gather(x, axis=0)
    return tfp.math.reduce_logmeanexp(x, axis=axis, keepdims=keepdims)


class NeuTraKernel(tfp.mcmc.TransitionKernel):
    """HMC or NUTS in a trained flow's latent space, as a TFP transition kernel.

    The chain state is the target's flat unconstrained ``z`` of shape
    ``[num_chains, d]`` (any batch shape works); internally the sampler moves the
    base variable ``u`` with ``z = flow.forward(u)`` under the pulled-back density
    ``log p(f(u)) + log|det f'(u)|``. Use it as is::

        kernel = NeuTraKernel(target, flow, kernel="hmc", num_adaptation_steps=800)
        z0, results = kernel.init_chains(16, seed=1)      # no flow inverse needed
        draws = tfp.mcmc.sample_chain(1000, z0, results, kernel=kernel,
                                      num_burnin_steps=1000, trace_fn=None, seed=2)

    ``tfp.mcmc.sample_chain(..., current_state=z0)`` without kernel results also
    works, but bootstraps through ``flow.inverse(z0)``, which an IAF computes
    sequentially; :meth:`init_chains` and ``bootstrap_results(
    transformed_init_state=u0)`` avoid it. The kernel never trains the flow.

    Args:
      target: a :class:`neutra_flows.Target` (anything with
        ``unnormalized_log_prob`` on ``[..., d]``, ``event_size`` and ``dtype``).
      flow: a trained ``tfb.Bijector`` mapping base ``[..., d]`` to the target's
        unconstrained ``[..., d]`` with an exact log-det.
      kernel: ``"hmc"`` or ``"nuts"``.
      num_adaptation_steps: steps (counted from bootstrap) during which the step
        size, and for HMC without ``num_leapfrog_steps`` the trajectory length,
        are adapted; both are frozen afterwards. Use the number of burn-in steps.
      step_size: initial step size; default ``0.5 d^(-1/4)``.
      num_leapfrog_steps: HMC only. A fixed leapfrog count, or ``None`` (default)
        to adapt the trajectory length with ChEES (needs >= 2 chains): it starts
        at ``init_trajectory_length`` and, once adaptation ends, stays at its
        averaged value, each transition using a (Halton-)jittered fraction of it.
      target_accept_prob: dual-averaging target for the mean acceptance
        probability over chains; default 0.8.
      max_tree_depth: NUTS only: at most ``2**max_tree_depth - 1`` leapfrog steps.
      init_trajectory_length: HMC with ChEES: the starting trajectory length in
        the whitened latent space (a standard normal's Hamiltonian flow has
        period ``2 pi``; ChEES usually settles between 1 and 2 units).
      max_leapfrog_steps: HMC with ChEES: a cap on leapfrog steps per transition.
      independence_steps: after the ``num_adaptation_steps``, follow each
        NeuTra transition with this many independence Metropolis-Hastings
        transitions that propose fresh draws ``f(u')``, ``u' ~ N(0, I)``, from the
        flow (one density evaluation each, no gradient; see
        :mod:`neutra_flows.independence`). The results are then
        :class:`~neutra_flows.independence.NeuTraIndependenceResults`. Default 0: off.
      name: a name for the ops.
    """

    def __init__(
        self,
        target: Any,
        flow: tfb.Bijector,
        *,
        kernel: str = "hmc",
        num_adaptation_steps: int,
        step_size: float | None = None,
        num_leapfrog_steps: int | None = None,
        target_accept_prob: float | None = None,
        max_tree_depth: int = 10,
        init_trajectory_length: float = 1.0,
        max_leapfrog_steps: int = 1000,
        independence_steps: int = 0,
        name: str | None = None,
    ):
        _check_target(target)
        independence_steps = check_positive_int(independence_steps, "independence_steps", minimum=0)
        kind = _check_kernel_name(kernel)
        num_adaptation_steps = check_positive_int(num_adaptation_steps, "num_adaptation_steps", minimum=0)
        max_tree_depth = check_positive_int(max_tree_depth, "max_tree_depth")
        max_leapfrog_steps = check_positive_int(max_leapfrog_steps, "max_leapfrog_steps")
        if num_leapfrog_steps is not None:
            num_leapfrog_steps = check_positive_int(num_leapfrog_steps, "num_leapfrog_steps")
        _check_flow(flow, target)
        d = int(target.event_size)
        dtype = target.dtype
        step_size = _step_size(step_size)
        step_size = _default_step_size(d) if step_size is None else step_size
        target_accept_prob = _target_accept_prob(target_accept_prob)
        init_trajectory_length = float(init_trajectory_length)
        if not (math.isfinite(init_trajectory_length) and init_trajectory_length > 0):
            raise ValueError(f"init_trajectory_length must be positive, got {init_trajectory_length}")

        self._parameters = dict(
            target=target,
            flow=flow,
            kernel=kind,
            num_adaptation_steps=num_adaptation_steps,
            step_size=step_size,
            num_leapfrog_steps=num_leapfrog_steps,
            target_accept_prob=target_accept_prob,
            max_tree_depth=max_tree_depth,
            init_trajectory_length=init_trajectory_length,
            max_leapfrog_steps=max_leapfrog_steps,
            independence_steps=independence_steps,
            name=name or "neutra_kernel",
        )
        # A diagonal scale in front of the flow (z = f(s * v)): the latent-space
        # mass matrix that `sample` adapts during warm-up to absorb scale the flow
        # missed. At s = 1 it changes no bit of the draws.
        self._latent_scale = tf.Variable(tf.ones([d], dtype), trainable=False, name="latent_scale")
        self._bijector = tfb.Chain([flow, tfb.Scale(self._latent_scale)])
        self._kernel = self._kernel_stack(None)
        self._uses_chees = kind == "hmc" and num_leapfrog_steps is None

    def _kernel_stack(self, reduce_chain_axis_names):
        """The TFP stack; with axis names its cross-chain means are all-reduced across replicas."""
        p = self._parameters
        kind, step_size, num_leapfrog_steps = p["kernel"], p["step_size"], p["num_leapfrog_steps"]
        num_adaptation_steps = p["num_adaptation_steps"]
        dtype = p["target"].dtype
        eps = tf.constant(step_size, dtype)
        log_prob = p["target"].unnormalized_log_prob
        if kind == "nuts":
            inner = tfp.mcmc.NoUTurnSampler(log_prob, step_size=eps, max_tree_depth=p["max_tree_depth"])
        elif num_leapfrog_steps is not None:
            inner = tfp.mcmc.HamiltonianMonteCarlo(log_prob, eps, num_leapfrog_steps)
        else:
            inner = tfp.mcmc.HamiltonianMonteCarlo(
                log_prob, eps, max(1, math.ceil(p["init_trajectory_length"] / step_size))
            )
            inner = tfp.experimental.mcmc.GradientBasedTrajectoryLengthAdaptation(
                inner,
                num_adaptation_steps=num_adaptation_steps,
                max_leapfrog_steps=p["max_leapfrog_steps"],
                experimental_reduce_chain_axis_names=reduce_chain_axis_names,
            )
        transformed = tfp.mcmc.TransformedTransitionKernel(inner, bijector=self._bijector)
        return tfp.mcmc.DualAveragingStepSizeAdaptation(
            transformed,
            num_adaptation_steps=num_adaptation_steps,
            target_accept_prob=tf.constant(p["target_accept_prob"], dtype),
            experimental_reduce_chain_axis_names=reduce_chain_axis_names,
            **({} if reduce_chain_axis_names is None else {"reduce_fn": _all_gathered_log_mean_exp}),
        )


    @property
    def parameters(self) -> dict:
        return self._parameters

    @property
    def target(self) -> Any:
        return self._parameters["target"]

    @property
    def flow(self) -> tfb.Bijector:
        return self._parameters["flow"]

    @property
    def kernel(self) -> str:
        """``"hmc"`` or ``"nuts"``."""
        return self._parameters["kernel"]

    @property
    def num_adaptation_steps(self) -> int:
        return self._parameters["num_adaptation_steps"]

    @property
    def uses_chees(self) -> bool:
        """True for HMC whose trajectory length is adapted by ChEES."""
        return self._uses_chees

    @property
    def independence_steps(self) -> int:
        """Independence proposals after each NeuTra transition once adaptation ends (0: none)."""
        return self._parameters["independence_steps"]

    @property
    def inner_kernel(self) -> tfp.mcmc.TransitionKernel:
        """The TFP kernel stack this kernel delegates to (dual averaging outermost)."""
        return self._kernel

    @property
    def latent_scale(self) -> tf.Variable:
        """``s`` ``[d]``: the sampler moves ``v`` with ``z = flow(s * v)`` (ones by default)."""
        return self._latent_scale

    def rescale_latent(self, results: Any, new_scale: Any) -> Any:
        """Sets :attr:`latent_scale` to ``new_scale`` and returns results for the same ``z``.

        The chains keep their points (``v`` is rescaled so that ``s * v`` is
        unchanged); the target and its gradient are re-evaluated in the new
        latent space; the step-size and ChEES adaptation keep their state.
        """
        old = tf.convert_to_tensor(self._latent_scale)
        new = tf.convert_to_tensor(new_scale, old.dtype)
        self._latent_scale.assign(new)
        return self._rebootstrap(results, old / new)

    def refresh(self, results: Any, state: Any) -> Any:
        """Results for the chains at ``z = state`` after the flow's weights changed.

        The points are pulled back through the new flow (``flow.inverse``), the
        target and its gradient re-evaluated there; the step-size and ChEES
        adaptation keep their state.

        Raises:
          ValueError: the new flow's pulled-back density or its gradient is not
            finite at some chain's point (the caller keeps the old flow).
        """
        # A new tensor: the bijector cache must not hand back the old flow's pull-back.
        state = tf.identity(tf.convert_to_tensor(state, self.target.dtype))
        fresh = self._rebootstrap(results, init_state=state)
        _check_sampler_start(fresh)
        return fresh

    def _rebootstrap(self, results: Any, ratio: Any = None, init_state: Any = None) -> Any:
        """Results for the same ``z`` after the latent scale was divided by ``ratio``
        (or, given ``init_state``, after the flow changed)."""
        if self.independence_steps:
            stack = self._rebootstrap_stack(results.inner_results, ratio, init_state)
            return results._replace(inner_results=stack)
        return self._rebootstrap_stack(results, ratio, init_state)

    def _rebootstrap_stack(self, results: Any, ratio: Any, init_state: Any) -> Any:
        transformed = results.inner_results
        if init_state is not None:
            fresh = self._kernel.inner_kernel.bootstrap_results(init_state=init_state)
        else:
            fresh = self._kernel.inner_kernel.bootstrap_results(
                transformed_init_state=transformed.transformed_state * ratio)
        if self._uses_chees:
            chees = transformed.inner_results
            hmc = fresh.inner_results.inner_results
            fresh = fresh._replace(inner_results=chees._replace(inner_results=hmc))
        return results._replace(inner_results=fresh)

    @property
    def is_calibrated(self) -> bool:
        return True

    def one_step(self, current_state, previous_kernel_results, seed=None):
        """One transition; ``current_state`` is ``z`` ``[..., d]`` (its ``u`` is in the results)."""
        with tf.name_scope(self._parameters["name"]):
            if not self.independence_steps:
                return self._kernel.one_step(current_state, previous_kernel_results, seed=seed)
            return self._mixed_step(current_state, previous_kernel_results, seed)

    def _latent_log_prob(self, v):
        # The transformed kernel's own pulled-back density, so the weights and the
        # NeuTra steps agree on it to the bit.
        return unnest.get_innermost(self._kernel, "target_log_prob_fn")(v)

    def _mixed_step(self, z, results, seed):
        """A NeuTra transition or an independence proposal, by the cycle's schedule."""
        step_seed, proposal_seed = tfp.random.split_seed(seed, n=2)
        k = self.independence_steps
        propose_now = independence.is_independence_step(results.transition, self.num_adaptation_steps, k)
        no_chain = tf.zeros_like(results.independence_accepted)

        def neutra():
            stack = tf.cond(
                results.stale_gradients,
                lambda: independence.refresh_gradients(results.inner_results, self._latent_log_prob),
                lambda: results.inner_results)
            new_z, stack = self._kernel.one_step(z, stack, seed=step_seed)
            return (new_z, stack, no_chain, tf.zeros_like(results.independence_log_accept_ratio),
                    tf.constant(False), results.stale_gradients)

        def proposal():
            stack = results.inner_results
            v_new, z_new, lp_new, accepted, log_ratio = independence.propose(
                latent_fn=self._latent_log_prob, bijector=self._bijector, latent_scale=self._latent_scale,
                v=unnest.get_innermost(stack, "transformed_state"),
                current_lp=unnest.get_innermost(stack, "target_log_prob"), seed=proposal_seed)
            new_z, stack = independence.move(stack, z, v_new=v_new, z_new=z_new, lp_new=lp_new,
                                             accepted=accepted)
            stale = results.stale_gradients | tf.reduce_any(accepted)
            return new_z, stack, accepted, log_ratio, stale, tf.constant(False)

        new_z, stack, accepted, log_ratio, stale, refreshed = tf.cond(propose_now, proposal, neutra)
        return new_z, independence.NeuTraIndependenceResults(
            inner_results=stack, transition=results.transition + 1, independence_step=propose_now,
            independence_accepted=accepted, independence_log_accept_ratio=log_ratio,
            stale_gradients=stale, refreshed_gradients=refreshed)

    def bootstrap_results(self, init_state=None, transformed_init_state=None):
        """Kernel results for a start at ``z = init_state`` or ``u = transformed_init_state``.

        Give exactly one. ``init_state`` (``[..., d]`` in the target's
        unconstrained space) is pulled back with ``flow.inverse``, which an IAF
        computes sequentially; ``transformed_init_state`` (base draws ``u``) only
        needs ``flow.forward``.
        """
        if (init_state is None) == (transformed_init_state is None):
            raise ValueError("give exactly one of init_state and transformed_init_state")
        with tf.name_scope(self._parameters["name"]):
            dtype = self.target.dtype
            transformed = self._kernel.inner_kernel
            if transformed_init_state is not None:
                u = tf.convert_to_tensor(transformed_init_state, dtype)
                inner = transformed.bootstrap_results(transformed_init_state=u)
            else:
                u = None
                inner = transformed.bootstrap_results(init_state=tf.convert_to_tensor(init_state, dtype))
                u = inner.transformed_state
            if self._uses_chees:
                # ChEES starts its iterate average at 0; with no adaptation steps that
                # would freeze the trajectory at one leapfrog step. The first adaptation
                # step overwrites the average (its weight is 1), so this only matters then.
                chees = inner.inner_results
                inner = inner._replace(
                    inner_results=chees._replace(averaged_max_trajectory_length=chees.max_trajectory_length)
                )
            # Dual averaging only reads shapes from the state; `u` has z's shape.
            stack = self._kernel._bootstrap_from_inner_results(u, inner)
            if not self.independence_steps:
                return stack
            return independence.wrap(stack, unnest.get_innermost(stack, "target_log_prob"))

    def init_chains(self, num_chains: int, *, seed: Any) -> tuple[tf.Tensor, Any]:
        """Independent starts ``z = f(u)``, ``u ~ N(0, I)``, and their kernel results.

        Returns ``(z0 [num_chains, d], kernel_results)``; ``u`` is
        ``tf.random.stateless_normal([num_chains, d], as_seed(seed), dtype)``.
        """
        u, z = self._base_draws(num_chains, seed)
        return z, self.bootstrap_results(transformed_init_state=u)

    def _base_draws(self, num_chains: int, seed: Any) -> tuple[tf.Tensor, tf.Tensor]:
        num_chains = check_positive_int(num_chains, "num_chains")
        u = tf.random.stateless_normal(
            [num_chains, int(self.target.event_size)], seed=as_seed(seed), dtype=self.target.dtype
        )
        return u, self._bijector.forward(u)


# -- the plain baseline ---------------------------------------------------------


class _ListState(tfp.mcmc.TransitionKernel):
    """Presents a one-part list-state kernel (TFP's preconditioned kernels) as `[..., d]`."""

    def __init__(self, inner_kernel, adaptation: str):
        self._parameters = dict(inner_kernel=inner_kernel)
        self.adaptation = adaptation

    @property
    def inner_kernel(self):
        return self._parameters["inner_kernel"]

    @property
    def parameters(self):
        return self._parameters

    @property
    def is_calibrated(self):
        return self.inner_kernel.is_calibrated

    def one_step(self, current_state, previous_kernel_results, seed=None):
        state, results = self.inner_kernel.one_step([current_state], previous_kernel_results, seed=seed)
        return state[0], results

    def bootstrap_results(self, init_state):
        return self.inner_kernel.bootstrap_results([init_state])


def _baseline_kernel(
    target: Any,
    *,
    kind: str,
    num_chains: int,
    num_adaptation_steps: int,
    step_size: float,
    target_accept_prob: float,
    num_leapfrog_steps: int | None,
    max_tree_depth: int,
) -> _ListState:
    """TFP's windowed-adaptive NUTS/HMC on a plain log density (what Stan would run)."""
    d = int(target.event_size)
    dtype = target.dtype
    state_parts = [tf.zeros([num_chains, d], dtype)]
    momentum = preconditioning_utils.make_momentum_distribution(
        state_parts=state_parts, batch_shape=[num_chains]
    )
    proposal = dict(
        target_log_prob_fn=lambda z: target.unnormalized_log_prob(z),
        step_size=tf.constant(step_size, dtype),
        momentum_distribution=momentum,
    )
    if kind == "nuts":
        proposal["max_tree_depth"] = max_tree_depth
    else:
        proposal["num_leapfrog_steps"] = num_leapfrog_steps
    dual_averaging = dict(
        num_adaptation_steps=num_adaptation_steps,
        target_accept_prob=tf.constant(target_accept_prob, dtype),
        # As TFP's windowed_adaptive_nuts: the harmonic mean over chains lets no
        # chain's acceptance collapse while the others look fine.
        reduce_fn=tfp.math.reduce_log_harmonic_mean_exp,
    )
    if num_adaptation_steps >= _MIN_WINDOWED_WARMUP:
        variance = [
            tfp.experimental.stats.RunningVariance.from_stats(
                num_samples=tf.zeros([], dtype), mean=tf.zeros_like(p), variance=tf.ones_like(p)
            )
            for p in state_parts
        ]
        inner = windowed_sampling.make_windowed_adapt_kernel(
            kind=kind,
            proposal_kernel_kwargs=proposal,
            dual_averaging_kwargs=dual_averaging,
            initial_running_variance=variance,
            chain_axis_names=None,
            shard_axis_names=None,
        )
        adaptation = "windowed diagonal mass matrix + dual-averaging step size"
    else:
        inner = windowed_sampling.make_fast_adapt_kernel(
            kind=kind, proposal_kernel_kwargs=proposal, dual_averaging_kwargs=dual_averaging
        )
        adaptation = (
            "dual-averaging step size only (windowed mass-matrix adaptation needs "
            f"num_warmup >= {_MIN_WINDOWED_WARMUP})"
            if num_adaptation_steps
            else "none"
        )
    return _ListState(inner, adaptation)


# -- per-draw statistics ----------------------------------------------------------


def _core_results(results):
    """The innermost results: NUTS results, or HMC's Metropolis-Hastings results."""
    while hasattr(results, "inner_results"):
        results = results.inner_results
    return results


def _per_chain(x, like):
    x = tf.nest.flatten(x)[0]
    return tf.broadcast_to(tf.cast(x, like.dtype), tf.shape(like))


def _kinetic_energy(momentum, results, chain_ndims):
    parts = tf.nest.flatten(momentum)
    distribution = unnest.get_innermost(results, "momentum_distribution", default=None)
    if distribution is None:
        return sum(0.5 * tf.reduce_sum(tf.square(p), axis=tf.range(chain_ndims, tf.rank(p))) for p in parts)
    zeros = tf.nest.map_structure(tf.zeros_like, momentum)
    return distribution.log_prob(zeros) - distribution.log_prob(momentum)


def _draw_stats(results) -> dict[str, tf.Tensor]:
    """Per-chain statistics of the transition that produced `results`."""
    if isinstance(results, independence.NeuTraIndependenceResults):
        return _mixed_stats(results)
    return _transition_stats(results)


def _mixed_stats(results) -> dict[str, tf.Tensor]:
    """An independence proposal's statistics where it made the transition, NeuTra's elsewhere.

    A proposal takes no leapfrog step and has no Hamiltonian (``energy`` is NaN
    there); ``gradient_refreshes`` counts the gradients re-evaluated before a
    NeuTra step that follows accepted proposals (summed into the gradient count,
    never buffered).
    """
    stats = _transition_stats(results.inner_results)
    lar = results.independence_log_accept_ratio
    here = tf.broadcast_to(results.independence_step, tf.shape(lar))
    replaced = dict(
        diverging=tf.zeros_like(stats["diverging"]),
        acceptance_rate=tf.exp(lar),
        n_steps=tf.zeros_like(stats["n_steps"]),
        energy=tf.fill(tf.shape(lar), tf.constant(np.nan, lar.dtype)),
        tree_depth=tf.zeros_like(stats.get("tree_depth", stats["n_steps"])),
    )
    for key, value in replaced.items():
        if key in stats:
            stats[key] = tf.where(here, tf.cast(value, stats[key].dtype), stats[key])
    stats["independence_accepted"] = results.independence_accepted
    stats["gradient_refreshes"] = tf.broadcast_to(tf.cast(results.refreshed_gradients, tf.int32), tf.shape(lar))
    return stats


def _transition_stats(results) -> dict[str, tf.Tensor]:
    core = _core_results(results)
    if hasattr(core, "leapfrogs_taken"):  # NUTS
        lar = core.log_accept_ratio
        n_steps = tf.cast(core.leapfrogs_taken, tf.int32)
        depth = tf.cast(
            tf.floor(tf.math.log(tf.cast(tf.maximum(n_steps, 1), lar.dtype)) / math.log(2.0)),
            tf.int32,
        ) + tf.cast(n_steps > 0, tf.int32)
        return dict(
            diverging=tf.convert_to_tensor(core.has_divergence),
            acceptance_rate=tf.where(tf.math.is_nan(lar), tf.zeros_like(lar), tf.exp(lar)),
            step_size=_per_chain(core.step_size, lar),
            n_steps=n_steps,
            energy=-core.energy,
            tree_depth=depth,
        )
    lar = core.log_accept_ratio
    proposed, accepted = core.proposed_results, core.accepted_results
    chain_ndims = tf.rank(lar)
    kinetic_final = _kinetic_energy(proposed.final_momentum, proposed, chain_ndims)
    kinetic_initial = _kinetic_energy(proposed.initial_momentum, proposed, chain_ndims)
    energy = -accepted.target_log_prob + tf.where(core.is_accepted, kinetic_final, kinetic_initial)
    safe = tf.where(tf.math.is_nan(lar), tf.constant(-np.inf, lar.dtype), lar)
    return dict(
        diverging=~(lar > -_DIVERGENCE_ENERGY),
        acceptance_rate=tf.exp(tf.minimum(safe, 0.0)),
        step_size=_per_chain(proposed.step_size, lar),
        n_steps=tf.broadcast_to(tf.cast(proposed.num_leapfrog_steps, tf.int32), tf.shape(lar)),
        energy=energy,
    )


# -- the compiled loop ---------------------------------------------------------------


def _latent_state(results):
    """NeuTra's latent state ``v`` (``z = flow(s * v)``), None for the baseline."""
    return unnest.get_innermost(results, "transformed_state", default=None)


def _latent_gradient(results):
    """The gradient of NeuTra's pulled-back log density at the chains' latent state
    ``v``, which the sampler has already computed (the flow adaptation turns it into
    the target's gradient at no extra evaluation); None for the baseline."""
    if _latent_state(results) is None:
        return None
    return tf.nest.flatten(unnest.get_innermost(results, "grads_target_log_prob"))[0]


def _make_advance(kernel, buffer_size: int, jit_compile: bool, shard: tuple[int, int] | None = None,
                  latent_gradient: bool = False):
    """One compiled function `advance(state, results, seed, n, thin)` running `n` transitions.

    `n` and `thin` are tensors, so warm-up and sampling chunks of any length
    share one compilation. The seed is carried exactly as `tfp.mcmc.sample_chain`
    carries it (split once per step, the first half to the kernel), so chunked
    runs reproduce one long run and `sample_chain` itself. Step `i` writes its
    state and statistics to row `(i // thin) mod buffer_size` of fixed-size
    buffers (static shapes for XLA), so with `n` a multiple of `thin` row `j`
    holds step `j * thin + thin - 1`; the caller reads them only when
    `n <= buffer_size * thin`. With `shard = (local, total)` the function takes
    a last argument `offset` and runs chains `offset ... offset + local - 1` of
    `total`, each drawing what it would draw in one batch of `total` chains.
    With `latent_gradient` (NeuTra only) the buffers also hold the sampler's
    gradient of the pulled-back density at each state (`latent_grad`), which the
    flow adaptation reads.
    """

    def advance(state, results, seed, num_steps, thin, offset=None):
        if shard is None:
            return _advance_body(state, results, seed, num_steps, thin)
        from neutra_flows._distribute import chain_shard

        with chain_shard(shard[0], shard[1], offset):
            return _advance_body(state, results, seed, num_steps, thin)

    def _advance_body(state, results, seed, num_steps, thin):
        stats0 = _draw_stats(results)
        stats0.pop("gradient_refreshes", None)
        buffers = dict(
            z=tf.zeros([buffer_size] + state.shape.as_list(), state.dtype),
            **{k: tf.zeros([buffer_size] + v.shape.as_list(), v.dtype) for k, v in stats0.items()},
        )
        if _latent_state(results) is not None:
            buffers["v"] = tf.zeros([buffer_size] + state.shape.as_list(), state.dtype)
            if latent_gradient:
                buffers["latent_grad"] = tf.zeros([buffer_size] + state.shape.as_list(), state.dtype)
        zero = tf.zeros([], tf.int64)

        def body(i, state, results, seed, grads, divs, buffers):
            step_seed, seed = tf.unstack(tfp.random.split_seed(seed, n=2))
            state, results = kernel.one_step(state, results, seed=step_seed)
            stats = _draw_stats(results)
            grads += tf.reduce_sum(tf.cast(stats["n_steps"], tf.int64))
            grads += tf.reduce_sum(tf.cast(stats.pop("gradient_refreshes", 0), tf.int64))
            divs += tf.reduce_sum(tf.cast(stats["diverging"], tf.int64))
            index = [[tf.math.floormod(i // thin, buffer_size)]]
            values = dict(z=state, v=_latent_state(results), latent_grad=_latent_gradient(results), **stats)
            buffers = {
                k: tf.tensor_scatter_nd_update(buffers[k], index, values[k][tf.newaxis]) for k in buffers
            }
            return i + 1, state, results, seed, grads, divs, buffers

        _, state, results, seed, grads, divs, buffers = tf.while_loop(
            lambda i, *_: i < num_steps,
            body,
            (tf.zeros([], tf.int32), state, results, seed, zero, zero, buffers),
        )
        return state, results, seed, grads, divs, buffers

    return tf.function(advance, jit_compile=jit_compile, autograph=False)


# Compiling the loop costs seconds (NUTS inside a flow: ~5-20 s on a laptop CPU),
# so repeated `sample` calls with the same target, flow and settings (another
# seed, a longer run) reuse the kernel and its compiled loop. Entries hold the
# target and flow alive, which keeps their ids in the keys unambiguous.
_CACHE_SIZE = 4
_CACHE: OrderedDict[tuple, dict[str, Any]] = OrderedDict()


def _cache_entry(key: tuple) -> dict[str, Any] | None:
    entry = _CACHE.get(key)
    if entry is not None:
        _CACHE.move_to_end(key)
    return entry


def _cached_kernel(key: tuple, build, strategy=None) -> tfp.mcmc.TransitionKernel:
    entry = _cache_entry(key)
    if entry is None:
        from neutra_flows._distribute import scope

        # Under a strategy the kernel's latent-scale variable is mirrored to the replicas.
        with scope(strategy):
            entry = dict(kernel=build(), advance={})
        _CACHE[key] = entry
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return entry["kernel"]


def _cached_advance(kernel_key: tuple, variant: tuple, kernel, build) -> Any:
    """``build()``'s compiled loop, cached beside ``kernel`` under ``variant`` (its buffer
    size and compile options)."""
    entry = _cache_entry(kernel_key)
    if entry is None or entry["kernel"] is not kernel:
        return build()
    if variant not in entry["advance"]:
        entry["advance"][variant] = build()
    return entry["advance"][variant]


# Per kept draw: z and the named draws (d each) and up to 7 statistics.
_TRACE_STATS = 7


def _check_trace_size(num_chains: int, num_samples: int, thin: int, d: int, dtype, max_trace_bytes) -> None:
    """Raises ValueError when the kept trace would exceed ``max_trace_bytes``."""
    if num_samples % thin:
        raise ValueError(
            f"num_samples ({num_samples}) must be a multiple of thin ({thin}): thin={thin} keeps "
            f"every {thin}-th of the num_samples transitions"
        )
    if max_trace_bytes is None:
        return
    if isinstance(max_trace_bytes, (bool, np.bool_)) or not isinstance(max_trace_bytes, (int, np.integer)) \
            or max_trace_bytes < 1:
        raise ValueError(f"max_trace_bytes must be a positive int (bytes) or None (no limit), got "
                         f"{max_trace_bytes!r}")
    kept, itemsize = num_samples // thin, tf.as_dtype(dtype).size
    per_draw = num_chains * (2 * d + _TRACE_STATS) * itemsize
    size = kept * per_draw
    if size <= max_trace_bytes:
        return
    fits = int(max_trace_bytes) // per_draw  # kept draws per chain within the limit
    if fits >= 1:
        # The smallest thin that divides num_samples and keeps at most `fits` draws.
        suggestion = min(t for t in _divisors(num_samples) if num_samples // t <= fits)
        advice = (f"Keep fewer draws (thin={suggestion} keeps {num_samples // suggestion} per chain; or "
                  "fewer num_samples or chains) or raise max_trace_bytes")
    else:
        advice = (f"Even one kept draw per chain takes {_bytes(per_draw)}: run fewer chains or raise "
                  "max_trace_bytes")
    raise ValueError(
        f"the trace would take about {_bytes(size)} ({num_chains} chains x {kept} kept draws x "
        f"(2 x {d} values + {_TRACE_STATS} statistics) x {itemsize} bytes), above "
        f"max_trace_bytes = {_bytes(max_trace_bytes)}. {advice} (None disables the check)"
    )


def _divisors(n: int) -> list[int]:
    small = [k for k in range(1, math.isqrt(n) + 1) if n % k == 0]
    return sorted(set(small + [n // k for k in small]))


def _bytes(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} bytes"


def _chunks(total: int, size: int) -> list[int]:
    return [min(size, total - start) for start in range(0, total, size)] if total else []


# -- the driver -------------------------------------------------------------------


def _as_flow(flow: Any) -> tuple[tfb.Bijector | None, float | None]:
    if flow is None:
        return None, None
    if hasattr(flow, "flow") and hasattr(flow, "wall_time"):
        return flow.flow, float(flow.wall_time)
    return flow, None


def _check_start(target: Any, z: np.ndarray, what: str) -> None:
    if not np.all(np.isfinite(z)):
        bad = int(np.argmax(~np.all(np.isfinite(z), axis=-1)))
        raise ValueError(f"{what}: chain {bad} starts at a non-finite point {z[bad].tolist()}")
    lp = np.asarray(target.unnormalized_log_prob(z))
    if not np.all(np.isfinite(lp)):
        bad = int(np.argmax(~np.isfinite(lp)))
        raise ValueError(
            f"{what}: the target's log density is {lp[bad]} at the starting point of chain "
            f"{bad}, z = {np.array2string(z[bad], precision=4, threshold=12)}; every chain must "
            "start where the density is finite"
        )


def _check_draws_lp(lp: np.ndarray, z: np.ndarray, target_name: str) -> None:
    """Raises when a kept draw has log density +inf or NaN.

    +inf (a singularity of the density) attracts the chains, which then stay
    there with every later transition divergent: the draws are meaningless, and
    a divergence warning alone does not say why. ``-inf`` cannot be accepted by
    the sampler and never appears here.
    """
    bad = np.isnan(lp) | (lp == np.inf)
    if not bad.any():
        return
    chain, draw = np.unravel_index(int(np.argmax(bad)), lp.shape)
    what = "NaN" if np.isnan(lp[chain, draw]) else "+inf"
    point = np.array2string(z[chain, draw], precision=4, threshold=12)
    raise ValueError(
        f"{target_name}: the log density is {what} at {int(bad.sum())} of {bad.size} kept draws "
        f"(first: chain {chain}, draw {draw}, z = {point}); "
        "the chains were drawn into a point where the density is not a finite number, so the draws "
        "are meaningless. A log density must be finite or -inf everywhere: fix log_prob_fn "
        "(or its constraining bijector) there."
    )


def _ground_truth_json(target: Any) -> str | None:
    mean = getattr(target, "ground_truth_mean", None)
    std = getattr(target, "ground_truth_std", None)
    if mean is None and std is None:
        return None

    return truth_json(mean, std, getattr(target, "ground_truth_mean_se", None))


def sample(
    target: Any,
    flow: Any = None,
    *,
    kernel: str = "nuts",
    num_chains: int = 4,
    num_warmup: int = 1000,
    num_samples: int = 1000,
    seed: Any,
    step_size: float | None = None,
    target_accept_prob: float | None = None,
    num_leapfrog_steps: int | None = None,
    max_tree_depth: int = 10,
    init_state: Any = None,
    progress: bool = True,
    jit_compile: bool = True,
    adapt_latent_scale: bool = True,
    adapt_flow: bool | FlowAdaptation = False,
    thin: int = 1,
    max_trace_bytes: int | None = 4 * 2**30,
    strategy: tf.distribute.Strategy | None = None,
    return_flow: bool = False,
    independence_steps: int = 0,
) -> Any:
    """Samples ``target`` with NeuTra (given a ``flow``) or with the plain baseline.

    Args:
      target: a :class:`neutra_flows.Target` (``d = target.event_size``).
      flow: a trained flow (``tfb.Bijector``, base ``[..., d]`` to unconstrained
        ``[..., d]``), a ``FitResult`` (its ``.flow`` and ``.wall_time`` are used),
        or ``None`` for the baseline: TFP's preconditioned NUTS/HMC with
        Stan-style windowed adaptation of a diagonal mass matrix and the step
        size (only the step size when ``num_warmup < 20``).
      kernel: ``"nuts"`` or ``"hmc"``.
      num_chains: chains, run vectorised. ChEES (HMC without
        ``num_leapfrog_steps``) needs at least 2.
      num_warmup: adaptation steps, discarded.
      num_samples: draws kept per chain.
      seed: an int or a stateless seed; same seed, same draws (for a given
        ``jit_compile``: XLA's stateless random numbers differ from graph mode's).
      step_size: initial step size (default ``0.5 d^(-1/4)``), adapted during warm-up.
      target_accept_prob: dual-averaging target (mean acceptance over chains;
        default 0.8; for the baseline the harmonic mean, as in TFP).
      num_leapfrog_steps: HMC only. ``None``: NeuTra adapts the trajectory length
        with ChEES (see :class:`NeuTraKernel`); the baseline HMC needs a count.
      max_tree_depth: NUTS only.
      init_state: optional ``[num_chains, d]`` starts in the target's
        unconstrained space. Default: NeuTra pushes independent base draws
        ``u ~ N(0, I)`` through the flow (no inverse); the baseline draws
        ``Uniform(-2, 2)^d`` like Stan. NeuTra pulls a given ``init_state`` back
        with ``flow.inverse`` once.
      progress: a tqdm bar over chunks of the compiled loop.
      jit_compile: XLA-compile the loop (``tf.function(jit_compile=True)``), and
        with flow adaptation its start's ``fit`` and its refits.
      flow: ... or ``"adapt"``: a fresh flow (RealNVP by default) trained on the
        chains' own draws during the warm-up; see ``adapt_flow``.
      adapt_flow: ``True`` or a :class:`~neutra_flows.adaptation.FlowAdaptation`
        (its settings): during the warm-up, at a few window ends, refit the flow
        on the chains' draws and the target's gradients there (Fisher divergence
        in latent space, or maximum likelihood), keep a refit only when held-out
        draws say it is better, and freeze it for sampling. Needs a flow with a
        fast inverse (realnvp, nsf, maf, affine, lu_linear). The gradients spent
        on the refits are counted in ``num_grad_evals_training``; the refits are
        listed in the attrs (``flow_refits``). ``flow="adapt"`` implies it.
      adapt_latent_scale: NeuTra only, ``num_warmup >= 100``: after half of the
        warm-up, set a diagonal scale in the flow's latent space (a diagonal
        mass matrix, :attr:`NeuTraKernel.latent_scale`) to the standard deviation
        of the chains' latent draws over the second quarter of the warm-up, with
        Stan's regularisation; step size and trajectory length go on adapting
        for the second half. It absorbs scale the flow missed (a reverse-KL fit
        is often too narrow).
      thin: keep every ``thin``-th of the ``num_samples`` post-warm-up transitions
        (``num_samples`` must be a multiple of it); the trace then has
        ``num_samples // thin`` draws per chain, and only those are ever buffered.
      max_trace_bytes: refuse (``ValueError`` with the estimate) a run whose kept
        trace, ``num_chains x num_samples / thin x (2 d + 7) x itemsize`` bytes
        (``z``, the named draws and the statistics), would exceed this; default
        4 GiB, ``None`` disables the check.
      strategy: a ``tf.distribute.Strategy`` (``MirroredStrategy`` for several
        devices, ``MultiWorkerMirroredStrategy`` for several machines); NeuTra
        only. The chains are split evenly across its replicas (``num_chains``
        must be a multiple of ``strategy.num_replicas_in_sync``) and the flow's
        variables must have been created in ``strategy.scope()``. Each chain
        consumes the random numbers it would in one batch, so the draws match one
        device's (bit for bit with one replica, up to rounding with several); the
        step-size and ChEES means cover all replicas' chains.
        The warm-up runs one dispatched transition per step (TensorFlow cannot
        all-reduce inside a compiled loop on CPUs); sampling runs in compiled
        chunks without communication. Every worker returns the whole trace.
        See docs/distributed.md.
      return_flow: also return the flow NeuTra sampled with (``None`` for the
        baseline): with ``flow="adapt"`` the one built, adapted and frozen here
        (an IAF trained by ``fit`` where ``FlowAdaptation.fit_above_dims``
        applies), to save with :func:`~neutra_flows.save_flow` or reuse.

      independence_steps: NeuTra only: after the warm-up, follow each NeuTra
        transition with this many independence Metropolis-Hastings transitions
        proposing fresh draws from the (frozen) flow, one density evaluation
        and no gradient each; every transition is a draw (see
        :mod:`neutra_flows.independence`). It pays where the flow is close to the
        target (PSIS k-hat below about 0.5); the attrs
        ``independence_acceptance_rate`` and ``num_density_evals_sampling`` say
        what it did, and ``sample_stats.independence_accepted`` marks the
        accepted proposals. Default 0: off.

    Returns:
      ``arviz.InferenceData`` with ``posterior``, ``sample_stats`` and attrs as
      described in the module docstring; ``(idata, flow)`` with ``return_flow``.

    Raises:
      ValueError: on a bad argument, a flow whose event size differs from the
        target's, a start (given or drawn) where the point or the target's
        log density is not finite, or (flow adaptation) a start whose short
        ``fit`` gave up on non-finite losses. ``max_trace_bytes`` and
        ``init_state`` are checked before any flow is built or trained.

    The seed is used as ``init_seed, run_seed = split_seed(seed)``: the starts come
    from ``init_seed`` (``NeuTraKernel.init_chains(num_chains, seed=init_seed)``
    for NeuTra) and the transitions consume ``run_seed`` exactly as
    ``tfp.mcmc.sample_chain(num_samples, ..., num_burnin_steps=num_warmup,
    seed=run_seed)`` would with a ``NeuTraKernel(num_adaptation_steps=num_warmup)``.
    """
    called = time.perf_counter()
    settings = _Settings.check(
        target, kernel=kernel, num_chains=num_chains, num_warmup=num_warmup, num_samples=num_samples,
        seed=seed, step_size=step_size, target_accept_prob=target_accept_prob,
        num_leapfrog_steps=num_leapfrog_steps, max_tree_depth=max_tree_depth, thin=thin,
        jit_compile=jit_compile, progress=progress, strategy=strategy, independence_steps=independence_steps,
        has_flow=flow is not None)
    # Checked before the flow is resolved: flow="adapt" spends seconds on its start.
    _check_trace_size(num_chains, num_samples, settings.thin, int(target.event_size), target.dtype,
                      max_trace_bytes)
    z_given = _given_start(target, init_state, num_chains)
    bijector, training_time, adapter = _resolve_flow(target, flow, adapt_flow, settings)
    if strategy is not None:
        _check_sharding(strategy, bijector, num_chains)
    if bijector is None:
        plan = _baseline_plan(target, settings, z_given)
    else:
        plan = _neutra_plan(target, bijector, settings, z_given, adapt_latent_scale, adapter)
    _check_sampler_start(plan.results)
    run = _run(plan, settings)
    idata = _assemble(plan, settings, run, flow, training_time, called=called, adapter=adapter)
    return (idata, bijector) if return_flow else idata


@dataclass(frozen=True)
class _Settings:
    """The checked arguments every phase of :func:`sample` reads."""

    kind: str
    num_chains: int
    num_warmup: int
    num_samples: int
    seed: Any
    init_seed: Any
    run_seed: Any
    step_size: float | None
    target_accept_prob: float
    num_leapfrog_steps: int | None
    max_tree_depth: int
    thin: int
    jit_compile: bool
    progress: bool
    strategy: Any
    independence_steps: int = 0

    @classmethod
    def check(cls, target, *, kernel, num_chains, num_warmup, num_samples, seed, step_size, target_accept_prob,
              num_leapfrog_steps, max_tree_depth, thin, jit_compile, progress, strategy,
              independence_steps=0, has_flow=True) -> _Settings:
        _check_target(target)
        independence_steps = check_positive_int(independence_steps, "independence_steps", minimum=0)
        if independence_steps and not has_flow:
            raise ValueError("independence_steps proposes draws from a flow, and the baseline (flow=None) "
                             "has none; pass a flow, a FitResult or flow='adapt', or independence_steps=0")
        if independence_steps and strategy is not None:
            raise ValueError("independence_steps does not support a distribution strategy yet; "
                             "pass strategy=None or independence_steps=0")
        if num_leapfrog_steps is not None:
            num_leapfrog_steps = check_positive_int(num_leapfrog_steps, "num_leapfrog_steps")
        if seed is None:
            raise ValueError("sample needs a seed (an int or a pair of ints)")
        init_seed, run_seed = split_seed(as_seed(seed))
        return cls(
            kind=_check_kernel_name(kernel),
            num_chains=check_positive_int(num_chains, "num_chains"),
            num_warmup=check_positive_int(num_warmup, "num_warmup", minimum=0),
            num_samples=check_positive_int(num_samples, "num_samples"),
            seed=seed, init_seed=init_seed, run_seed=run_seed, step_size=_step_size(step_size),
            target_accept_prob=_target_accept_prob(target_accept_prob),
            num_leapfrog_steps=num_leapfrog_steps,
            max_tree_depth=check_positive_int(max_tree_depth, "max_tree_depth"),
            thin=check_positive_int(thin, "thin"),
            jit_compile=bool(jit_compile), progress=progress, strategy=strategy,
            independence_steps=independence_steps,
        )

    def cache_key(self, target, bijector) -> tuple:
        """Everything the compiled graph bakes in; the cache holds the objects, so ids stay unique."""
        return (
            id(target), None if bijector is None else id(bijector), self.kind, self.num_chains,
            self.num_warmup, self.step_size, float(self.target_accept_prob), self.num_leapfrog_steps,
            self.max_tree_depth, None if self.strategy is None else id(self.strategy), self.independence_steps,
        )


@dataclass
class _Plan:
    """A kernel at its start, and what the run and the report need to know about it."""

    target: Any
    bijector: Any
    kernel: Any
    z0: Any
    u0: Any
    results: Any
    sampler: str
    flow_name: str
    adaptation: str
    cache_key: tuple
    hooks: list = field(default_factory=list)


def _resolve_flow(target, flow, adapt_flow, settings):
    """``(bijector or None, training seconds or None, FlowAdapter or None)`` from ``sample``'s flow."""
    wants_adapt = isinstance(flow, str) or adapt_flow is not False
    if isinstance(flow, str) and flow != "adapt":
        raise ValueError(f"flow must be a flow, a FitResult, None or 'adapt', got the string {flow!r}")
    if not wants_adapt:
        return (*_as_flow(flow), None)
    if settings.strategy is not None:
        raise ValueError("adapting the flow on the chains' draws (flow='adapt' or adapt_flow) does not "
                         "support a distribution strategy; pass strategy=None")
    config = adapt_flow if isinstance(adapt_flow, FlowAdaptation) else FlowAdaptation()
    bijector, training_time = (None, None) if isinstance(flow, str) else _as_flow(flow)
    if flow is None:
        raise ValueError("adapt_flow needs a flow to refine, or flow='adapt' to start from a fresh one")
    adapter = FlowAdapter(target, bijector, config=config, num_warmup=settings.num_warmup,
                          num_chains=settings.num_chains, seed=settings.init_seed,
                          trained=training_time is not None, jit_compile=settings.jit_compile)
    return adapter.flow, training_time, adapter


def _given_start(target, init_state, num_chains: int) -> np.ndarray | None:
    if init_state is None:
        return None
    d, dtype = int(target.event_size), target.dtype
    z_given = np.asarray(init_state, dtype=dtype.as_numpy_dtype)
    if z_given.shape != (num_chains, d):
        raise ValueError(
            f"init_state must have shape [num_chains, d] = [{num_chains}, {d}], got {z_given.shape}"
        )
    _check_start(target, z_given, "init_state")
    return z_given


def _neutra_plan(target, bijector, s: _Settings, z_given, adapt_latent_scale: bool, adapter) -> _Plan:
    """NeuTra's kernel (cached), its start, and its warm-up hooks."""
    if s.kind == "hmc" and s.num_leapfrog_steps is None and s.num_chains < 2:
        raise ValueError(
            "HMC with an adapted trajectory length (ChEES) needs num_chains >= 2; "
            "pass num_leapfrog_steps or use kernel='nuts'"
        )
    key = s.cache_key(target, bijector)
    kernel = _cached_kernel(
        key,
        lambda: NeuTraKernel(
            target, bijector, kernel=s.kind, num_adaptation_steps=s.num_warmup, step_size=s.step_size,
            num_leapfrog_steps=s.num_leapfrog_steps, target_accept_prob=s.target_accept_prob,
            max_tree_depth=s.max_tree_depth, independence_steps=s.independence_steps,
        ),
        s.strategy,
    )
    # A cached kernel may hold the scale its last run adapted.
    kernel.latent_scale.assign(tf.ones([int(target.event_size)], target.dtype))
    # The starts are checked before bootstrapping (which evaluates gradients)
    # so that a bad start fails fast and with the target's own words.
    if z_given is None:
        u0, z0 = kernel._base_draws(s.num_chains, s.init_seed)
        _check_start(target, z0.numpy(), "starting draws")
        results = kernel.bootstrap_results(transformed_init_state=u0)
    else:
        z0, u0 = tf.constant(z_given), None
        results = kernel.bootstrap_results(init_state=z0)
    adaptation = "dual-averaging step size" + (" + ChEES trajectory length" if kernel.uses_chees else "")
    hooks: list = []
    if adapter is not None:
        hooks.append(adapter)
        if adapter.boundaries:
            adaptation += f" + flow refits on the draws ({adapter.config.objective})"
    latent = _LatentScaleWindow.schedule(s.num_warmup, after=adapter.last_boundary if adapter else 0)
    if adapt_latent_scale and latent is not None:
        hooks.append(latent)
        adaptation += " + latent diagonal scale (one window)"
    if s.independence_steps:
        adaptation += f"; sampling: {s.independence_steps} independence proposals from the flow per NeuTra step"
    return _Plan(target=target, bijector=bijector, kernel=kernel, z0=z0, u0=u0, results=results,
                 sampler=f"NeuTra-{s.kind.upper()}", flow_name=_flow_name(bijector), adaptation=adaptation,
                 cache_key=key, hooks=hooks)


def _adapts_flow(plan: _Plan) -> bool:
    """Whether the run refits its flow on the warm-up draws (an adapter may plan none)."""
    return any(isinstance(hook, FlowAdapter) and hook.boundaries for hook in plan.hooks)


def _baseline_plan(target, s: _Settings, z_given) -> _Plan:
    """The baseline's windowed-adaptation kernel (cached) and its start (Stan's Uniform(-2, 2))."""
    if s.kind == "hmc" and s.num_leapfrog_steps is None:
        raise ValueError("the baseline HMC (flow=None) needs num_leapfrog_steps; or use kernel='nuts'")
    d, dtype = int(target.event_size), target.dtype
    key = s.cache_key(target, None)
    kernel = _cached_kernel(
        key,
        lambda: _baseline_kernel(
            target, kind=s.kind, num_chains=s.num_chains, num_adaptation_steps=s.num_warmup,
            step_size=_default_step_size(d) if s.step_size is None else float(s.step_size),
            target_accept_prob=float(s.target_accept_prob), num_leapfrog_steps=s.num_leapfrog_steps,
            max_tree_depth=s.max_tree_depth,
        ),
    )
    if z_given is None:
        z0 = tf.random.stateless_uniform([s.num_chains, d], seed=s.init_seed, minval=-2.0, maxval=2.0,
                                         dtype=dtype)
        _check_start(target, z0.numpy(), "starting draws")
    else:
        z0 = tf.constant(z_given)
    return _Plan(target=target, bijector=None, kernel=kernel, z0=z0, u0=None,
                 results=kernel.bootstrap_results(z0), sampler=s.kind.upper(), flow_name="none",
                 adaptation=kernel.adaptation, cache_key=key)


@dataclass
class _RunRecord:
    z: np.ndarray
    stats: dict[str, np.ndarray]
    results: Any
    compile_time: float
    warmup_time: float
    sampling_time: float
    grads_warmup: int
    grads_sampling: int
    divs_warmup: int
    divs_sampling: int
    # perf_counter() when compilation began and when the first kept draw was out.
    compile_started: float = math.nan
    first_draw_at: float = math.nan


# Always this many chunks (a few ms of dispatch each), so the progress bar never
# changes the compiled function: progress on or off, same compiled loop, same draws.
_NUM_CHUNKS = 20


def _run(plan: _Plan, s: _Settings) -> _RunRecord:
    """Compiles the chunked loop, then runs the warm-up (with its hooks) and the kept draws."""
    warm_size = max(1, math.ceil(s.num_warmup / _NUM_CHUNKS))
    # A chunk boundary falls at every step where a hook acts.
    stops = sorted({b for hook in plan.hooks for b in hook.boundaries} | {s.num_warmup})
    warm_chunks = [n for lo, hi in zip([0] + stops[:-1], stops, strict=True)
                   for n in _chunks(hi - lo, warm_size)]
    # Sampling chunks hold whole groups of `thin` transitions (one kept draw each).
    sample_size = s.thin * max(1, math.ceil(s.num_samples / s.thin / _NUM_CHUNKS))
    sample_chunks = _chunks(s.num_samples, sample_size)
    buffer_size = max(sample_size // s.thin, warm_size if plan.hooks else 1)
    # The sampler's latent gradients are buffered only for a hook that reads them.
    latent_gradient = _adapts_flow(plan)
    advance = _cached_advance(
        plan.cache_key, (buffer_size, s.jit_compile, latent_gradient), plan.kernel,
        lambda: _make_advance(plan.kernel, buffer_size, s.jit_compile, latent_gradient=latent_gradient))
    loop_seed = tfp.random.sanitize_seed(s.run_seed, salt=_SAMPLE_CHAIN_SALT)
    z0, results = plan.z0, plan.results
    rescale = getattr(plan.kernel, "rescale_latent", None)
    if s.strategy is not None:
        advance = _sharded_chains(s.strategy, plan.kernel, plan.cache_key, s.num_chains, s.num_warmup,
                                  buffer_size, s.jit_compile)
        z0, results = advance.start(z0, plan.u0)
        rescale = advance.rescale_latent

    start = compile_started = time.perf_counter()
    # Compiles (and runs zero steps) so compile time stays out of the phases' times.
    advance(z0, results, loop_seed, tf.constant(0, tf.int32), tf.constant(1, tf.int32))
    compile_time = time.perf_counter() - start

    bar = _progress(s.progress, s.num_warmup + s.num_samples, f"{plan.sampler} warm-up")
    start = time.perf_counter()
    state, results, loop_seed, grads_warmup, divs_warmup = _warm_up(
        advance, z0, results, loop_seed, warm_chunks, plan.hooks, rescale, plan.kernel, bar)
    warmup_time = time.perf_counter() - start
    if bar is not None:
        bar.set_description(f"{plan.sampler} sampling")
    start = time.perf_counter()
    state, results, pieces, grads_sampling, divs_sampling, first_draw_at = _draw(
        advance, state, results, loop_seed, sample_chunks, s.thin, bar)
    sampling_time = time.perf_counter() - start
    if bar is not None:
        bar.close()
    if s.strategy is not None:
        results = advance.local_results(results)
    z, stats = _trace(pieces, plan.target)
    return _RunRecord(z=z, stats=stats, results=results, compile_time=compile_time, warmup_time=warmup_time,
                      sampling_time=sampling_time, grads_warmup=grads_warmup, grads_sampling=grads_sampling,
                      divs_warmup=divs_warmup, divs_sampling=divs_sampling, compile_started=compile_started,
                      first_draw_at=first_draw_at)


def _assemble(plan: _Plan, s: _Settings, run: _RunRecord, flow: Any, training_time, *, called: float,
              adapter: Any = None) -> Any:
    """The InferenceData with its attrs, and the warnings a user must see."""
    import arviz as az  # ~1 s of import time: only when sampling

    assembly_started = time.perf_counter()

    attrs = _attrs(plan, s, run)
    if training_time is not None:
        attrs["flow_training_time"] = training_time
    training_grads = getattr(flow, "num_grad_evals", None)
    if training_grads is not None:
        attrs["num_grad_evals_training"] = int(training_grads)
    for hook in plan.hooks:
        hook.report(attrs)
    target_name = attrs["target"]
    # What the warnings advise depends on where the flow came from.
    run_kind = "baseline" if plan.bijector is None else "adapted" if _adapts_flow(plan) else "neutra"
    _warn_if_divergent(run.divs_sampling, s.num_chains * s.num_samples, plan.sampler, target_name, run_kind)
    idata = az.from_dict(posterior=plan.target.named_draws(run.z), sample_stats=run.stats)
    derived = getattr(plan.target, "derived", None)
    if derived is not None:
        _add_derived(idata, derived, plan.target, run.z, attrs)
    _warn_if_not_converged(idata, plan.sampler, target_name, run_kind)
    # Timed last, so that assembly includes the convergence checks; the attrs are written once.
    attrs.update(_phase_times(run, flow, adapter, called=called, assembly_started=assembly_started))
    for group in (idata.posterior, idata.sample_stats):
        group.attrs.update(attrs)
    return idata


def _add_derived(idata: Any, derived: Any, target: Any, z: np.ndarray, attrs: dict) -> None:
    """The target's derived quantity at the draws, as the group ``derived_posterior``, and its truth
    in the attrs (``derived_ground_truth``), which ``compare`` checks."""
    import arviz as az

    values = derived.draws(target, z)
    group = az.from_dict(posterior=values).posterior
    with warnings.catch_warnings():
        # ArviZ warns that the group is not one of its schema's; it is ours (neutra_flows.derived).
        warnings.simplefilter("ignore", UserWarning)
        idata.add_groups({GROUP: group})
    if derived.has_truth:
        attrs["derived_ground_truth"] = derived.truth_json()


def _phase_times(run: _RunRecord, flow: Any, adapter: Any, *, called: float, assembly_started: float) -> dict:
    """``phase_times`` (JSON, seconds per phase in order), ``time_to_first_draw`` and ``total_time``.

    Both times run from the call to ``sample``, plus a given ``FitResult``'s own
    seconds (the flow's training is part of the user's wait); every compilation
    is in them. ``"set-up"`` is the checks, the kernel and the chains' starts.
    """
    phases: dict[str, float] = {}
    fitted = dict(getattr(flow, "phase_times", None) or {})
    if not fitted and hasattr(flow, "wall_time"):
        fitted = {"training": float(flow.wall_time)}
    before = sum(fitted.values())
    phases.update(fitted)
    start_times = dict(getattr(adapter, "start_times", None) or {})
    for name, seconds in start_times.items():
        phases[name] = phases.get(name, 0.0) + seconds
    refits = float(getattr(adapter, "wall_time", 0.0) or 0.0)
    phases["set-up"] = max(0.0, run.compile_started - called - sum(start_times.values()))
    phases["compilation"] = run.compile_time
    phases["warm-up"] = max(0.0, run.warmup_time - refits)
    if refits:
        phases["refits"] = refits
    phases["sampling"] = run.sampling_time
    end = time.perf_counter()
    phases["assembly"] = end - assembly_started
    # What no phase timer saw (between the phases: chunk dispatch, trace copies).
    phases["other"] = max(0.0, end - called - (sum(phases.values()) - before))
    return dict(phase_times=json.dumps(phases), time_to_first_draw=before + run.first_draw_at - called,
                total_time=before + end - called)


# What to do about divergences and about unconverged chains, by run kind.
_DIVERGENCE_ADVICE = {
    # On the 100-D funnel 0.95 removed every divergence of fit + NeuTra at five seeds (docs/benchmarks.md).
    "neutra": "Raise target_accept_prob (0.95, as Stan's adapt_delta), train the flow longer, or use NUTS.",
    "adapted": ("The flow adapted on the warm-up draws has weak spots here: rerun with another seed or a "
                "longer warm-up, raise target_accept_prob, or train the flow with fit first."),
    "baseline": "Raise target_accept_prob, reparameterise the model, or precondition it with a flow (NeuTra).",
}
_CONVERGENCE_ADVICE = {
    "neutra": ("the flow is not a good enough preconditioner here: train it longer (fit(num_steps=...)), "
               "use a more flexible flow (make_flow('naf', ...)), or compare with plain NUTS "
               "(sample(target, None, kernel='nuts'))"),
    "adapted": ("the flow adapted on the warm-up draws is not good enough here (its outcome varies from "
                "seed to seed on funnel-like and high-dimensional posteriors): rerun with another seed, "
                "or train the flow with fit first (sample(target, fit(target, make_flow('iaf', d), ...))), "
                "and compare with plain NUTS (sample(target, None, kernel='nuts'))"),
    "baseline": ("run longer chains (num_warmup, num_samples), reparameterise the model, or precondition it "
                 "with a flow (NeuTra)"),
}


def _attrs(plan: _Plan, s: _Settings, run: _RunRecord) -> dict[str, Any]:
    final_step = float(np.asarray(run.stats["step_size"])[:, -1].mean())
    if plan.bijector is not None and plan.kernel.uses_chees:
        trajectory = float(unnest.get_innermost(run.results, "averaged_max_trajectory_length"))
    elif s.kind == "hmc":
        trajectory = float(s.num_leapfrog_steps) * final_step
    else:
        trajectory = float("nan")
    attrs: dict[str, Any] = dict(
        sampler=plan.sampler, kernel=s.kind, flow=plan.flow_name,
        target=str(getattr(plan.target, "name", "target")), dtype=plan.target.dtype.name,
        num_chains=s.num_chains, num_warmup=s.num_warmup, num_samples=s.num_samples,
        seed=str(s.seed) if not isinstance(s.seed, (int, np.integer)) else int(s.seed),
        compile_time=run.compile_time, warmup_time=run.warmup_time, sampling_time=run.sampling_time,
        num_grad_evals_warmup=run.grads_warmup, num_grad_evals_sampling=run.grads_sampling,
        num_divergences_warmup=run.divs_warmup, num_divergences_sampling=run.divs_sampling,
        step_size=final_step, target_accept_prob=float(s.target_accept_prob), trajectory_length=trajectory,
        mean_leapfrog_steps=float(run.stats["n_steps"].mean()), adaptation=plan.adaptation,
        jit_compile=int(s.jit_compile), thin=s.thin,
        num_replicas=1 if s.strategy is None else int(s.strategy.num_replicas_in_sync),
    )
    if s.kind == "nuts":
        attrs["max_tree_depth"] = s.max_tree_depth
    if s.independence_steps:
        attrs["independence_steps"] = s.independence_steps
        attrs["num_density_evals_sampling"] = s.num_chains * independence.count_proposals(
            s.num_warmup, s.num_samples, s.num_warmup, s.independence_steps)
        # Only an independence proposal takes no leapfrog step.
        proposed = run.stats["acceptance_rate"][run.stats["n_steps"] == 0]
        attrs["independence_acceptance_rate"] = float(proposed.mean()) if proposed.size else math.nan
    truth = _ground_truth_json(plan.target)
    if truth is not None:
        attrs["ground_truth"] = truth
    return attrs


def _check_sharding(strategy, bijector, num_chains: int) -> None:
    from neutra_flows._distribute import check_strategy

    if bijector is None:
        raise ValueError(
            "strategy is supported for NeuTra sampling (a flow) only; the baseline's windowed "
            "mass-matrix adaptation is not sharded. Pass a flow, or strategy=None for the baseline"
        )
    check_strategy(strategy, num_chains, "num_chains", list(bijector.variables))


def _sharded_chains(strategy, kernel, cache_key, num_chains, num_warmup, buffer_size, jit_compile):
    from neutra_flows._distribute import ShardedChains

    chains = _cached_advance(
        cache_key, (buffer_size, "sharded", jit_compile),
        kernel,
        lambda: ShardedChains(strategy, kernel, _make_advance, _draw_stats, _latent_state,
                              num_chains=num_chains, num_warmup=num_warmup, buffer_size=buffer_size,
                              jit_compile=jit_compile),
    )
    return chains


def _check_sampler_start(results) -> None:
    """What the sampler itself sees must be finite at the start: for NeuTra the
    pulled-back density, which also fails when the flow's log-det does."""
    sampler_lp = unnest.get_innermost(results, "target_log_prob").numpy()
    if not np.all(np.isfinite(sampler_lp)):
        bad = int(np.argmax(~np.isfinite(sampler_lp)))
        raise ValueError(
            f"the sampler's log density is {sampler_lp[bad]} at the start of chain {bad} "
            "(for NeuTra: log p(f(u)) + log|det f'(u)|; check the flow's log-det)"
        )
    grads0 = tf.nest.flatten(unnest.get_innermost(results, "grads_target_log_prob"))
    if not all(np.all(np.isfinite(g.numpy())) for g in grads0):
        raise ValueError("the gradient of the log density is not finite at the starting draws")


def _progress(enabled: bool, total: int, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step")


def _warm_up(advance, state, results, loop_seed, chunks, hooks, rescale, kernel, bar):
    """The warm-up chunks. Each hook sees every chunk's buffered draws (``observe``)
    and, at its boundaries, may replace the kernel results (``act``: a new latent
    scale, a refitted flow). Returns ``(state, results, seed, gradients, divergences)``."""
    one = tf.constant(1, tf.int32)
    grads = divs = done = 0
    for n in chunks:
        state, results, loop_seed, g, v, buffers = advance(
            state, results, loop_seed, tf.constant(n, tf.int32), one)
        grads += int(g)
        divs += int(v)
        for hook in hooks:
            hook.observe(done, n, buffers)
        done += n
        for hook in hooks:
            if done in hook.boundaries:
                results = hook.act(done, state, results, kernel, rescale)
        if bar is not None:
            bar.update(n)
    return state, results, loop_seed, grads, divs


class _LatentScaleWindow:
    """Sets NeuTra's latent diagonal scale from the latent draws of one window.

    The window is the second quarter of the warm-up by default (after the flow
    refits when the flow is adapted on the draws); the scale is set at its end,
    with Stan's regularisation, and the step size goes on adapting after it.
    """

    def __init__(self, first: int, boundary: int):
        self.first, self.boundaries = first, (boundary,)
        self.window: list[np.ndarray] = []
        self.scale: np.ndarray | None = None

    @classmethod
    def schedule(cls, num_warmup: int, after: int = 0) -> _LatentScaleWindow | None:
        if num_warmup < _MIN_LATENT_WARMUP:
            return None
        if not after:
            half = num_warmup // 2
            return cls(half // 2, half)
        # After the last flow refit: half of what is left is the window, then the
        # step size settles for the other half.
        return cls(after, after + (num_warmup - after) // 2)

    def observe(self, done: int, n: int, buffers) -> None:
        if done >= self.first and done + n <= self.boundaries[0]:
            self.window.append(buffers["v"].numpy()[:n])

    def act(self, step: int, state, results, kernel, rescale):
        self.scale = _latent_scale_from(self.window, kernel.latent_scale)
        return rescale(results, self.scale)

    def report(self, attrs: dict) -> None:
        if self.scale is not None:
            attrs["latent_scale_min"] = float(self.scale.min())
            attrs["latent_scale_max"] = float(self.scale.max())


def _draw(advance, state, results, loop_seed, chunks, thin: int, bar):
    """The sampling chunks, keeping every ``thin``-th draw. Returns
    ``(state, results, pieces, gradients, divergences, perf_counter() at the first kept draw)``."""
    thin_t = tf.constant(thin, tf.int32)
    pieces: list[dict[str, np.ndarray]] = []
    grads = divs = 0
    first_draw_at = math.nan
    for n in chunks:
        state, results, loop_seed, g, v, buffers = advance(
            state, results, loop_seed, tf.constant(n, tf.int32), thin_t)
        grads += int(g)
        divs += int(v)
        pieces.append({k: b.numpy()[: n // thin] for k, b in buffers.items() if k not in _WARMUP_ONLY})
        if not pieces[1:]:
            # A chunk's draws reach the caller together: its first is out when it returns.
            first_draw_at = time.perf_counter()
        if bar is not None:
            bar.update(n)
    return state, results, pieces, grads, divs, first_draw_at


# Buffers only the warm-up's hooks read (the flow adaptation), never kept in the trace.
_WARMUP_ONLY = ("v", "latent_grad")


def _trace(pieces: list[dict[str, np.ndarray]], target: Any) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Chunks of ``[draw, chain, ...]`` buffers to ``z`` and ``sample_stats`` as ``[chain, draw, ...]``."""
    trace = {k: np.swapaxes(np.concatenate([p[k] for p in pieces]), 0, 1) for k in pieces[0]}
    z = trace.pop("z")
    d = z.shape[-1]
    lp = target.unnormalized_log_prob(z.reshape(-1, d)).numpy().reshape(z.shape[:2])
    _check_draws_lp(lp, z, str(getattr(target, "name", "target")))
    stats = dict(trace, lp=lp)
    stats["n_steps"] = stats["n_steps"].astype(np.int64)
    if "tree_depth" in stats:
        stats["tree_depth"] = stats["tree_depth"].astype(np.int64)
    return z, stats


def _warn_if_divergent(divergences: int, transitions: int, sampler: str, target_name: str,
                       run_kind: str) -> None:
    if not divergences:
        return
    warnings.warn(
        f"{sampler} on {target_name}: {divergences} of {transitions} post-warm-up transitions diverged "
        f"({divergences / transitions:.1%});"
        + (" the draws are likely biased. " if divergences > _DIVERGENCE_WARN * transitions else
           " the draws may be biased. ")
        + _DIVERGENCE_ADVICE[run_kind],
        RuntimeWarning,
        stacklevel=3,
    )


def _latent_scale_from(window: list[np.ndarray], scale: tf.Variable) -> np.ndarray:
    """Stan's regularised variance of the latent draws ``u = s * v`` in the window."""
    u = np.concatenate(window).reshape(-1, scale.shape[0]) * scale.numpy()
    n = u.shape[0]
    var = stan_regularised(u.var(axis=0), n)
    return np.sqrt(var)


def _warn_if_not_converged(idata: Any, sampler: str, target_name: str, run_kind: str) -> None:
    """Warns, naming the variables, when the chains disagree (rank-normalised R-hat > 1.01)."""
    if idata.posterior.sizes["chain"] < 2 or idata.posterior.sizes["draw"] < 4:
        return
    import arviz as az

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rhat = az.rhat(idata.posterior.astype(np.float64))
    worst = {name: float(np.nanmax(np.asarray(rhat[name]))) for name in rhat.data_vars}
    bad = {k: v for k, v in sorted(worst.items(), key=lambda kv: -kv[1]) if v > _RHAT_WARN}
    if not bad:
        return
    shown = ", ".join(f"{k} (R-hat {v:.3g})" for k, v in list(bad.items())[:6])
    severe = max(bad.values()) > _RHAT_SEVERE
    fix = _CONVERGENCE_ADVICE[run_kind]
    warnings.warn(
        f"{sampler} on {target_name}: the chains have not converged"
        + (" (the draws are likely wrong)" if severe else "")
        + f": {shown}. R-hat above {_RHAT_WARN} means the chains disagree; do not trust these draws. "
        f"To fix: {fix}.",
        RuntimeWarning,
        stacklevel=3,
    )
