"""Fitting flows: to an unnormalized density by reverse KL (VI), and to data by maximum likelihood.

:func:`fit` trains a flow ``f`` so that ``q = f_# N(0, I_d)`` approximates a
:class:`~neutra_flows.targets.Target` ``p`` on its unconstrained space, by
minimising the reverse KL divergence with reparameterised Monte Carlo gradients:

    KL(q || p) = E_{u ~ N(0, I)} [ log N(u; 0, I) - log|det f'(u)| - log p(f(u)) ] + log Z.

Only ``f.forward`` and its log-det are evaluated (fast for IAF, the default NeuTra
flow). Because ``log p`` already includes the constraining bijector's log-det, this
is the same as fitting ``c o f`` to the density in the user's constrained space.
After training, ``num_diagnostic_draws`` fresh draws give the ELBO with its
standard error and the Pareto-smoothed importance sampling (PSIS) diagnostic
``k-hat`` of the weights ``log w = log p(z) - log q(z)`` (Yao et al. 2018):
``k-hat < 0.7`` means ``q`` is usable as a posterior on its own; otherwise use the
flow as a NeuTra preconditioner with :func:`neutra_flows.sample`.

:func:`fit_to_data` trains a flow by maximum likelihood (forward KL) on samples,
with minibatches, a held-out split and early stopping. The data log-likelihood is

    log q(x) = log N(f^{-1}(x); 0, I) + log|det (f^{-1})'(x)|,

which needs the flow's *inverse*: fast for MAF, RealNVP and the spline flows,
but sequential (``d`` network passes) for IAF, so prefer those here.

Both train in the one resilient loop of ``neutra_flows._training``: compiled
with XLA in chunks of steps (a ``tf.while_loop`` inside one
``tf.function(jit_compile=True)``), they draw with stateless seeds derived from
``seed`` (the same seed gives the same loss trace), use a fresh
``tf_keras.optimizers.Adam`` per call, and never return non-finite parameters:
a step whose loss or gradient is not finite is skipped inside the compiled loop;
if too many are, the chunk is rolled back, the learning rate lowered and the
chunk retried, and every such event is recorded in the result's ``notes``.

References
----------
* Rezende, D. J. and Mohamed, S. "Variational inference with normalizing flows."
  ICML 2015, arXiv:1505.05770.
* Kingma, D. P. and Ba, J. "Adam: a method for stochastic optimization." 2014,
  arXiv:1412.6980.
* Yao, Y., Vehtari, A., Simpson, D. and Gelman, A. "Yes, but did it work?:
  Evaluating variational inference." ICML 2018, arXiv:1802.02538.
* Vehtari, A., Simpson, D., Gelman, A., Yao, Y. and Gabry, J. "Pareto smoothed
  importance sampling." 2015, arXiv:1507.02646.
* Hoffman, M., Sountsov, P., Dillon, J. V., Langmore, I., Tran, D. and Vasudevan, S.
  "NeuTra-lizing bad geometry in Hamiltonian Monte Carlo using neural transport."
  2019, arXiv:1903.03704.
* Papamakarios, G., Nalisnick, E., Rezende, D. J., Mohamed, S. and
  Lakshminarayanan, B. "Normalizing flows for probabilistic modeling and
  inference." JMLR 22, 2021, arXiv:1912.02762.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp
import tf_keras

from neutra_flows import _distribute
from neutra_flows._timing import Laps
from neutra_flows._training import (
    ChunkReport,
    ResilientLoop,
    StoppingRule,
    Wording,
    chunk_of_steps,
    default_learning_rate,
    guarded_step,
    make_optimizer,
    progress_bar,
    restore,
    snapshot,
    step_wording,
)
from neutra_flows._utils import as_seed, check_positive_int, split_seed
from neutra_flows.psis import psis_log_weights
from neutra_flows.targets import Target
from neutra_flows.whitening import whiten_flow, whitening_layer

tfb = tfp.bijectors
tfd = tfp.distributions

__all__ = ["DataFitResult", "FitResult", "default_learning_rate", "fit", "fit_to_data", "psis_diagnostics"]

KHAT_THRESHOLD = 0.7
# PSIS k-hat below which a Gaussian fit is already a good posterior (Yao et al. 2018).
_GAUSSIAN_GOOD_KHAT = 0.5


# -- results -----------------------------------------------------------------------


class StatelessTransformedDistribution(tfd.TransformedDistribution):
    """A ``tfd.TransformedDistribution`` whose ``sample(n, seed=int)`` is reproducible.

    TFP reads an int seed as a *stateful* seed: two calls with ``seed=1`` give
    different draws. Here an int (or a pair of ints) is turned into a stateless
    seed with :func:`neutra_flows._utils.as_seed` first, as everywhere else in
    the package, so the same seed always gives the same draws and distinct int
    seeds give distinct ones. ``seed=None`` keeps TFP's behaviour (fresh draws).
    """

    def sample(self, sample_shape=(), seed=None, name="sample", **kwargs):
        return super().sample(sample_shape, seed=_stateless(seed), name=name, **kwargs)

    def experimental_sample_and_log_prob(self, sample_shape=(), seed=None, name="sample_and_log_prob", **kw):
        return super().experimental_sample_and_log_prob(sample_shape, seed=_stateless(seed), name=name, **kw)


def _stateless(seed: Any) -> Any:
    return None if seed is None else as_seed(seed)


# tfd.TransformedDistribution(...) returns an instance of this private base
# class when the bijector is not a CompositeTensor (our Keras-backed flows).
_TRANSFORMED_BASE = tfd.TransformedDistribution.__mro__[1]


def _with_stateless_sampling(dist: Any) -> Any:
    if not isinstance(dist, _TRANSFORMED_BASE) or isinstance(
        dist, StatelessTransformedDistribution
    ):
        return dist
    return StatelessTransformedDistribution(
        distribution=dist.distribution, bijector=dist.bijector, name=dist.name
    )


@dataclass
class FitResult:
    """What :func:`fit` returns.

    Attributes:
      flow: the trained flow (the object passed in, trained in place).
      surrogate: ``q`` in the user's constrained space, a ``tfd.Distribution`` with
        ``sample`` and ``log_prob`` (``log_prob`` needs the flow's inverse, slow for IAF).
        A :class:`StatelessTransformedDistribution`: ``sample(n, seed=1)`` gives the
        same draws every call (TFP alone would treat the int as a stateful seed).
      losses: ``[num_steps]`` Monte Carlo estimates of ``-ELBO`` per step (NaN/inf
        at steps that were skipped).
      wall_time: seconds spent training (compilation included).
      elbo, elbo_se: the ELBO ``E_q[log p - log q]`` on fresh draws and its
        standard error. For a normalised target ``-elbo`` estimates ``KL(q || p)``.
      khat: PSIS Pareto shape of the importance weights ``p / q`` (``nan`` if it
        could not be computed); below 0.7 ``q`` is usable as a posterior.
      ess_is: importance-sampling effective sample size from the smoothed weights.
      num_steps: optimisation steps taken.
      notes: what happened that a user should know (skipped steps, rollbacks,
        learning-rate reductions, XLA fallback).
      num_diagnostic_draws: draws used for ``elbo``, ``khat`` and ``ess_is``.
      log_weights: ``[num_diagnostic_draws]`` raw ``log p(z) - log q(z)``.
      target_name: the target's name.
      whitening: the :class:`~neutra_flows.whitening.GaussianFit` written into the
        flow's whitening layer before training (``None`` when there was none).
      stop_reason: why training stopped (the stopping rule, or the budget).
      num_grad_evals: target gradient evaluations spent: whitening, training
        (steps x batch) and the diagnostic draws. The honest cost of the flow.
      phase_times: seconds per phase, compilation included: ``"whitening"``,
        ``"training"`` (with the checks of the first points) and
        ``"diagnostics"`` (the fresh draws for the ELBO and k-hat).
      total_time: seconds from the call to the return (the phases' sum, and
        what :func:`~neutra_flows.sample` counts as the flow's training time).
    """

    flow: tfb.Bijector
    surrogate: tfd.Distribution
    losses: np.ndarray
    wall_time: float
    elbo: float
    elbo_se: float
    khat: float
    ess_is: float
    num_steps: int
    notes: list[str] = field(default_factory=list)
    num_diagnostic_draws: int = 0
    log_weights: np.ndarray | None = field(default=None, repr=False)
    target_name: str = "target"
    whitening: Any = None
    stop_reason: str = ""
    num_grad_evals: int = 0
    phase_times: dict[str, float] = field(default_factory=dict)
    total_time: float = math.nan

    def __post_init__(self):
        # Done here rather than in fit: every FitResult's surrogate samples statelessly.
        self.surrogate = _with_stateless_sampling(self.surrogate)

    @property
    def usable_as_posterior(self) -> bool:
        """``khat < 0.7``: ``surrogate`` can be used as the posterior itself."""
        return bool(np.isfinite(self.khat) and self.khat < KHAT_THRESHOLD)

    @property
    def failure_reasons(self) -> list[str]:
        """Why the fit failed, from :attr:`losses` and :attr:`khat` alone; empty if it did not.

        A fit failed when the loss rose over training (the mean of the last 10 %
        of the finite losses is above the mean of the first 10 % by more than
        three standard errors and 0.01 nats), when no step had a finite loss,
        when the loss was ``-inf`` (the target's log density was ``+inf``), or
        when ``k-hat > 1`` (q misses much of the target's mass).
        """
        return _failure_reasons(np.asarray(self.losses, dtype=np.float64), self.khat)

    @property
    def failed(self) -> bool:
        """``True`` when :attr:`failure_reasons` is not empty: do not use this flow as it is."""
        return bool(self.failure_reasons)

    def summary(self) -> str:
        """A short human-readable report with the verdict on ``k-hat`` (and FAILED when it failed)."""
        lines = [
            f"fit of {self.target_name}: {self.num_steps} steps in {self.wall_time:.1f} s",
            f"  {_final_loss_line(np.asarray(self.losses, dtype=np.float64))}",
            f"  ELBO = {self.elbo:.4f} +/- {self.elbo_se:.4f} ({self.num_diagnostic_draws} "
            "draws; for a normalised target -ELBO estimates KL(q || p))",
            f"  PSIS k-hat = {self.khat:.3f}, importance-sampling ESS = {self.ess_is:.0f} "
            f"of {self.num_diagnostic_draws}",
        ]
        if self.whitening is not None:
            lines.append(f"  whitening: {self.whitening.method}, Gaussian ELBO {self.whitening.elbo:.4f}")
        if self.stop_reason:
            lines.append(f"  stopped: {self.stop_reason}")
        lines.append(f"  target gradients spent: {self.num_grad_evals}")
        if not np.isfinite(self.khat):
            lines.append(
                "  k-hat could not be computed: do not trust q as a posterior; sample with "
                "NeuTra: neutra_flows.sample(target, result)"
            )
        elif self.khat < 0.5:
            lines.append(
                "  k-hat < 0.5: q is a good approximation; usable as a VI posterior "
                "(result.surrogate), and a good NeuTra preconditioner."
            )
        elif self.khat < KHAT_THRESHOLD:
            lines.append(
                "  0.5 <= k-hat < 0.7: q is usable as a VI posterior (result.surrogate), "
                "with some bias in the tails; NeuTra sampling removes it."
            )
        else:
            lines.append(
                "  k-hat >= 0.7: q is NOT reliable as a posterior on its own; sample with "
                "NeuTra: neutra_flows.sample(target, result)"
            )
        reasons = self.failure_reasons
        if reasons:
            lines.append("  FIT FAILED: do not trust this flow as it is.")
            lines.extend(f"    - {reason}" for reason in reasons)
            lines.append(
                "  try: a lower learning_rate, more num_steps, global_clipnorm=1.0, a larger batch_size "
                "or a more flexible flow; check that the target's log density is right (Target.check)"
            )
        for note in self.notes:
            lines.append(f"  note: {note}")
        return "\n".join(lines)


# The loss must rise by more than this many standard errors, and this many nats,
# before a fit is called failed: the loss is a noisy Monte Carlo estimate.
_RISE_SE = 3.0
_RISE_MIN = 0.01
_KHAT_FAILED = 1.0


def _final_loss_line(losses: np.ndarray) -> str:
    if losses.size == 0:
        return "no training steps (see \"stopped\" below for why)"
    n = max(1, losses.size // 10)
    tail = losses[-n:]
    tail = tail[np.isfinite(tail)]
    if tail.size == 0:
        return f"final loss: none of the last {n} steps had a finite loss"
    return f"final loss (mean of last {n} steps): {float(np.mean(tail)):.4f}"


def _loss_rise(losses: np.ndarray) -> str | None:
    finite = losses[np.isfinite(losses)]
    n = finite.size // 10
    if n < 2:
        return None  # too few steps to tell a rise from noise
    first, last = finite[:n], finite[-n:]
    rise = float(last.mean() - first.mean())
    se = math.sqrt(float(first.var(ddof=1) + last.var(ddof=1)) / n)
    if rise > _RISE_SE * se and rise > _RISE_MIN:
        return (
            f"the loss rose over training: mean {last.mean():.4g} over the last {n} finite steps "
            f"vs {first.mean():.4g} over the first {n} (+{rise:.3g} nats)"
        )
    return None


def _failure_reasons(losses: np.ndarray, khat: float) -> list[str]:
    reasons = []
    if losses.size and not np.any(np.isfinite(losses)):
        reasons.append(f"none of the {losses.size} steps had a finite loss: nothing was learned")
    minus_inf = int(np.sum(losses == -np.inf))
    if minus_inf:
        reasons.append(
            f"the loss was -inf at {minus_inf} steps: the target's log density is +inf there "
            "(a log density must be finite or -inf)"
        )
    rise = _loss_rise(losses)
    if rise is not None:
        reasons.append(rise)
    if khat > _KHAT_FAILED:  # False for NaN (not computed): that case has its own line
        reasons.append(f"k-hat = {khat:.3g} > 1: q misses much of the target's mass")
    return reasons


@dataclass
class DataFitResult:
    """What :func:`fit_to_data` returns.

    Attributes:
      flow: the trained flow (trained in place; the best epoch's weights restored).
      distribution: ``flow_# N(0, I)`` as a ``tfd.TransformedDistribution``.
      train_log_likelihood: ``[num_epochs]`` mean log-likelihood per training point
        after each epoch.
      validation_log_likelihood: ``[num_epochs]`` the same on the held-out split
        (``None`` when ``validation_fraction == 0``).
      best_epoch: the epoch (0-based) whose weights were kept.
      num_epochs, num_steps: epochs and optimisation steps run.
      wall_time: seconds.
      stopped_early: whether early stopping ended training.
      notes: skipped steps, rollbacks, XLA fallback.
    """

    flow: tfb.Bijector
    distribution: tfd.Distribution
    train_log_likelihood: np.ndarray
    validation_log_likelihood: np.ndarray | None
    best_epoch: int
    num_epochs: int
    num_steps: int
    wall_time: float
    stopped_early: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def best_validation_log_likelihood(self) -> float | None:
        if self.validation_log_likelihood is None:
            return None
        return float(self.validation_log_likelihood[self.best_epoch])

    def summary(self) -> str:
        lines = [
            f"fit_to_data: {self.num_epochs} epochs ({self.num_steps} steps) in "
            f"{self.wall_time:.1f} s; best epoch {self.best_epoch}"
            + (" (stopped early)" if self.stopped_early else ""),
            f"  train mean log-likelihood: {self.train_log_likelihood[self.best_epoch]:.4f}",
        ]
        if self.validation_log_likelihood is not None:
            lines.append(f"  held-out mean log-likelihood: {self.best_validation_log_likelihood:.4f}")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)


# -- checks ----------------------------------------------------------------------------


def _check_flow(flow: Any, event_size: int, dtype: tf.DType) -> list[tf.Variable]:
    if not isinstance(flow, tfb.Bijector):
        raise ValueError(
            "flow must be a tfp.bijectors.Bijector (e.g. neutra_flows.make_flow(...)), got "
            f"{type(flow).__name__}"
        )
    config = getattr(flow, "flow_config", None)
    if isinstance(config, dict) and config.get("event_size") not in (None, event_size):
        raise ValueError(
            f"the flow was built for event_size={config['event_size']} but the target has "
            f"event_size={event_size}"
        )
    if isinstance(config, dict) and config.get("dtype") not in (None, dtype.name):
        raise ValueError(
            f"the flow is {config['dtype']} but the target is {dtype.name}; build the flow "
            f"with dtype={dtype.name!r}"
        )
    probe = tf.zeros([2, event_size], dtype)
    try:
        out = flow.forward(probe)
    except Exception as err:  # any failure here means a mismatched flow: re-raised with context
        raise ValueError(
            f"flow.forward failed on points of shape [2, {event_size}] ({dtype.name}): {err}. "
            f"Was the flow built with event_size={event_size} and dtype={dtype.name}?"
        ) from err
    if tuple(out.shape) != (2, event_size):
        raise ValueError(
            f"flow maps [2, {event_size}] to {tuple(out.shape)}; it must preserve the shape "
            f"(build it with event_size={event_size})"
        )
    if out.dtype != dtype:
        raise ValueError(f"flow outputs {out.dtype.name} but the target is {dtype.name}")
    return list(flow.trainable_variables)


# -- PSIS ------------------------------------------------------------------------------


def psis_diagnostics(log_weights: Any) -> tuple[float, float, list[str]]:
    """PSIS ``(k-hat, importance ESS, notes)`` of raw log importance weights ``[n]``.

    Uses :func:`neutra_flows.psis.psis_log_weights` (ArviZ's ``psislw`` to
    rounding, without importing ArviZ). Non-finite weights are handled explicitly: NaN draws
    are dropped (and reported), ``-inf`` weights (zero weight) are kept as a very
    negative finite number so the tail fit still sees them.
    """
    lw = np.asarray(log_weights, dtype=np.float64).reshape(-1)
    notes = []
    nan = np.isnan(lw)
    if nan.any():
        notes.append(f"{int(nan.sum())} of {lw.size} diagnostic draws had NaN log weights")
        lw = lw[~nan]
    if np.any(lw == np.inf):
        notes.append("some diagnostic log weights are +inf: k-hat is infinite")
        return float("inf"), 1.0, notes
    finite = np.isfinite(lw)
    if finite.sum() < 10:
        notes.append("fewer than 10 finite log weights: k-hat not computed")
        return float("nan"), 0.0, notes
    lw = np.where(finite, lw, lw[finite].min() - 1e3)
    smoothed, khat = psis_log_weights(lw, r_eff=1.0)
    w = np.exp(smoothed - np.max(smoothed))
    ess = float(np.sum(w) ** 2 / np.sum(w**2))
    return float(khat), ess, notes


# -- reverse KL fit ----------------------------------------------------------------------


def fit(
    target: Target,
    flow: tfb.Bijector,
    *,
    num_steps: int = 2000,
    batch_size: int = 1024,
    learning_rate: float | tf_keras.optimizers.schedules.LearningRateSchedule | None = None,
    seed: Any,
    progress: bool = True,
    jit_compile: bool = True,
    steps_per_chunk: int = 100,
    num_diagnostic_draws: int = 16384,
    global_clipnorm: float | None = None,
    max_recoveries: int = 5,
    whiten: bool = True,
    early_stopping: bool = True,
    skip_training_if_gaussian: bool = True,
    strategy: tf.distribute.Strategy | None = None,
) -> FitResult:
    """Fits ``flow`` to ``target`` by minimising ``KL(q || p)``, ``q = flow_# N(0, I_d)``.

    Args:
      target: a :class:`~neutra_flows.targets.Target` with ``event_size = d``.
      flow: a ``tfb.Bijector`` on ``[..., d]`` with its trainable variables already
        created (e.g. ``neutra_flows.make_flow("iaf", d)``); trained in place.
      num_steps: Adam steps.
      batch_size: Monte Carlo draws per step.
      learning_rate: a float, a ``tf_keras`` ``LearningRateSchedule``, or ``None`` for
        :func:`default_learning_rate` (cosine decay from ``1e-2`` to ``1e-4``).
      seed: an int or a stateless seed; the same seed gives the same flow and losses.
      progress: show a tqdm progress bar (step, loss).
      jit_compile: compile each chunk with XLA (falls back to plain graph mode,
        with a note, if the flow has an op XLA cannot compile).
      steps_per_chunk: steps per compiled call; larger means less Python overhead.
      num_diagnostic_draws: fresh draws for the ELBO, k-hat and IS ESS.
      global_clipnorm: optional gradient clipping by global norm (helps on
        targets with extreme curvature such as funnels).
      max_recoveries: how many chunk rollbacks (each lowering the learning rate
        4x) are allowed before a ``RuntimeError``.
      whiten: when the flow has a ``whitening`` layer (every network flow from
        ``make_flow`` has one by default), first fit a Gaussian to the target by
        MAP, Laplace and deterministic ADVI with L-BFGS
        (:func:`neutra_flows.whitening.fit_gaussian`), write it into that layer
        and keep it fixed; Adam then trains the rest of the flow on top of it.
        ``False`` leaves the layer as it is (trained by Adam with the rest).
      early_stopping: ``num_steps`` is then a budget: training stops once the
        loss (the mean of each chunk of ``steps_per_chunk`` steps) has not
        improved by more than two standard errors for three chunks in a row,
        after the learning rate was lowered 10x twice on such plateaus. The
        reason is in ``result.stop_reason``.
      skip_training_if_gaussian: after whitening, when the Gaussian already
        passes PSIS (k-hat < 0.5 on 2048 fresh draws), leave the rest of the
        flow at the identity: training would spend hundreds of thousands of
        target gradients for a fraction of a nat (an AR(5) model: ELBO 58.49 ->
        58.59 in 1800 steps). The summary says so; ``False`` trains anyway.
      strategy: a ``tf.distribute.Strategy`` for data-parallel training: each
        step draws the whole batch's base points from the step's seed, each
        replica evaluates ``batch_size / replicas`` of them (``batch_size`` must
        be a multiple of ``strategy.num_replicas_in_sync``) and the gradients are
        summed across replicas, so 1 and N replicas give the same loss trace to
        float tolerance. The flow must be created in ``strategy.scope()``. One
        step is dispatched at a time (no XLA chunk: TensorFlow cannot all-reduce
        inside a compiled loop on CPUs). See docs/distributed.md.

    Returns:
      A :class:`FitResult`.

    Raises:
      ValueError: bad arguments, a flow of the wrong size or dtype, or a target
        that is NaN / +inf / of the wrong shape at the first points.
      RuntimeError: training kept producing non-finite losses or gradients; the
        message names the step. The flow is left at its last finite parameters.
    """
    # Arguments, then the flow against the target.
    _check_target(target)
    num_steps = check_positive_int(num_steps, "num_steps", minimum=0)
    batch_size = check_positive_int(batch_size, "batch_size")
    steps_per_chunk = check_positive_int(steps_per_chunk, "steps_per_chunk")
    num_diagnostic_draws = check_positive_int(num_diagnostic_draws, "num_diagnostic_draws")
    max_recoveries = check_positive_int(max_recoveries, "max_recoveries", minimum=0)
    variables = _check_flow(flow, target.event_size, target.dtype)
    if strategy is not None:
        _distribute.check_strategy(strategy, batch_size, "batch_size", list(flow.variables))
    train_seed, diag_seed, check_seed = split_seed(seed, 3)
    notes: list[str] = []

    # Whitening: a Gaussian written into the flow's whitening layer, then frozen.
    laps = Laps()
    gaussian, variables = _whiten(target, flow, variables, whiten, seed, notes)
    laps.lap("whitening")
    whiten_time = laps.seconds["whitening"]
    skipped_reason = _gaussian_suffices(gaussian) if skip_training_if_gaussian else ""
    if skipped_reason:
        num_steps = 0
    _check_first_points(target, flow, check_seed)

    # Training.
    base = _standard_normal(target.event_size, target.dtype)
    terms = _elbo_terms(target, flow, base)
    losses, stop_reason = np.full([num_steps], np.nan), skipped_reason or "num_steps=0"
    start = time.perf_counter()
    if num_steps > 0 and not variables:
        notes.append("the flow has no trainable variables: nothing to train")
    elif num_steps > 0:
        losses, stop_reason = _train_reverse_kl(
            target, flow, variables, terms, train_seed=train_seed, num_steps=num_steps, batch_size=batch_size,
            learning_rate=learning_rate, global_clipnorm=global_clipnorm, jit_compile=jit_compile,
            steps_per_chunk=steps_per_chunk, max_recoveries=max_recoveries, early_stopping=early_stopping,
            strategy=strategy, progress=progress, notes=notes,
        )
    wall_time = time.perf_counter() - start + whiten_time

    laps.lap("training")
    # Diagnostics on fresh draws, and the result.
    diagnostics = _diagnose(terms, diag_seed, num_diagnostic_draws)
    laps.lap("diagnostics")
    notes.extend(diagnostics.notes)
    surrogate = tfd.TransformedDistribution(
        base, tfb.Chain([target.constraining_bijector, flow]), name=f"{target.name}_surrogate"
    )
    return FitResult(
        flow=flow,
        surrogate=surrogate,
        losses=losses,
        wall_time=wall_time,
        elbo=diagnostics.elbo,
        elbo_se=diagnostics.elbo_se,
        khat=diagnostics.khat,
        ess_is=diagnostics.ess_is,
        num_steps=len(losses),
        notes=notes,
        num_diagnostic_draws=num_diagnostic_draws,
        log_weights=diagnostics.log_weights,
        target_name=target.name,
        whitening=gaussian,
        stop_reason=stop_reason,
        num_grad_evals=(0 if gaussian is None else gaussian.num_grad_evals) + len(losses) * batch_size
        + num_diagnostic_draws,
        phase_times=laps.seconds,
        total_time=laps.total,
    )


def _check_target(target: Any) -> None:
    if not isinstance(target, Target):
        raise ValueError(
            f"target must be a neutra_flows.Target, got {type(target).__name__}; wrap a log "
            "density with Target(log_prob_fn, event_shape) or Target.from_joint_distribution"
        )


def _gaussian_suffices(gaussian: Any) -> str:
    """Why training is skipped when the whitening Gaussian already passes PSIS; else ``""``."""
    if gaussian is None or not gaussian.khat < _GAUSSIAN_GOOD_KHAT:
        return ""
    return (f"not trained: the whitening Gaussian already fits (PSIS k-hat {gaussian.khat:.2f} "
            f"< {_GAUSSIAN_GOOD_KHAT}); pass skip_training_if_gaussian=False to train the flow")


def _check_first_points(target: Target, flow: tfb.Bijector, seed: Any) -> None:
    # The first points the target will be given: the flow's image of the base
    # mode and a few draws. NaN / +inf / bad shapes fail here, loudly.
    d, dtype = target.event_size, target.dtype
    u0 = tf.concat([tf.zeros([1, d], dtype), tf.random.stateless_normal([7, d], seed, dtype=dtype)], 0)
    target.check(flow.forward(u0))


def _standard_normal(d: int, dtype: tf.DType) -> tfd.Distribution:
    return tfd.MultivariateNormalDiag(tf.zeros([d], dtype), tf.ones([d], dtype))


def _elbo_terms(target: Target, flow: tfb.Bijector, base: tfd.Distribution):
    """``terms(seed, n) -> (log_q, log_p)`` at ``n`` fresh draws ``z = flow(u)``, ``u ~ base``."""
    d, dtype = target.event_size, target.dtype

    def terms(seed, n):
        u = tf.random.stateless_normal([n, d], seed, dtype=dtype)
        z = flow.forward(u)
        log_q = base.log_prob(u) - flow.forward_log_det_jacobian(u, event_ndims=1)
        log_p = target.unnormalized_log_prob(z)
        return log_q, log_p

    return terms


def _elbo_step(optimizer, variables, terms, train_seed, batch_size: int):
    """``one_step(step, attempt) -> (loss, finite, code)``, the step of ``fit``'s chunk (``chunk_of_steps``)."""

    def one_step(step, attempt):
        # A retried chunk (after a rollback) draws fresh points: a failure caused
        # by the draws themselves is not replayed identically.
        attempt_seed = tf.random.experimental.stateless_fold_in(train_seed, attempt)
        step_seed = tf.random.experimental.stateless_fold_in(attempt_seed, step)

        def loss_fn():
            log_q, log_p = terms(step_seed, batch_size)
            return tf.reduce_mean(log_q - log_p), (log_q, log_p)

        loss, finite, (log_q, log_p) = guarded_step(optimizer, variables, loss_fn)
        # 1: log p NaN, 2: log p = -inf, 4: log p = +inf, 8: log q not finite (see _describe).
        code = (
            tf.cast(tf.reduce_any(tf.math.is_nan(log_p)), tf.int32)
            + 2 * tf.cast(tf.reduce_any(tf.equal(log_p, -np.inf)), tf.int32)
            + 4 * tf.cast(tf.reduce_any(tf.equal(log_p, np.inf)), tf.int32)
            + 8 * tf.cast(tf.reduce_any(~tf.math.is_finite(log_q)), tf.int32)
        )
        return loss, finite, code

    return one_step


def _train_reverse_kl(target, flow, variables, terms, *, train_seed, num_steps: int, batch_size: int,
                      learning_rate, global_clipnorm, jit_compile: bool, steps_per_chunk: int,
                      max_recoveries: int, early_stopping: bool, strategy, progress: bool,
                      notes: list[str]) -> tuple[np.ndarray, str]:
    """Adam on ``-ELBO`` in resilient compiled chunks; ``(losses [steps taken], stop reason)``."""
    # Under a strategy the optimiser's variables are mirrored like the flow's.
    with _distribute.scope(strategy):
        optimizer, lr_scale = make_optimizer(learning_rate, num_steps, 1e-2, global_clipnorm)
        # Create the optimiser's variables before compiling.
        optimizer.build(variables)
    run_chunk = chunk_of_steps(_elbo_step(optimizer, variables, terms, train_seed, batch_size), steps_per_chunk)

    def make_chunk(jit: bool):
        if strategy is not None:
            return _distribute.fit_chunk(strategy, target, flow, variables, optimizer, batch_size=batch_size,
                                         train_seed=train_seed, steps_per_chunk=steps_per_chunk)
        return tf.function(run_chunk, jit_compile=jit, autograph=False)

    loop = ResilientLoop(make_chunk, variables=variables, optimizer=optimizer, lr_scale=lr_scale,
                         max_recoveries=max_recoveries, jit_compile=jit_compile,
                         wording=step_wording(f"fit({target.name})", _describe, _ADVICE))
    rule = StoppingRule(num_steps, lr_scale, early_stopping)
    losses = np.full([num_steps], np.nan)
    with progress_bar(num_steps, f"fit {target.name}", progress) as bar:

        def record(chunk: ChunkReport) -> bool:
            losses[chunk.start : chunk.start + chunk.count] = chunk.values
            bar.update(chunk.count)
            finite = chunk.values[np.isfinite(chunk.values)]
            if finite.size:
                bar.set_postfix(loss=f"{finite[-min(10, finite.size) :].mean():.4g}")
            return rule.update(chunk.start + chunk.count, chunk.values)

        step = loop.run(num_steps, on_chunk=record, chunk_size=steps_per_chunk)
    notes.extend(loop.notes)
    notes.extend(rule.notes)
    return losses[:step], rule.reason or rule.budget_reason(step)


_ADVICE = "Check the target for NaN regions, add a constraining bijector, or lower learning_rate."


class _Diagnostics(NamedTuple):
    log_weights: np.ndarray
    elbo: float
    elbo_se: float
    khat: float
    ess_is: float
    notes: list[str]


def _diagnose(terms, seed, num_draws: int) -> _Diagnostics:
    """ELBO with its standard error, PSIS k-hat and IS ESS on ``num_draws`` fresh draws."""
    log_w = []
    block = max(1, min(num_draws, 4096))
    # In blocks to bound memory; one eager pass per block is cheaper than tracing a new graph.
    for i, lo in enumerate(range(0, num_draws, block)):
        n = min(block, num_draws - lo)
        log_q, log_p = terms(tf.random.experimental.stateless_fold_in(seed, i), n)
        log_w.append((log_p - log_q).numpy().astype(np.float64))
    log_w = np.concatenate(log_w)
    # NaN draws are dropped (psis_diagnostics reports them); -inf (q has mass where
    # p has none) makes the ELBO -inf, which is the truth.
    valid = log_w[~np.isnan(log_w)]
    if valid.size == 0:
        elbo, elbo_se = float("nan"), float("nan")
    elif np.all(np.isfinite(valid)):
        elbo, elbo_se = float(np.mean(valid)), float(np.std(valid) / math.sqrt(valid.size))
    else:
        elbo, elbo_se = float(np.mean(valid)), float("inf")
    khat, ess, notes = psis_diagnostics(log_w)
    return _Diagnostics(log_w, elbo, elbo_se, khat, ess, notes)


def _whiten(target, flow, variables, whiten: bool, seed, notes: list[str]):
    """Sets the flow's whitening layer from a Gaussian fit; returns ``(fit, variables to train)``."""
    gaussian = whiten_flow(target, flow, seed=seed) if whiten else None
    if gaussian is None:
        return None, variables
    notes.extend(f"whitening: {n}" for n in gaussian.notes)
    frozen = {id(v) for v in whitening_layer(flow).trainable_variables}
    return gaussian, [v for v in variables if id(v) not in frozen]


def _describe(code: int) -> str:
    parts = []
    if code & 1:
        parts.append("log p is NaN")
    if code & 4:
        parts.append("log p is +inf")
    if code & 2:
        parts.append("log p is -inf: the flow puts mass outside the support")
    if code & 8:
        parts.append("log q is not finite")
    return "; ".join(parts) if parts else "non-finite gradient"


def fit_to_data(
    flow: tfb.Bijector,
    data: Any,
    *,
    num_epochs: int | None = None,
    num_steps: int | None = None,
    batch_size: int = 256,
    learning_rate: float | tf_keras.optimizers.schedules.LearningRateSchedule = 1e-3,
    validation_fraction: float = 0.1,
    seed: Any,
    patience: int = 20,
    progress: bool = True,
    jit_compile: bool = True,
    global_clipnorm: float | None = None,
    max_recoveries: int = 5,
) -> DataFitResult:
    """Fits ``flow`` to samples by maximum likelihood (forward KL), with early stopping.

    The density is ``q = flow_# N(0, I_d)``; the log-likelihood of ``x`` is
    ``log N(flow^{-1}(x); 0, I) + log|det (flow^{-1})'(x)|``, so this needs the
    flow's inverse: fast for MAF, RealNVP and NSF, slow (sequential) for IAF.

    Args:
      flow: a ``tfb.Bijector`` on ``[..., d]`` with its variables created; trained in place.
      data: ``[n, d]`` array-like.
      num_epochs, num_steps: how long to train (give at most one; default 100 epochs).
      batch_size: minibatch size (capped at the training-set size).
      learning_rate: a float or a ``tf_keras`` ``LearningRateSchedule``.
      validation_fraction: held-out share of ``data`` (after a seeded shuffle) for
        early stopping; 0 disables both.
      seed: an int or a stateless seed (shuffles and minibatches).
      patience: epochs without a better held-out log-likelihood before stopping.
      progress: show a tqdm progress bar per epoch.
      jit_compile: compile each epoch with XLA.
      global_clipnorm: optional gradient clipping by global norm.
      max_recoveries: how many epoch rollbacks (each lowering the learning rate
        4x) are allowed before a ``RuntimeError``; an epoch is rolled back when
        more than half its steps had a non-finite loss or gradient, or when it
        left non-finite parameters.

    Returns:
      A :class:`DataFitResult`; the flow holds the best epoch's weights.

    Raises:
      ValueError: bad arguments or data, or a flow of the wrong size.
      RuntimeError: training kept producing non-finite losses or gradients; the
        message names the epoch. The flow is left at its last finite parameters.
    """
    # Arguments and the split.
    x = _check_data(data, num_epochs, num_steps, validation_fraction)
    batch_size = check_positive_int(batch_size, "batch_size")
    patience = check_positive_int(patience, "patience")
    max_recoveries = check_positive_int(max_recoveries, "max_recoveries", minimum=0)
    n, d = x.shape
    dtype = _flow_dtype(flow)
    variables = _check_flow(flow, d, dtype)
    if not variables:
        raise ValueError("the flow has no trainable variables")
    shuffle_seed, train_seed = split_seed(seed, 2)
    train_x, val_x = _split_data(x, validation_fraction, shuffle_seed, dtype)
    batch = min(batch_size, int(train_x.shape[0]))
    steps_per_epoch = int(train_x.shape[0]) // batch
    if num_steps is not None:
        num_steps = check_positive_int(num_steps, "num_steps")
        num_epochs = math.ceil(num_steps / steps_per_epoch)
    num_epochs = 100 if num_epochs is None else check_positive_int(num_epochs, "num_epochs")

    # Training, epoch by epoch, keeping the best epoch's weights.
    base = _standard_normal(d, dtype)

    def log_likelihood(xb):
        u = flow.inverse(xb)
        return base.log_prob(u) + flow.inverse_log_det_jacobian(xb, event_ndims=1)

    optimizer, lr_scale = make_optimizer(learning_rate, num_epochs * steps_per_epoch, 1e-3, global_clipnorm)
    optimizer.build(variables)
    run_epoch = _epoch_chunk(optimizer, variables, log_likelihood, train_x, train_seed, batch, steps_per_epoch)
    loop = ResilientLoop(lambda jit: tf.function(run_epoch, jit_compile=jit, autograph=False),
                         variables=variables, optimizer=optimizer, lr_scale=lr_scale,
                         max_recoveries=max_recoveries, jit_compile=jit_compile, wording=_EPOCH_WORDING)
    start = time.perf_counter()
    epochs = _train_epochs(loop, log_likelihood, train_x, val_x, num_epochs=num_epochs,
                           steps_per_epoch=steps_per_epoch, patience=patience, progress=progress)
    restore(variables, epochs.best_weights)
    wall_time = time.perf_counter() - start
    return DataFitResult(
        flow=flow,
        distribution=tfd.TransformedDistribution(base, flow, name="fitted_flow"),
        train_log_likelihood=np.asarray(epochs.train_ll),
        validation_log_likelihood=np.asarray(epochs.val_ll) if val_x is not None else None,
        best_epoch=epochs.best_epoch,
        num_epochs=len(epochs.train_ll),
        num_steps=len(epochs.train_ll) * steps_per_epoch,
        wall_time=wall_time,
        stopped_early=epochs.stopped_early,
        notes=loop.notes,
    )


def _check_data(data: Any, num_epochs: int | None, num_steps: int | None,
                validation_fraction: float) -> np.ndarray:
    x = np.asarray(data)
    if x.ndim != 2 or x.shape[0] < 2 or x.shape[1] < 1:
        raise ValueError(f"data must be an [n, d] array with n >= 2, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("data contains NaN or inf values")
    if num_epochs is not None and num_steps is not None:
        raise ValueError("give num_epochs or num_steps, not both")
    if not (0.0 <= float(validation_fraction) < 1.0):
        raise ValueError(f"validation_fraction must lie in [0, 1), got {validation_fraction}")
    return x


def _split_data(x: np.ndarray, validation_fraction: float, seed: Any, dtype: tf.DType):
    """``(train [n - n_val, d], held out [n_val, d] or None)`` after a seeded shuffle."""
    n = x.shape[0]
    perm = np.argsort(tf.random.stateless_uniform([n], seed, dtype=tf.float64).numpy(), kind="stable")
    n_val = int(round(float(validation_fraction) * n))
    if validation_fraction > 0 and n_val < 1:
        n_val = 1
    if n - n_val < 1:
        raise ValueError("no training data left after the validation split")
    val_x = tf.constant(x[perm[:n_val]], dtype) if n_val else None
    return tf.constant(x[perm[n_val:]], dtype), val_x


def _epoch_chunk(optimizer, variables, log_likelihood, train_x, train_seed, batch: int, steps_per_epoch: int):
    """The compiled chunk of :func:`fit_to_data`: one epoch of minibatch steps (``count`` is always 1)."""
    n_train = int(train_x.shape[0])

    def run_epoch(epoch, count, attempt):
        attempt_seed = tf.random.experimental.stateless_fold_in(train_seed, attempt)
        epoch_seed = tf.random.experimental.stateless_fold_in(attempt_seed, epoch)
        order = tf.argsort(tf.random.stateless_uniform([n_train], epoch_seed))
        order = tf.reshape(order[: steps_per_epoch * batch], [steps_per_epoch, batch])

        def body(i, skipped):
            xb = tf.gather(train_x, order[i])

            def loss_fn():
                return -tf.reduce_mean(log_likelihood(xb)), ()

            _, finite, _ = guarded_step(optimizer, variables, loss_fn)
            return i + 1, skipped + tf.cast(~finite, tf.int32)

        _, skipped = tf.while_loop(lambda i, _: i < steps_per_epoch, body, (tf.constant(0), tf.constant(0)))
        # No per-step values kept; which step failed first and why is not tracked.
        return tf.zeros([0], tf.float64), skipped, tf.constant(-1), tf.constant(0)

    return run_epoch


_EPOCH_WORDING = Wording(
    skipped="epoch {start}: {skipped} non-finite steps skipped",
    rolled_back="epoch {start}: {skipped} of {steps} steps non-finite; rolled back and lowered the learning "
                "rate to x{lr_scale:.3g}",
    gave_up="fit_to_data: non-finite loss or gradient in epoch {start} persisted after {recoveries} rollbacks "
            "with learning-rate reductions",
)


class _Epochs:
    """Mean log-likelihoods per epoch, the best epoch (held-out, else training) and its weights."""

    def __init__(self, variables, patience: int):
        self.variables, self.patience = variables, patience
        self.train_ll: list[float] = []
        self.val_ll: list[float] = []
        self.best, self.best_epoch, self.best_weights = -np.inf, 0, snapshot(variables)
        self.stopped_early = False

    def record(self, epoch: int, train_ll: float, val_ll: float | None) -> bool:
        """Records an epoch; ``True`` when ``patience`` epochs passed without a better held-out value."""
        self.train_ll.append(train_ll)
        score = train_ll
        if val_ll is not None:
            self.val_ll.append(val_ll)
            score = val_ll
        if np.isfinite(score) and score > self.best:
            self.best, self.best_epoch, self.best_weights = score, epoch, snapshot(self.variables)
        self.stopped_early = val_ll is not None and epoch - self.best_epoch >= self.patience
        return self.stopped_early


def _train_epochs(loop: ResilientLoop, log_likelihood, train_x, val_x, *, num_epochs: int, steps_per_epoch: int,
                  patience: int, progress: bool) -> _Epochs:
    signature = [tf.TensorSpec([None, int(train_x.shape[1])], train_x.dtype)]

    @functools.cache
    def compiled_ll(jit: bool):
        # Compiled like the epochs: with XLA until the loop fell back to graph mode.
        return tf.function(log_likelihood, input_signature=signature, jit_compile=jit, autograph=False)

    epochs = _Epochs(loop.variables, patience)
    with progress_bar(num_epochs, "fit_to_data", progress, unit="epoch") as bar:

        def record(chunk: ChunkReport) -> bool:
            ll = compiled_ll(loop.jit_compile)
            train_ll = _mean_log_likelihood(train_x, ll)
            val_ll = None if val_x is None else _mean_log_likelihood(val_x, ll)
            stop = epochs.record(chunk.start, train_ll, val_ll)
            bar.update(1)
            bar.set_postfix(train_ll=f"{train_ll:.4g}", val_ll=f"{train_ll if val_ll is None else val_ll:.4g}")
            return stop

        loop.run(num_epochs, on_chunk=record, steps_per_unit=steps_per_epoch)
    return epochs


def _mean_log_likelihood(x: tf.Tensor, log_likelihood, block: int = 4096) -> float:
    total = 0.0
    m = int(x.shape[0])
    for lo in range(0, m, block):
        total += float(tf.reduce_sum(tf.cast(log_likelihood(x[lo : lo + block]), tf.float64)))
    return total / m




def _flow_dtype(flow: tfb.Bijector) -> tf.DType:
    config = getattr(flow, "flow_config", None)
    if isinstance(config, dict) and config.get("dtype") in ("float32", "float64"):
        return tf.as_dtype(config["dtype"])
    floats = [v.dtype for v in flow.trainable_variables if v.dtype.is_floating]
    return tf.float64 if floats and all(d == tf.float64 for d in floats) else tf.float32
