"""Whitening: a Gaussian fit of the target that the nonlinear flow is trained on top of.

Adam started from the identity does not reach posterior scales thousands apart
with correlations near -1 in any sane budget (an uncentred regression has an
intercept sd near 30 and a slope sd near 0.0075). A quasi-Newton method does.
:func:`fit_gaussian` finds ``q = N(m, L L^T)`` in three steps:

1. **MAP** by L-BFGS (SciPy's L-BFGS-B on a compiled TensorFlow objective)
   from several starts (the origin and ``Uniform(-2, 2)^d`` draws, as Stan
   initialises). When no start converges, a few thousand Adam steps
   (diagonally preconditioned, so robust to bad scales) move the starts first
   and L-BFGS runs again.
2. **Laplace**: ``L = chol(H^{-1})`` with ``H`` the Hessian of ``-log p`` at the
   MAP, when ``H`` is positive definite and its condition number below 1e14.
   Otherwise the model has no MAP (centred eight schools, a funnel: the
   density is unbounded as a scale goes to 0, and L-BFGS stops deep in the
   neck) and the whitening is the identity: a Gaussian fitted there is a worse
   start for the flow than none (measured on the 100-D funnel: 22 NeuTra
   divergences in 4000 against 5, and half the ESS per gradient).
3. **Deterministic ADVI** (Giordano, Ingram and Broderick 2023): fix ``M`` base
   draws ``u_j`` and maximise ``mean_j log p(m + L u_j) + log|det L|`` with
   L-BFGS, started from the Laplace fit and from ``N(0, I)``. Full rank for
   ``d <= 32``; above, mean-field (a full-rank one overfits its fixed draws
   there).

Every candidate's ELBO, the identity ``N(0, I)`` included, is estimated on 2048
fresh draws and the best one is kept (the restarts: four MAP starts,
two DADVI starts, Laplace and the identity), so a Laplace fit that misses the
skew or a DADVI run that failed loses (``dadvi="when_needed"`` and fewer
draws make a lean stage for the flow adaptation: see :func:`fit_gaussian`).
``L`` is full rank for ``d <= FULL_RANK_MAX_DIM``; above it, diagonal.

The result sets the ``whitening`` layer of a flow from
:func:`neutra_flows.make_flow` (an :class:`~neutra_flows.bijectors.AffineLowerTriangular`
on the output side), which :func:`neutra_flows.fit` does before it trains the
rest of the flow; the flow then only has to learn what is not Gaussian.

References
----------
* Giordano, R., Ingram, M. and Broderick, T. "Black box variational inference
  with a deterministic objective: faster, more accurate, and even more black box."
  JMLR 2024, arXiv:2304.05527.
* Nocedal, J. and Wright, S. "Numerical Optimization", 2nd ed., 2006 (L-BFGS).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp
import tf_keras

from neutra_flows._timing import Laps
from neutra_flows._utils import as_seed, check_positive_int, one_blas_thread, split_seed

tfd = tfp.distributions

__all__ = ["DADVI_MODES", "FULL_RANK_MAX_DIM", "GaussianFit", "fit_gaussian", "whitening_layer"]

# Full-rank L has d (d + 1) / 2 parameters and DADVI needs M >= d fixed draws to
# pin them down; above this size the whitening is diagonal.
FULL_RANK_MAX_DIM = 200
_LBFGS_ITERATIONS = 500
_ADAM_RESCUE_STEPS = 3000
_ELBO_DRAWS = 2048
# Full-rank DADVI needs M > d fixed draws and still overfits them as d grows
# (German credit, d = 51, M = 102: ELBO 578 on the fixed draws, -11550 on fresh
# ones). Above this size its candidate is mean-field, M = 32; the Laplace
# candidate stays full rank.
_DADVI_FULL_RANK_MAX_DIM = 32
_DADVI_ITERATIONS = 300
# Real posteriors here reach 1e9 (an uncentred regression in float32); a funnel's
# neck gives 1e18 and more.
_MAX_LAPLACE_CONDITION = 1e14
#: ``fit_gaussian(dadvi=...)``: DADVI always, or only where the Laplace fit is not good enough.
DADVI_MODES = ("always", "when_needed")
# PSIS's threshold of a reliable importance-sampling fit (Vehtari et al.).
_LAPLACE_GOOD_KHAT = 0.7


@dataclass
class GaussianFit:
    """What :func:`fit_gaussian` returns.

    Attributes:
      loc, scale_tril: ``m`` ``[d]`` and lower-triangular ``L`` ``[d, d]`` (float64).
      method: which candidate won (``"identity"``, ``"laplace"``,
        ``"dadvi from laplace"``, ``"dadvi from N(0, I)"``).
      elbo, elbo_se: the winner's ELBO on fresh draws and its standard error.
      map_found: whether a MAP with a positive-definite Hessian was found.
      num_grad_evals: target gradients (and values) spent, all stages together.
      notes: what happened (no MAP, failed searches, candidates' ELBOs).
      khat: the winner's PSIS k-hat on the fresh draws: below 0.5 the Gaussian
        is already a good approximation of the posterior.
      phase_times: seconds per stage (``"map search"``, ``"laplace"``,
        ``"scoring"`` (the candidates' ELBO and k-hat), ``"dadvi"``), each
        including its compilation.
    """

    loc: np.ndarray
    scale_tril: np.ndarray
    method: str
    elbo: float
    elbo_se: float
    map_found: bool
    num_grad_evals: int
    notes: list[str] = field(default_factory=list)
    khat: float = math.nan
    phase_times: dict[str, float] = field(default_factory=dict)


class _Counter:
    """Counts target evaluations; L-BFGS reports its own, Adam and the rest are added."""

    def __init__(self):
        self.n = 0

    def add(self, k: int) -> None:
        self.n += int(k)


def _neg_log_prob_and_grad(target):
    def fn(z):
        return tfp.math.value_and_gradient(lambda x: -target.unnormalized_log_prob(x), z)

    return fn


@dataclass
class _Minimum:
    """L-BFGS end points for a batch of starts (the fields TFP's optimizer results use)."""

    position: np.ndarray
    objective_value: np.ndarray
    converged: np.ndarray
    num_objective_evaluations: int
    # fn, compiled for one point [1, p]: the Laplace fit reuses it.
    compiled: Any = None


def _lbfgs(fn, start, max_iterations: int) -> _Minimum:
    """SciPy's L-BFGS-B from each start of a batch ``[k, p]``, on a compiled ``fn``.

    ``fn(x [k, p]) -> (value [k], grad [k, p])`` is traced once (graph mode) and
    called per start; the quasi-Newton loop itself runs in SciPy.
    Tracing TFP's ``lbfgs_minimize`` (its Hager-Zhang line search) took 10-30 s
    per call on a 2-core CPU, against well under a second of actual work on
    the posteriordb models.
    """
    from scipy.optimize import minimize

    start = tf.convert_to_tensor(start)
    dtype = start.dtype
    compiled = _compile(fn, tf.TensorSpec([1, start.shape[-1]], dtype))
    evaluations = 0

    def value_and_grad(x):
        nonlocal evaluations
        evaluations += 1
        value, grad = compiled(tf.constant(x[np.newaxis], dtype))
        value, grad = float(value[0]), np.asarray(grad[0], np.float64)
        if not (math.isfinite(value) and np.all(np.isfinite(grad))):
            # L-BFGS-B's line search backs off from an infinite value.
            return math.inf, np.zeros_like(grad)
        return value, grad

    ends, values, converged = [], [], []
    for x0 in np.asarray(start, np.float64):
        res = minimize(value_and_grad, x0, jac=True, method="L-BFGS-B",
                       options=dict(maxiter=max_iterations, maxcor=20, ftol=1e-12, gtol=1e-7))
        ends.append(res.x)
        values.append(float(res.fun))
        # ABNORMAL_TERMINATION at a tiny gradient is the float limit, not a failure.
        small = bool(np.all(np.isfinite(res.jac))) and float(np.max(np.abs(res.jac))) < 1e-3 * max(
            1.0, abs(float(res.fun)))
        converged.append(bool(res.success) or small)
    return _Minimum(np.stack(ends), np.asarray(values), np.asarray(converged), evaluations, compiled)


def _compile(fn, spec: tf.TensorSpec):
    """``fn`` as a graph-mode tf.function for one point.

    Not XLA: L-BFGS calls it a few hundred times, and XLA's compilation cost
    more than it saved on every model measured (whitening stage, this 2-core
    CPU: garch11 6.6 s with XLA against 2.2 s, arma11 2.8 against 1.5, the
    102-D Cox process 5.2 against 1.6, the 501-D item-response model 5.7
    against 4.8, kidiq 0.9 against 0.7).
    """
    return tf.function(fn, autograph=False, input_signature=[spec])


def _adam_rescue(fn, start, steps: int):
    """Adam on ``fn`` from each start (a batch): moves badly scaled starts towards a mode."""
    x = tf.Variable(start)
    opt = tf_keras.optimizers.Adam(learning_rate=0.05)
    opt.build([x])

    def body(i):
        value, grad = fn(x)
        grad = tf.where(tf.math.is_finite(grad), grad, tf.zeros_like(grad))
        opt.apply_gradients([(grad, x)])
        return i + 1

    tf.function(lambda: tf.while_loop(lambda i: i < steps, body, [0]), autograph=False)()
    return tf.convert_to_tensor(x)


def _find_map(target, seed, num_starts: int, counter: _Counter, notes: list[str]):
    """L-BFGS for the MAP from each start; the best converged one wins.

    Returns ``(z_map [d] or None, lp, compiled)``: ``compiled`` is ``-log p`` and its
    gradient at one point ``[1, d]`` as L-BFGS ran it (None without a start), which
    the Laplace fit reuses.
    """
    d, dtype = target.event_size, target.dtype
    fn = _neg_log_prob_and_grad(target)
    starts = tf.concat(
        [tf.zeros([1, d], dtype),
         tf.random.stateless_uniform([num_starts - 1, d], seed, minval=-2.0, maxval=2.0, dtype=dtype)], 0)
    value = -target.unnormalized_log_prob(starts).numpy()
    starts = tf.boolean_mask(starts, np.isfinite(value))
    if starts.shape[0] == 0:
        notes.append("MAP search: the log density is not finite at any start")
        return None, None, None
    result = _lbfgs(fn, starts, _LBFGS_ITERATIONS)
    counter.add(result.num_objective_evaluations)
    if not np.any(result.converged):
        result = _lbfgs(fn, _adam_rescue(fn, starts, _ADAM_RESCUE_STEPS), _LBFGS_ITERATIONS)
        counter.add(_ADAM_RESCUE_STEPS * starts.shape[0] + result.num_objective_evaluations)
        notes.append(f"MAP search: L-BFGS did not converge from the starts; {_ADAM_RESCUE_STEPS} Adam "
                     "steps moved them first")
    ok = result.converged & np.isfinite(result.objective_value)
    if not ok.any():
        notes.append("MAP search: no start converged (a hierarchical model has no MAP: its density is "
                     "unbounded as a scale goes to 0); whitening starts from N(0, I) instead")
        return None, None, result.compiled
    values = np.where(ok, result.objective_value, np.inf)
    best = int(np.argmin(values))
    return tf.constant(result.position[best], dtype), -float(values[best]), result.compiled


def _laplace_tril(target, z_map, counter: _Counter, notes: list[str], compiled=None) -> np.ndarray | None:
    """``chol(H^{-1})`` at the MAP, or None when ``H`` is not positive definite."""
    if compiled is not None and target.dtype == tf.float64:
        hessian = _hessian_by_differences(compiled, np.asarray(z_map, np.float64))
    else:
        hessian = _hessian_by_autodiff(target, z_map)
    counter.add(2 * target.event_size)
    hessian = 0.5 * (hessian + hessian.T)
    if not np.all(np.isfinite(hessian)):
        notes.append("Laplace: the Hessian at the MAP is not finite")
        return None
    eigval, eigvec = np.linalg.eigh(hessian)
    if eigval.min() <= 0:
        notes.append(f"Laplace: the Hessian at the MAP is not positive definite (smallest eigenvalue "
                     f"{eigval.min():.3g}); the MAP is a saddle or lies on a ridge")
        return None
    condition = eigval.max() / eigval.min()
    if condition > _MAX_LAPLACE_CONDITION:
        notes.append(f"Laplace: the Hessian at the 'MAP' has condition number {condition:.3g}: a point deep in "
                     "a funnel's neck, not a mode")
        return None
    cov = (eigvec / eigval) @ eigvec.T
    notes.append(f"Laplace: condition number of the posterior covariance {condition:.3g}")
    return np.linalg.cholesky(0.5 * (cov + cov.T))


def _hessian_by_autodiff(target, z_map) -> np.ndarray:
    """``-d^2 log p / dz^2`` at ``z_map`` by a Jacobian of the gradient (eager)."""
    z = tf.convert_to_tensor(z_map)[tf.newaxis]
    with tf.GradientTape() as outer:
        outer.watch(z)
        with tf.GradientTape() as inner:
            inner.watch(z)
            lp = target.unnormalized_log_prob(z)
        grad = inner.gradient(lp, z)
    return -np.asarray(outer.batch_jacobian(grad, z)[0], np.float64)


def _hessian_by_differences(compiled, z_map: np.ndarray) -> np.ndarray:
    """``-d^2 log p / dz^2`` at ``z_map`` by central differences of the compiled gradient.

    ``compiled`` is L-BFGS's ``-log p`` and gradient, already compiled: 2 d calls
    of it cost milliseconds, where tracing or running the autodiff Hessian eagerly
    took 7 s on arma11 (its recursion is a scan of many small ops) and 0.8 s on
    kidiq. The step ``eps^(1/3) max(1, |z_i|)`` balances truncation against
    rounding; in float64 the error is about 1e-10 relative, far below what a
    preconditioner needs (float32 targets take the autodiff path).
    """
    d = z_map.size
    steps = np.finfo(np.float64).eps ** (1 / 3) * np.maximum(1.0, np.abs(z_map))
    points = np.concatenate([z_map + np.diag(steps), z_map - np.diag(steps)])
    grads = np.stack([np.asarray(compiled(tf.constant(p[np.newaxis], tf.float64))[1][0]) for p in points])
    # compiled's gradient is that of -log p: its differences give -d^2 log p directly.
    return ((grads[:d] - grads[d:]) / (2 * steps[:, np.newaxis])).T


def _pack(loc: np.ndarray, tril: np.ndarray, full_rank: bool) -> np.ndarray:
    raw = np.tril(tril, -1) + np.diag(np.log(np.diag(tril)))
    if not full_rank:
        return np.concatenate([loc, np.diag(raw)])
    return np.concatenate([loc, tfp.math.fill_triangular_inverse(raw).numpy()])


def _unpack(theta, d: int, full_rank: bool):
    loc, rest = theta[..., :d], theta[..., d:]
    if not full_rank:
        return loc, tf.linalg.diag(tf.exp(rest))
    raw = tfp.math.fill_triangular(rest)
    return loc, tf.linalg.set_diag(raw, tf.exp(tf.linalg.diag_part(raw)))


def _dadvi(target, thetas0: np.ndarray, u_fixed, full_rank: bool, counter: _Counter) -> np.ndarray:
    """L-BFGS on the fixed-draw ELBO from each start of ``[k, p]``.

    Returns the end points ``[k, p]``; a start that ended non-finite has NaNs.
    """
    d, dtype = target.event_size, target.dtype

    def objective(theta):
        def f(t):
            loc, tril = _unpack(t, d, full_rank)  # [k, d], [k, d, d]
            z = loc[:, tf.newaxis, :] + tf.einsum("kij,mj->kmi", tril, u_fixed)
            lp = target.unnormalized_log_prob(z)
            value = -(tf.reduce_mean(lp, -1) + tf.reduce_sum(tf.math.log(tf.linalg.diag_part(tril)), -1))
            # L-BFGS's line search backs off from non-finite values.
            return tf.where(tf.math.is_finite(value), value, tf.constant(np.inf, dtype))

        return tfp.math.value_and_gradient(f, theta)

    result = _lbfgs(objective, tf.constant(thetas0, dtype), _DADVI_ITERATIONS)
    counter.add(result.num_objective_evaluations * int(u_fixed.shape[0]))
    theta = result.position
    ok = np.all(np.isfinite(theta), axis=-1) & np.isfinite(result.objective_value)
    return np.where(ok[:, np.newaxis], theta, np.nan)


def _fresh_elbo(target, loc, tril, seed, counter: _Counter,
                num_draws: int = _ELBO_DRAWS) -> tuple[float, float, float]:
    """``(ELBO, its standard error, PSIS k-hat)`` of ``N(loc, tril tril^T)`` on fresh draws."""
    d, dtype = target.event_size, target.dtype
    u = tf.random.stateless_normal([num_draws, d], seed, dtype=dtype)
    z = tf.constant(loc, dtype) + tf.linalg.matvec(tf.constant(tril, dtype), u)
    log_q = tfd.MultivariateNormalTriL(tf.constant(loc, dtype), tf.constant(tril, dtype)).log_prob(z)
    log_w = np.asarray(target.unnormalized_log_prob(z) - log_q, np.float64)
    counter.add(num_draws)
    if not np.all(np.isfinite(log_w)):
        return -math.inf, math.inf, math.inf
    return float(log_w.mean()), float(log_w.std() / math.sqrt(log_w.size)), _khat(log_w)


def _khat(log_w: np.ndarray) -> float:
    # The one PSIS implementation (vi imports this module, so import it here).
    from neutra_flows.vi import psis_diagnostics

    return psis_diagnostics(log_w)[0]


@one_blas_thread
def fit_gaussian(
    target: Any,
    *,
    seed: Any,
    full_rank: bool | None = None,
    num_starts: int = 4,
    num_fixed_draws: int | None = None,
    num_elbo_draws: int = _ELBO_DRAWS,
    dadvi: str = "always",
) -> GaussianFit:
    """Fits ``N(m, L L^T)`` to ``target`` by MAP, Laplace and deterministic ADVI (see module).

    Args:
      target: a :class:`~neutra_flows.Target`.
      seed: an int or stateless seed (starts, fixed draws, fresh ELBO draws).
      full_rank: full ``L`` (default when ``d <= FULL_RANK_MAX_DIM``) or diagonal.
      num_starts: MAP starts (the origin, then Uniform(-2, 2) draws).
      num_fixed_draws: DADVI's ``M``; default ``max(32, 2 d)`` for a full-rank
        DADVI (fewer than ``d`` draws leave directions the objective cannot
        see), 32 for a mean-field one (``d > 32``, or ``full_rank=False``).
      num_elbo_draws: fresh draws per candidate for its ELBO and PSIS k-hat
        (at least 2048 for the identity where no MAP exists: its k-hat says
        whether the target is Gaussian-like at all).
      dadvi: ``"always"`` (default): DADVI from the Laplace fit and from
        ``N(0, I)``, then every candidate is scored. ``"when_needed"``: the
        identity and the Laplace fit are scored first, and DADVI runs (from the
        Laplace fit only) when Laplace loses or fails PSIS (k-hat >=
        0.7). DADVI and the scoring were 80-95 % of this function's
        gradients on the posteriordb regressions (kidiq: 20,320 and 8,192 of
        28,783), where the Laplace fit already has k-hat 0.1-0.2; the flow
        adaptation on the draws, which refines the start anyway, uses it.

    Returns:
      A :class:`GaussianFit`. Never raises for a hard target: when every
      candidate fails, the result is ``N(0, I)`` with a note saying so.
    """
    if dadvi not in DADVI_MODES:
        raise ValueError(f"dadvi must be one of {DADVI_MODES}, got {dadvi!r}")
    num_elbo_draws = check_positive_int(num_elbo_draws, "num_elbo_draws", minimum=2)
    d, dtype = target.event_size, target.dtype
    full_rank = d <= FULL_RANK_MAX_DIM if full_rank is None else bool(full_rank)
    dadvi_full_rank = full_rank and d <= _DADVI_FULL_RANK_MAX_DIM
    if num_fixed_draws is None:
        num_fixed_draws = max(32, 2 * d) if dadvi_full_rank else 32
    map_seed, draw_seed, elbo_seed = split_seed(seed, 3)
    counter, notes, laps = _Counter(), [], Laps()

    z_map, laplace = _map_and_laplace(target, map_seed, max(1, num_starts), counter, notes, laps)
    laps.lap("laplace")
    if laplace is None:
        return _identity_without_map(target, elbo_seed, counter, notes, laps, num_elbo_draws)
    u_fixed = tf.random.stateless_normal([num_fixed_draws, d], draw_seed, dtype=dtype)

    # N(0, I) competes too: on a funnel the fixed-draw Gaussian is narrower than
    # the identity and a worse start for the flow (its ELBO says so).
    laplace_fit = (np.asarray(z_map, np.float64), laplace)
    candidates: dict[str, tuple[np.ndarray, np.ndarray]] = {"identity": (np.zeros(d), np.eye(d)),
                                                            "laplace": laplace_fit}
    starts = {"laplace": laplace_fit, "N(0, I)": (np.zeros(d), np.eye(d))}
    scored: dict[str, tuple[float, float, float]] = {}
    if dadvi == "when_needed":
        scored = {k: _fresh_elbo(target, loc, tril, elbo_seed, counter, num_elbo_draws)
                  for k, (loc, tril) in candidates.items()}
        laps.lap("scoring")
        elbo, elbo_se, khat = scored["laplace"]
        if khat < _LAPLACE_GOOD_KHAT and elbo >= scored["identity"][0]:
            notes.append(f"Laplace fit: ELBO {elbo:.4g} +/- {elbo_se:.2g}, PSIS k-hat {khat:.2f} < "
                         f"{_LAPLACE_GOOD_KHAT}: DADVI not needed")
            return GaussianFit(*laplace_fit, "laplace", elbo, elbo_se, True, counter.n, notes, khat=khat,
                               phase_times=laps.seconds)
        starts = {"laplace": laplace_fit}
    candidates.update(_dadvi_candidates(target, starts, u_fixed, dadvi_full_rank, counter, notes))
    laps.lap("dadvi")

    scored.update({k: _fresh_elbo(target, loc, tril, elbo_seed, counter, num_elbo_draws)
                   for k, (loc, tril) in candidates.items() if k not in scored})
    laps.lap("scoring")
    notes.append("whitening candidates' ELBO: " + ", ".join(
        f"{k} {e:.4g} +/- {s:.2g}" for k, (e, s, _) in scored.items()))
    finite = {k: v for k, v in scored.items() if math.isfinite(v[0])}
    if not finite:
        notes.append("whitening failed (no candidate has a finite ELBO): the identity is used")
        return GaussianFit(np.zeros(d), np.eye(d), "identity", -math.inf, math.inf, True,
                           counter.n, notes, khat=math.inf, phase_times=laps.seconds)
    best = max(finite, key=lambda k: finite[k][0])
    loc, tril = candidates[best]
    elbo, elbo_se, khat = finite[best]
    return GaussianFit(np.asarray(loc, np.float64), np.asarray(tril, np.float64), best, elbo, elbo_se,
                       True, counter.n, notes, khat=khat, phase_times=laps.seconds)


def _identity_without_map(target, seed, counter: _Counter, notes: list[str], laps: Laps,
                          num_elbo_draws: int) -> GaussianFit:
    """The identity, scored, where there is no mode to fit a Gaussian at."""
    d = target.event_size
    # No mode (a hierarchical model, a funnel): a Gaussian fitted without one
    # sits in the neck and is a worse start for the flow than none (the
    # 100-D funnel: 22 divergences against 5), so the flow learns the scales.
    notes.append("no MAP with a positive-definite Hessian: no whitening (identity); the flow learns "
                 "the scales")
    # Its k-hat decides whether a flow must be fitted before anything else (the
    # flow adaptation's start), so it gets the full draws: on the 100-D funnel 256
    # draws missed the tail and put k-hat under 0.5.
    elbo, elbo_se, khat = _fresh_elbo(target, np.zeros(d), np.eye(d), seed, counter,
                                      max(num_elbo_draws, _ELBO_DRAWS))
    laps.lap("scoring")
    return GaussianFit(np.zeros(d), np.eye(d), "identity (no MAP)", elbo, elbo_se, False, counter.n,
                       notes, khat=khat, phase_times=laps.seconds)


def _map_and_laplace(target, seed, num_starts: int, counter: _Counter, notes: list[str], laps: Laps):
    """``(z_map, Laplace L)``, or ``(None, None)`` where no MAP with a positive-definite Hessian is found."""
    try:
        z_map, _, compiled = _find_map(target, seed, num_starts, counter, notes)
        laps.lap("map search")
        return z_map, (None if z_map is None else _laplace_tril(target, z_map, counter, notes, compiled))
    except (tf.errors.OpError, ValueError, np.linalg.LinAlgError) as err:
        # A failed search is a note, never a crash: the other candidates remain.
        notes.append(f"MAP search failed ({type(err).__name__}: {str(err).splitlines()[0][:160]}); "
                     "whitening goes on without it")
        return None, None


def _dadvi_candidates(target, starts: dict, u_fixed, full_rank: bool, counter: _Counter,
                      notes: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """DADVI from each of ``starts`` (``{label: (loc, L)}``): ``{"dadvi from LABEL": (loc, L)}`` for the
    runs that ended at a finite point (the others are notes)."""
    d = target.event_size
    thetas0 = np.stack([_pack(loc0, tril0 if full_rank else np.diag(np.sqrt(np.sum(tril0**2, -1))), full_rank)
                        for loc0, tril0 in starts.values()])
    try:
        thetas = _dadvi(target, thetas0, u_fixed, full_rank, counter)
    except (tf.errors.OpError, ValueError) as err:
        notes.append(f"DADVI failed ({type(err).__name__}: {str(err).splitlines()[0][:160]}); dropped")
        thetas = np.full_like(thetas0, np.nan)
    found = {}
    for label, theta in zip(starts, thetas, strict=True):
        if not np.all(np.isfinite(theta)):
            notes.append(f"DADVI from {label}: ended at a non-finite point; dropped")
            continue
        loc, tril = _unpack(tf.constant(theta, tf.float64), d, full_rank)
        found[f"dadvi from {label}"] = (loc.numpy(), tril.numpy())
    return found


def whitening_layer(flow: Any):
    """The flow's ``whitening`` layer (the last one, by name), or None."""
    layers = getattr(flow, "layers", None)
    if not layers:
        return None
    last = layers[-1]
    return last if last.name.startswith("whitening") else None


def set_whitening(layer: Any, gaussian: GaussianFit) -> None:
    """Writes ``gaussian`` into a flow's whitening layer (full-rank or diagonal)."""
    dtype = layer.dtype
    layer.shift.assign(tf.constant(gaussian.loc, dtype))
    log_diag = np.log(np.diag(gaussian.scale_tril))
    if hasattr(layer, "tril_params"):
        raw = np.tril(gaussian.scale_tril, -1) + np.diag(log_diag)
        layer.tril_params.assign(tf.cast(tfp.math.fill_triangular_inverse(tf.constant(raw)), dtype))
    else:
        layer.log_scale.assign(tf.constant(log_diag, dtype))


def whiten_flow(target: Any, flow: Any, *, seed: Any, **options: Any) -> GaussianFit | None:
    """Fits a Gaussian to ``target`` (:func:`fit_gaussian`, with ``options``) and
    writes it into ``flow``'s whitening layer; None (and nothing done) when the
    flow has none.

    The seed is folded in (not split) so that a caller's other seeds stay as
    they were.
    """
    layer = whitening_layer(flow)
    if layer is None:
        return None
    gaussian = fit_gaussian(target, seed=tf.random.experimental.stateless_fold_in(as_seed(seed), 0x57484954),
                            full_rank=hasattr(layer, "tril_params"), **options)
    set_whitening(layer, gaussian)
    return gaussian
