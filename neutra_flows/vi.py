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

Both loops are compiled with XLA in chunks of steps (a ``tf.while_loop`` inside
one ``tf.function(jit_compile=True)``), draw with stateless seeds derived from
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

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp
import tf_keras

from neutra_flows import _distribute
from neutra_flows._utils import as_seed, check_positive_int, split_seed
from neutra_flows.targets import Target
from neutra_flows.whitening import fit_gaussian, set_whitening, whitening_layer

tfb = tfp.bijectors
tfd = tfp.distributions

__all__ = ["DataFitResult", "FitResult", "default_learning_rate", "fit", "fit_to_data", "psis_diagnostics"]

KHAT_THRESHOLD = 0.7
# PSIS k-hat below which a Gaussian fit is already a good posterior (Yao et al. 2018).
_GAUSSIAN_GOOD_KHAT = 0.5

# A chunk in which more than this fraction of steps had to be skipped is rolled
# back and retried with a lower learning rate.
_MAX_SKIP_FRACTION = 0.5
_LR_BACKOFF = 0.25


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

    def __post_init__(self):
        # Done here rather than in fit: every FitResult's surrogate samples statelessly.
        self.surrogate = _with_stateless_sampling(self.surrogate)

    @property
    def recovered(self) -> list[str]:
        """Alias of :attr:`notes` (the name used in docs/architecture.md)."""
        return self.notes

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


# -- learning rates and optimiser ------------------------------------------------------


class _ScaledSchedule(tf_keras.optimizers.schedules.LearningRateSchedule):
    """``scale * base(step)``; ``scale`` is a variable lowered after failures."""

    def __init__(self, base: Any, scale: tf.Variable):
        self.base = base
        self.scale = scale

    def __call__(self, step):
        if callable(self.base):
            lr = self.base(step)
        else:
            lr = tf.constant(self.base, tf.float32)
        return tf.cast(lr, tf.float32) * tf.cast(self.scale, tf.float32)

    def get_config(self):
        return {"base": self.base}


def default_learning_rate(
    num_steps: int, initial: float = 1e-2, final_fraction: float = 1e-2
) -> tf_keras.optimizers.schedules.LearningRateSchedule:
    """The default of :func:`fit`: cosine decay from ``initial`` to ``initial * final_fraction``.

    A smooth variant of the NeuTra paper's piecewise schedule (x0.1 at 20 %,
    x0.01 at 80 %): it spends more steps at a high rate early, where most of the
    progress is made, and ends at the same small rate to settle the flow.
    """
    num_steps = check_positive_int(num_steps, "num_steps")
    return tf_keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=float(initial), decay_steps=num_steps, alpha=float(final_fraction)
    )


def _make_optimizer(learning_rate: Any, num_steps: int, default_initial: float, clip):
    if learning_rate is None:
        base = default_learning_rate(num_steps, default_initial)
    elif isinstance(learning_rate, tf_keras.optimizers.schedules.LearningRateSchedule):
        base = learning_rate
    elif isinstance(learning_rate, (int, float, np.floating)) and not isinstance(learning_rate, bool):
        if not (math.isfinite(float(learning_rate)) and float(learning_rate) > 0):
            raise ValueError(f"learning_rate must be positive and finite, got {learning_rate}")
        base = float(learning_rate)
    else:
        raise ValueError(
            "learning_rate must be a float, a tf_keras LearningRateSchedule or None, got "
            f"{type(learning_rate).__name__} (Keras 3 schedules are not supported: use tf_keras)"
        )
    scale = tf.Variable(1.0, dtype=tf.float32, trainable=False, name="lr_scale")
    optimizer = tf_keras.optimizers.Adam(learning_rate=_ScaledSchedule(base, scale), global_clipnorm=clip)
    return optimizer, scale


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


def _guarded_step(optimizer, variables, loss_fn):
    """One Adam step that is skipped (no parameter or optimiser-state change) when the
    loss or any gradient is not finite. ``loss_fn() -> (loss, aux)``."""
    with tf.GradientTape() as tape:
        loss, aux = loss_fn()
    grads = tape.gradient(loss, variables)
    grads = [tf.zeros_like(v) if g is None else g for g, v in zip(grads, variables, strict=True)]
    finite = tf.math.is_finite(loss)
    for g in grads:
        finite = finite & tf.reduce_all(tf.math.is_finite(g))

    def apply():
        optimizer.apply_gradients(zip(grads, variables, strict=True))
        return tf.constant(0, tf.int32)

    tf.cond(finite, apply, lambda: tf.constant(0, tf.int32))
    return loss, finite, aux


def _snapshot(variables):
    return [tf.identity(v) for v in variables]


def _restore(variables, values):
    for v, x in zip(variables, values, strict=True):
        v.assign(x)


def _all_finite(variables) -> bool:
    return all(bool(tf.reduce_all(tf.math.is_finite(v))) for v in variables if v.dtype.is_floating)


def _progress_bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", disable=not enabled, leave=False)


# -- PSIS ------------------------------------------------------------------------------


def psis_diagnostics(log_weights: Any) -> tuple[float, float, list[str]]:
    """PSIS ``(k-hat, importance ESS, notes)`` of raw log importance weights ``[n]``.

    Uses ``arviz.psislw``. Non-finite weights are handled explicitly: NaN draws
    are dropped (and reported), ``-inf`` weights (zero weight) are kept as a very
    negative finite number so the tail fit still sees them.
    """
    import arviz as az

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
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        smoothed, khat = az.psislw(lw, reff=1.0)
    smoothed = np.asarray(smoothed)
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
    if not isinstance(target, Target):
        raise ValueError(
            f"target must be a neutra_flows.Target, got {type(target).__name__}; wrap a log "
            "density with Target(log_prob_fn, event_shape) or Target.from_joint_distribution"
        )
    num_steps = check_positive_int(num_steps, "num_steps", minimum=0)
    batch_size = check_positive_int(batch_size, "batch_size")
    steps_per_chunk = check_positive_int(steps_per_chunk, "steps_per_chunk")
    num_diagnostic_draws = check_positive_int(num_diagnostic_draws, "num_diagnostic_draws")
    max_recoveries = check_positive_int(max_recoveries, "max_recoveries", minimum=0)
    d, dtype = target.event_size, target.dtype
    variables = _check_flow(flow, d, dtype)
    if strategy is not None:
        _distribute.check_strategy(strategy, batch_size, "batch_size", list(flow.variables))
    train_seed, diag_seed, check_seed = split_seed(seed, 3)
    notes: list[str] = []
    whiten_start = time.perf_counter()
    gaussian, variables = _whiten(target, flow, variables, whiten, seed, notes)
    whiten_time = time.perf_counter() - whiten_start
    if skip_training_if_gaussian and gaussian is not None and gaussian.khat < _GAUSSIAN_GOOD_KHAT:
        num_steps = 0
        skipped_reason = (f"not trained: the whitening Gaussian already fits (PSIS k-hat {gaussian.khat:.2f} "
                          f"< {_GAUSSIAN_GOOD_KHAT}); pass skip_training_if_gaussian=False to train the flow")
    else:
        skipped_reason = ""

    # Look at the first points the target will be given: the flow's image of the
    # base mode and a few draws. NaN / +inf / bad shapes fail here, loudly.
    u0 = tf.concat([tf.zeros([1, d], dtype), tf.random.stateless_normal([7, d], check_seed, dtype=dtype)], 0)
    target.check(flow.forward(u0))

    base = tfd.MultivariateNormalDiag(tf.zeros([d], dtype), tf.ones([d], dtype))

    def neg_elbo_terms(step_seed, n):
        u = tf.random.stateless_normal([n, d], step_seed, dtype=dtype)
        z = flow.forward(u)
        log_q = base.log_prob(u) - flow.forward_log_det_jacobian(u, event_ndims=1)
        log_p = target.unnormalized_log_prob(z)
        return log_q, log_p

    losses = np.full([num_steps], np.nan)
    stop_reason = skipped_reason or "num_steps=0"
    start = time.perf_counter()
    if num_steps > 0 and not variables:
        notes.append("the flow has no trainable variables: nothing to train")
    elif num_steps > 0:
        # Under a strategy the optimiser's variables are mirrored like the flow's.
        with _distribute.scope(strategy):
            optimizer, lr_scale = _make_optimizer(learning_rate, num_steps, 1e-2, global_clipnorm)
            # Create the optimiser's variables before compiling.
            optimizer.build(variables)
        opt_variables = list(optimizer.variables)

        def one_step(step, attempt):
            # A retried chunk (after a rollback) draws fresh points: a failure caused
            # by the draws themselves is not replayed identically.
            attempt_seed = tf.random.experimental.stateless_fold_in(train_seed, attempt)
            step_seed = tf.random.experimental.stateless_fold_in(attempt_seed, step)

            def loss_fn():
                log_q, log_p = neg_elbo_terms(step_seed, batch_size)
                return tf.reduce_mean(log_q - log_p), (log_q, log_p)

            loss, finite, (log_q, log_p) = _guarded_step(optimizer, variables, loss_fn)
            # 1: log p NaN, 2: log p = -inf, 4: log p = +inf, 8: log q not finite.
            code = (
                tf.cast(tf.reduce_any(tf.math.is_nan(log_p)), tf.int32)
                + 2 * tf.cast(tf.reduce_any(tf.equal(log_p, -np.inf)), tf.int32)
                + 4 * tf.cast(tf.reduce_any(tf.equal(log_p, np.inf)), tf.int32)
                + 8 * tf.cast(tf.reduce_any(~tf.math.is_finite(log_q)), tf.int32)
            )
            return loss, finite, code

        def run_chunk(first_step, count, attempt):
            def body(i, buf, skipped, first_bad, code_or):
                loss, finite, code = one_step(first_step + i, attempt)
                buf = tf.tensor_scatter_nd_update(buf, [[i]], tf.cast([loss], tf.float64))
                bad = tf.logical_not(finite)
                skipped += tf.cast(bad, tf.int32)
                first_bad = tf.where(bad & (first_bad < 0), first_step + i, first_bad)
                return i + 1, buf, skipped, first_bad, tf.bitwise.bitwise_or(code_or, code)

            init = (
                tf.constant(0),
                tf.zeros([steps_per_chunk], tf.float64),
                tf.constant(0),
                tf.constant(-1),
                tf.constant(0),
            )
            _, buf, skipped, first_bad, code = tf.while_loop(
                lambda i, *_: i < count, body, init, maximum_iterations=steps_per_chunk
            )
            return buf, skipped, first_bad, code

        compiled = tf.function(run_chunk, jit_compile=jit_compile, autograph=False)
        if strategy is not None:
            compiled = _distribute.fit_chunk(strategy, target, flow, variables, optimizer,
                                             batch_size=batch_size, train_seed=train_seed,
                                             steps_per_chunk=steps_per_chunk)
        bar = _progress_bar(num_steps, f"fit {target.name}", progress)
        rule = _StoppingRule(num_steps, lr_scale, early_stopping)
        recoveries = 0
        step = 0
        try:
            while step < num_steps:
                count = min(steps_per_chunk, num_steps - step)
                params_before = _snapshot(variables)
                opt_before = _snapshot(opt_variables)
                try:
                    buf, skipped, first_bad, code = compiled(
                        tf.constant(step), tf.constant(count), tf.constant(recoveries)
                    )
                except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError) as err:
                    if not jit_compile or step > 0 or "XLA" not in str(err).upper():
                        raise
                    jit_compile = False
                    notes.append(
                        "XLA could not compile the training step; fell back to graph mode "
                        f"(first line of the error: {str(err).splitlines()[0][:200]})"
                    )
                    compiled = tf.function(run_chunk, jit_compile=False, autograph=False)
                    _restore(variables, params_before)
                    _restore(opt_variables, opt_before)
                    continue
                skipped = int(skipped)
                chunk_losses = buf.numpy()[:count]
                params_ok = _all_finite(variables)
                if params_ok and skipped <= _MAX_SKIP_FRACTION * count:
                    if skipped:
                        notes.append(
                            f"steps {step}-{step + count - 1}: {skipped} of {count} steps had "
                            f"a non-finite loss or gradient ({_describe(int(code))}) and were "
                            "skipped"
                        )
                    losses[step : step + count] = chunk_losses
                    step += count
                    bar.update(count)
                    finite_losses = chunk_losses[np.isfinite(chunk_losses)]
                    if finite_losses.size:
                        bar.set_postfix(loss=f"{finite_losses[-min(10, finite_losses.size) :].mean():.4g}")
                    if rule.update(step, chunk_losses):
                        break
                    continue
                # Too many failures in this chunk: roll back and lower the learning rate.
                _restore(variables, params_before)
                _restore(opt_variables, opt_before)
                bad_step = int(first_bad) if int(first_bad) >= 0 else step
                if recoveries >= max_recoveries:
                    raise RuntimeError(
                        f"fit({target.name}): non-finite loss or gradient at step {bad_step} "
                        f"({_describe(int(code))}) persisted after {recoveries} rollbacks with "
                        f"learning-rate reductions (now x{float(lr_scale.numpy()):.3g}). The flow "
                        f"was left at its parameters before step {step}. Check the target for "
                        "NaN regions, add a constraining bijector, or lower learning_rate."
                    )
                recoveries += 1
                lr_scale.assign(lr_scale * _LR_BACKOFF)
                notes.append(
                    f"step {bad_step}: non-finite loss or gradient ({_describe(int(code))}) in "
                    f"{skipped} of {count} steps; rolled back to step {step} and lowered the "
                    f"learning rate to x{float(lr_scale.numpy()):.3g} of the schedule"
                )
        finally:
            bar.close()
        losses = losses[:step]
        notes.extend(rule.notes)
        stop_reason = rule.reason or rule.budget_reason(step)
    wall_time = time.perf_counter() - start + whiten_time

    # Diagnostics on fresh draws, in blocks to bound memory.
    log_w = []
    block = max(1, min(num_diagnostic_draws, 4096))
    # One pass per block: eager execution is cheaper than tracing a new graph.
    for i, lo in enumerate(range(0, num_diagnostic_draws, block)):
        n = min(block, num_diagnostic_draws - lo)
        log_q, log_p = neg_elbo_terms(tf.random.experimental.stateless_fold_in(diag_seed, i), n)
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
    khat, ess, psis_notes = psis_diagnostics(log_w)
    notes.extend(psis_notes)

    constraining = target.constraining_bijector
    surrogate = tfd.TransformedDistribution(
        base, tfb.Chain([constraining, flow]), name=f"{target.name}_surrogate"
    )
    return FitResult(
        flow=flow,
        surrogate=surrogate,
        losses=losses,
        wall_time=wall_time,
        elbo=elbo,
        elbo_se=elbo_se,
        khat=khat,
        ess_is=ess,
        num_steps=len(losses),
        notes=notes,
        num_diagnostic_draws=num_diagnostic_draws,
        log_weights=log_w,
        target_name=target.name,
        whitening=gaussian,
        stop_reason=stop_reason,
        num_grad_evals=(0 if gaussian is None else gaussian.num_grad_evals) + len(losses) * batch_size
        + num_diagnostic_draws,
    )


def _whiten(target, flow, variables, whiten: bool, seed, notes: list[str]):
    """Sets the flow's whitening layer from a Gaussian fit; returns ``(fit, variables to train)``."""
    layer = whitening_layer(flow)
    if not whiten or layer is None:
        return None, variables
    # A seed of its own (folded in, not split) leaves the training's seeds as they were.
    gaussian = fit_gaussian(
        target,
        seed=tf.random.experimental.stateless_fold_in(as_seed(seed), 0x57484954),
        full_rank=hasattr(layer, "tril_params"),
    )
    set_whitening(layer, gaussian)
    notes.extend(f"whitening: {n}" for n in gaussian.notes)
    frozen = {id(v) for v in layer.trainable_variables}
    return gaussian, [v for v in variables if id(v) not in frozen]


class _StoppingRule:
    """Plateau rule on chunk means: lower the learning rate 10x twice, then stop.

    A chunk improves when its mean loss is below the best chunk mean by more
    than two standard errors of the difference (the steps' losses are
    independent Monte Carlo estimates). It starts judging after 20 % of the
    budget (at least 3 chunks), so the early, fast descent is never cut short.
    """

    patience = 3
    max_decays = 2

    def __init__(self, num_steps: int, lr_scale: tf.Variable, enabled: bool):
        self.num_steps, self.lr_scale, self.enabled = num_steps, lr_scale, enabled
        self.best, self.best_se, self.stale, self.decays = math.inf, 0.0, 0, 0
        self.last_gain = math.nan
        self.reason, self.notes = "", []
        self.seen = 0

    def update(self, step: int, chunk_losses: np.ndarray) -> bool:
        """Records a finished chunk (``step`` = steps done); True means stop now."""
        finite = chunk_losses[np.isfinite(chunk_losses)]
        self.seen += 1
        if finite.size < 10:
            return False
        mean, se = float(finite.mean()), float(finite.std() / math.sqrt(finite.size))
        threshold = 2.0 * math.sqrt(se**2 + self.best_se**2)
        self.last_gain = self.best - mean
        if self.last_gain > threshold or not math.isfinite(self.best):
            self.best, self.best_se, self.stale = mean, se, 0
            return False
        self.stale += 1
        if not self.enabled or step < max(0.2 * self.num_steps, 3) or self.stale < self.patience:
            return False
        if self.decays < self.max_decays:
            self.decays += 1
            self.stale = 0
            self.lr_scale.assign(self.lr_scale * 0.1)
            self.notes.append(f"step {step}: the loss stopped improving; learning rate lowered 10x")
            return False
        self.reason = (f"converged at step {step} of {self.num_steps}: no improvement beyond two "
                       f"standard errors (best chunk mean {self.best:.4g} +/- {self.best_se:.2g}) in "
                       f"{self.patience} chunks after {self.max_decays} learning-rate reductions")
        return True

    def budget_reason(self, step: int) -> str:
        if self.stale == 0 and math.isfinite(self.last_gain) and self.seen > 1:
            return (f"budget of {self.num_steps} steps reached while the loss was still improving "
                    f"(last chunk {self.last_gain:.3g} below the best before): more steps may help")
        return f"budget of {self.num_steps} steps reached"


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


# -- maximum likelihood fit ------------------------------------------------------------


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

    Returns:
      A :class:`DataFitResult`; the flow holds the best epoch's weights.
    """
    x = np.asarray(data)
    if x.ndim != 2 or x.shape[0] < 2 or x.shape[1] < 1:
        raise ValueError(f"data must be an [n, d] array with n >= 2, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("data contains NaN or inf values")
    if num_epochs is not None and num_steps is not None:
        raise ValueError("give num_epochs or num_steps, not both")
    if not (0.0 <= float(validation_fraction) < 1.0):
        raise ValueError(f"validation_fraction must lie in [0, 1), got {validation_fraction}")
    batch_size = check_positive_int(batch_size, "batch_size")
    patience = check_positive_int(patience, "patience")
    n, d = x.shape
    dtype = _flow_dtype(flow)
    variables = _check_flow(flow, d, dtype)
    if not variables:
        raise ValueError("the flow has no trainable variables")

    shuffle_seed, train_seed = split_seed(seed, 2)
    perm = np.argsort(tf.random.stateless_uniform([n], shuffle_seed, dtype=tf.float64).numpy(), kind="stable")
    n_val = int(round(float(validation_fraction) * n))
    if validation_fraction > 0 and n_val < 1:
        n_val = 1
    if n - n_val < 1:
        raise ValueError("no training data left after the validation split")
    val_x = tf.constant(x[perm[:n_val]], dtype) if n_val else None
    train_x = tf.constant(x[perm[n_val:]], dtype)
    n_train = n - n_val
    batch = min(batch_size, n_train)
    steps_per_epoch = n_train // batch
    if num_steps is not None:
        num_steps = check_positive_int(num_steps, "num_steps")
        num_epochs = math.ceil(num_steps / steps_per_epoch)
    num_epochs = 100 if num_epochs is None else check_positive_int(num_epochs, "num_epochs")

    base = tfd.MultivariateNormalDiag(tf.zeros([d], dtype), tf.ones([d], dtype))

    def log_likelihood(xb):
        u = flow.inverse(xb)
        return base.log_prob(u) + flow.inverse_log_det_jacobian(xb, event_ndims=1)

    total_steps = num_epochs * steps_per_epoch
    optimizer, lr_scale = _make_optimizer(learning_rate, total_steps, 1e-3, global_clipnorm)
    optimizer.build(variables)
    opt_variables = list(optimizer.variables)

    def run_epoch(epoch, attempt):
        attempt_seed = tf.random.experimental.stateless_fold_in(train_seed, attempt)
        epoch_seed = tf.random.experimental.stateless_fold_in(attempt_seed, epoch)
        order = tf.argsort(tf.random.stateless_uniform([n_train], epoch_seed))
        order = tf.reshape(order[: steps_per_epoch * batch], [steps_per_epoch, batch])

        def body(i, skipped):
            xb = tf.gather(train_x, order[i])

            def loss_fn():
                return -tf.reduce_mean(log_likelihood(xb)), ()

            _, finite, _ = _guarded_step(optimizer, variables, loss_fn)
            return i + 1, skipped + tf.cast(~finite, tf.int32)

        _, skipped = tf.while_loop(lambda i, _: i < steps_per_epoch, body, (tf.constant(0), tf.constant(0)))
        return skipped

    eval_block = 4096

    def mean_ll(data_tensor, fn):
        total = 0.0
        m = int(data_tensor.shape[0])
        for lo in range(0, m, eval_block):
            total += float(tf.reduce_sum(tf.cast(fn(data_tensor[lo : lo + eval_block]), tf.float64)))
        return total / m

    compiled_epoch = tf.function(run_epoch, jit_compile=jit_compile, autograph=False)
    ll_signature = [tf.TensorSpec([None, d], dtype)]
    compiled_ll = tf.function(
        log_likelihood, input_signature=ll_signature, jit_compile=jit_compile, autograph=False
    )
    notes: list[str] = []
    train_ll, val_ll = [], []
    best, best_epoch, best_weights = -np.inf, 0, _snapshot(variables)
    stopped_early = False
    recoveries = 0
    start = time.perf_counter()
    bar = _progress_bar(num_epochs, "fit_to_data", progress)
    bar.unit = "epoch"
    epoch = 0
    try:
        while epoch < num_epochs:
            params_before = _snapshot(variables)
            opt_before = _snapshot(opt_variables)
            try:
                skipped = int(compiled_epoch(tf.constant(epoch), tf.constant(recoveries)))
            except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError) as err:
                if not jit_compile or epoch > 0 or "XLA" not in str(err).upper():
                    raise
                jit_compile = False
                notes.append("XLA could not compile the training step; fell back to graph mode")
                compiled_epoch = tf.function(run_epoch, jit_compile=False, autograph=False)
                compiled_ll = tf.function(
                    log_likelihood, input_signature=ll_signature, jit_compile=False, autograph=False
                )
                _restore(variables, params_before)
                _restore(opt_variables, opt_before)
                continue
            if skipped > _MAX_SKIP_FRACTION * steps_per_epoch or not _all_finite(variables):
                _restore(variables, params_before)
                _restore(opt_variables, opt_before)
                if recoveries >= 5:
                    raise RuntimeError(
                        f"fit_to_data: non-finite loss or gradient in epoch {epoch} persisted "
                        "after 5 rollbacks with learning-rate reductions"
                    )
                recoveries += 1
                lr_scale.assign(lr_scale * _LR_BACKOFF)
                notes.append(
                    f"epoch {epoch}: {skipped} of {steps_per_epoch} steps non-finite; rolled back "
                    f"and lowered the learning rate to x{float(lr_scale.numpy()):.3g}"
                )
                continue
            if skipped:
                notes.append(f"epoch {epoch}: {skipped} non-finite steps skipped")
            train_ll.append(mean_ll(train_x, compiled_ll))
            score = train_ll[-1]
            if val_x is not None:
                val_ll.append(mean_ll(val_x, compiled_ll))
                score = val_ll[-1]
            if np.isfinite(score) and score > best:
                best, best_epoch, best_weights = score, epoch, _snapshot(variables)
            bar.update(1)
            bar.set_postfix(train_ll=f"{train_ll[-1]:.4g}", val_ll=f"{score:.4g}")
            epoch += 1
            if val_x is not None and epoch - 1 - best_epoch >= patience:
                stopped_early = True
                break
    finally:
        bar.close()
    _restore(variables, best_weights)
    wall_time = time.perf_counter() - start
    return DataFitResult(
        flow=flow,
        distribution=tfd.TransformedDistribution(base, flow, name="fitted_flow"),
        train_log_likelihood=np.asarray(train_ll),
        validation_log_likelihood=np.asarray(val_ll) if val_x is not None else None,
        best_epoch=best_epoch,
        num_epochs=len(train_ll),
        num_steps=len(train_ll) * steps_per_epoch,
        wall_time=wall_time,
        stopped_early=stopped_early,
        notes=notes,
    )


def _flow_dtype(flow: tfb.Bijector) -> tf.DType:
    config = getattr(flow, "flow_config", None)
    if isinstance(config, dict) and config.get("dtype") in ("float32", "float64"):
        return tf.as_dtype(config["dtype"])
    floats = [v.dtype for v in flow.trainable_variables if v.dtype.is_floating]
    return tf.float64 if floats and all(d == tf.float64 for d in floats) else tf.float32
