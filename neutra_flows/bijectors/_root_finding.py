"""Iterative inversion for flows without a closed-form inverse.

Three solvers, all written with `tf.while_loop` and a hard iteration cap so
they run eagerly, under `tf.function` and under `tf.function(jit_compile=True)`:

* :func:`solve_monotone` -- elementwise root of a strictly increasing scalar
  map, `f(x) = y`. A bracket `[lo, hi]` starting at the initial guess is
  grown (by capped Newton steps or doubling steps) until
  `f(lo) <= y <= f(hi)`; then safeguarded Newton steps (`rtsafe`, Press et
  al.) are taken while they stay inside the bracket and shrink it fast
  enough, bisection otherwise. Bisection alone halves the bracket, so
  convergence is guaranteed for any continuous strictly increasing `f` whose
  range contains `y`; Newton makes it quadratic near the root.
* :func:`solve_triangular` -- a triangular system `F(x) = y`, increasing in
  each coordinate, by sweeps of :func:`solve_monotone` over all coordinates
  at once (at most `d + 1`, stopping as soon as the whole map is within
  tolerance). Used by NAF and BNAF (autoregressive order) and Sylvester
  flows (back-substitution order).
* :func:`fixed_point` -- `x <- y - g(x)` for a contraction `g` (residual flows),
  globally convergent by Banach's theorem with error at most
  `residual * Lip(g) / (1 - Lip(g))`.

**Why not `tfp.math.find_root_chandrupatla`.** TFP's root finder is
derivative-free and needs a bracket up front (`tfp.math.bracket_root` finds
one by evaluating the map at 512 points spread from the origin). Here every
map returns its derivative at no extra cost, so Newton converges
quadratically; the solves are warm-started from a point, not a bracket (the
triangular sweeps stop when a sweep needs zero iterations because every
start is already within tolerance); the tolerance is relative to the target,
``tol * (1 + |y|)``, where TFP's position and value tolerances are absolute;
and the result carries the per-entry `converged` mask that the loud failure
below needs.

**Tolerance.** An element has converged when
`|f(x) - y| <= tol * (1 + |y|)`, or (monotone solver only) when the bracket
that holds the root has shrunk to a few units in the last place of `x`, so no
float can do better. `tol` defaults to :func:`default_tolerance`: `1e-6` in
float32 and `1e-12` in float64. The error in `x` is at most
`residual / min f'`.

**Failure is loud.** Both solvers return a :class:`RootResult` with the
elementwise `residual`, the `tolerance` used, the iteration count and a
`converged` mask. :func:`check_converged` turns a failure into

* eagerly: a :class:`ConvergenceError` (a `ValueError`) that states the worst
  residual, the tolerance and the iterations used;
* under `tf.function`: a `tf.errors.InvalidArgumentError` whose message starts
  with `ConvergenceError` (a `tf.debugging.Assert`);
* under XLA (`jit_compile=True`), where assertions compile to no-ops and
  nothing can be raised: the unconverged entries are returned as NaN, never as
  a silently wrong number.

References:
  W. H. Press, S. A. Teukolsky, W. T. Vetterling and B. P. Flannery.
  Numerical Recipes, 3rd ed., section 9.4 (rtsafe). Cambridge University
  Press, 2007.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import tensorflow as tf

__all__ = [
    "ConvergenceError",
    "RootResult",
    "check_converged",
    "default_tolerance",
    "fixed_point",
    "solve_monotone",
    "solve_triangular",
]


class ConvergenceError(ValueError):
    """An iterative inverse did not reach its tolerance within its iteration cap."""


class RootResult(NamedTuple):
    """Outcome of an iterative inversion.

    Attributes:
      x: the solution, shape of the target `y`.
      residual: `|f(x) - y|`, elementwise, shape of `y`.
      tolerance: the elementwise threshold `tol * (1 + |y|)`, shape of `y`.
      num_iterations: int32 scalar, iterations used (bracketing included; for
        sequential solves, summed over the passes).
      converged: bool, elementwise, shape of `y`.
    """

    x: tf.Tensor
    residual: tf.Tensor
    tolerance: tf.Tensor
    num_iterations: tf.Tensor
    converged: tf.Tensor


def default_tolerance(dtype: tf.DType) -> float:
    """The default relative tolerance: `1e-6` in float32, `1e-12` in float64."""
    return 1e-6 if tf.as_dtype(dtype) == tf.float32 else 1e-12


def _tolerance(y: tf.Tensor, tol: float | None) -> tf.Tensor:
    tol = default_tolerance(y.dtype) if tol is None else float(tol)
    if not tol > 0:
        raise ValueError(f"tol must be positive, got {tol}")
    return tf.constant(tol, y.dtype) * (1.0 + tf.abs(y))


def solve_monotone(
    fn: Callable[[tf.Tensor], tuple[tf.Tensor, tf.Tensor]],
    y: tf.Tensor,
    *,
    initial: tf.Tensor | None = None,
    tol: float | None = None,
    max_iterations: int = 100,
    initial_width: float = 1.0,
) -> RootResult:
    """Solves `f(x) = y` elementwise for a strictly increasing `f`.

    One loop does both phases, per element:

    * **growing the bracket.** The start `x0` is one end of the bracket (the
      lower end if `f(x0) < y`, else the upper end). While the other end is
      unknown the next point is a Newton step, but never further than `width`
      from the known end, or that known end plus (or minus) `width` when the
      Newton step points the wrong way; `width` doubles each step, so a root
      at distance `D` is bracketed in `O(log D)` steps even where `f` is flat.
      Every point evaluated becomes the new lower or upper end, so the bracket
      only ever moves towards the root;
    * **shrinking it** (`rtsafe`): a Newton step when it falls strictly inside
      the bracket and at least halves the previous step, else bisection. The
      bracket at least halves every two steps, so this converges for any
      continuous strictly increasing `f` whose range holds `y`; Newton makes
      it quadratic near the root.

    Args:
      fn: maps `x` (shape of `y`) to `(f(x), f'(x))`, both the shape of `y`,
        acting elementwise (entry `i` of `f(x)` may only depend on entry `i` of
        `x`).
      y: the targets, any shape.
      initial: a first guess, shape of `y` (default `y`, right for
        near-identity maps). Entries already within tolerance are returned
        unchanged after one evaluation.
      tol: relative tolerance, see the module docstring.
      max_iterations: cap on the steps of both phases together.
      initial_width: the first step of the bracket growth.

    Returns:
      A :class:`RootResult`; entries whose bracket could not be found, or that
      did not converge, have `converged == False`. Nothing is raised here; use
      :func:`check_converged`.
    """
    y = tf.convert_to_tensor(y)
    x0 = y if initial is None else tf.convert_to_tensor(initial, y.dtype)
    x0 = tf.broadcast_to(x0, tf.shape(y))
    tolerance = _tolerance(y, tol)
    eps = np.finfo(y.dtype.as_numpy_dtype).eps
    # Entries whose target is not finite are passed through (NaN in, NaN out),
    # not reported as a convergence failure.
    finite_y = tf.math.is_finite(y)

    def is_done(x, r, lo, hi, lo_ok, hi_ok):
        at_resolution = lo_ok & hi_ok & ((hi - lo) <= 4.0 * eps * tf.maximum(tf.abs(x), 1.0))
        return (tf.abs(r) <= tolerance) | at_resolution | ~finite_y

    f0, df0 = fn(x0)
    r0 = f0 - y
    lo_ok0, hi_ok0 = r0 <= 0, r0 >= 0
    done0 = is_done(x0, r0, x0, x0, lo_ok0, hi_ok0)
    width0 = tf.fill(tf.shape(y), tf.constant(initial_width, y.dtype))
    start = _Bracket(x0, r0, df0, x0, x0, lo_ok0, hi_ok0, width0, 2.0 * width0, done0)

    def body(i, s):
        x_new = _next_point(s)
        f_new, df_new = fn(x_new)
        return i + 1, _advance(s, x_new, f_new - y, df_new, is_done)

    n, final = tf.while_loop(
        lambda i, s: (i < max_iterations) & ~tf.reduce_all(s.done),
        body,
        (tf.constant(0, tf.int32), start),
        maximum_iterations=max_iterations,
    )
    return RootResult(
        x=final.x, residual=tf.abs(final.r), tolerance=tolerance, num_iterations=n, converged=final.done
    )


class _Bracket(NamedTuple):
    """Per-element state of `solve_monotone`'s loop."""

    x: tf.Tensor  # the last point evaluated (of the active entries)
    r: tf.Tensor  # f(x) - y
    df: tf.Tensor  # f'(x)
    lo: tf.Tensor  # lower end, f(lo) <= y where lo_ok
    hi: tf.Tensor  # upper end, f(hi) >= y where hi_ok
    lo_ok: tf.Tensor
    hi_ok: tf.Tensor
    width: tf.Tensor  # cap on the next growth step, doubled at each
    dx_old: tf.Tensor  # length of the previous step (rtsafe's "shrinks fast enough")
    done: tf.Tensor


def _next_point(s: _Bracket) -> tf.Tensor:
    """rtsafe inside a bracket; a capped Newton (or growth) step while one end is unknown."""
    newton = s.x - s.r / s.df
    finite = tf.math.is_finite(newton)
    safe = finite & (newton > s.lo) & (newton < s.hi) & (tf.abs(2.0 * s.r) <= tf.abs(s.dx_old * s.df))
    inside = tf.where(safe, newton, 0.5 * (s.lo + s.hi))
    up = tf.where(finite & (newton > s.lo), tf.minimum(newton, s.lo + s.width), s.lo + s.width)
    down = tf.where(finite & (newton < s.hi), tf.maximum(newton, s.hi - s.width), s.hi - s.width)
    return tf.where(s.lo_ok & s.hi_ok, inside, tf.where(s.lo_ok, up, down))


def _advance(s: _Bracket, x_new, r_new, df_new, is_done) -> _Bracket:
    """Moves the active entries to `x_new`, which becomes their new lower or upper end."""
    active = ~s.done
    below, above = active & (r_new <= 0), active & (r_new >= 0)
    x = tf.where(active, x_new, s.x)
    r = tf.where(active, r_new, s.r)
    lo, lo_ok = tf.where(below, x_new, s.lo), s.lo_ok | below
    hi, hi_ok = tf.where(above, x_new, s.hi), s.hi_ok | above
    return _Bracket(
        x=x,
        r=r,
        df=tf.where(active, df_new, s.df),
        lo=lo,
        hi=hi,
        lo_ok=lo_ok,
        hi_ok=hi_ok,
        width=tf.where(active & ~(s.lo_ok & s.hi_ok), 2.0 * s.width, s.width),
        dx_old=tf.where(active, tf.abs(x_new - s.x), s.dx_old),
        done=s.done | (active & is_done(x, r, lo, hi, lo_ok, hi_ok)),
    )


def solve_triangular(
    make_fn: Callable[[tf.Tensor], Callable[[tf.Tensor], tuple[tf.Tensor, tf.Tensor]]],
    y: tf.Tensor,
    *,
    num_coordinates: int,
    initial: tf.Tensor | None = None,
    tol: float | None = None,
    max_iterations: int = 100,
) -> RootResult:
    """Solves a triangular system `F(x) = y`, increasing in each `x_i`, by sweeps.

    `F_i` depends on `x_i` and on the coordinates before it in some fixed
    order (autoregressive flows, block-triangular networks, back-substitution).
    Each sweep holds the current `x` fixed and solves every coordinate's
    scalar equation `F_i(x_1, .., x_{i-1}, t_i, ..) = y_i` at once with
    :func:`solve_monotone`, warm-started at the current `x`. After sweep `k`
    the first `k` coordinates in the triangular order are final, so `d` sweeps
    always suffice (the classic sequential inversion); the loop stops earlier,
    as soon as a sweep finds every coordinate already within tolerance at its
    starting point, i.e. `|F(x) - y| <= tol (1 + |y|)` for the whole map. At
    most `num_coordinates + 1` sweeps run (the last one only verifies).

    Args:
      make_fn: `make_fn(x)` returns the elementwise map
        `t -> (F_i(x with x_i := t_i), dF_i/dx_i)` for the current `x`, in the
        form :func:`solve_monotone` takes (broadcasting over a leading stack
        axis).
      y: targets, `[..., d]`.
      num_coordinates: `d`.
      initial: first guess (default `y`).
      tol, max_iterations: passed to :func:`solve_monotone` for every sweep.

    Returns:
      A :class:`RootResult`; `residual`, `tolerance` and `converged` come from
      the last sweep, `num_iterations` is summed over the sweeps.
    """
    y = tf.convert_to_tensor(y)
    x0 = y if initial is None else tf.convert_to_tensor(initial, y.dtype)

    def cond(k, x, resid, tols, conv, iters, stop):
        return (k <= num_coordinates) & ~stop

    def body(k, x, resid, tols, conv, iters, stop):
        res = solve_monotone(make_fn(x), y, initial=x, tol=tol, max_iterations=max_iterations)
        stop = tf.equal(res.num_iterations, 0) & tf.reduce_all(res.converged)
        return k + 1, res.x, res.residual, res.tolerance, res.converged, iters + res.num_iterations, stop

    zeros = tf.zeros_like(y)
    _, x, resid, tols, conv, iters, _ = tf.while_loop(
        cond,
        body,
        (
            tf.constant(0, tf.int32),
            x0,
            zeros,
            zeros,
            tf.zeros_like(y, dtype=tf.bool),
            tf.constant(0, tf.int32),
            tf.constant(False),
        ),
        maximum_iterations=num_coordinates + 1,
    )
    return RootResult(x=x, residual=resid, tolerance=tols, num_iterations=iters, converged=conv)


def fixed_point(
    residual_fn: Callable[[tf.Tensor], tf.Tensor],
    y: tf.Tensor,
    *,
    tol: float | None = None,
    max_iterations: int = 500,
    event_ndims: int = 1,
) -> RootResult:
    """Solves `x + g(x) = y` by the iteration `x <- y - g(x)`, starting at `x = y`.

    Args:
      residual_fn: `g`, mapping `x` (shape of `y`) to `g(x)`; must be a
        contraction in the last `event_ndims` dimensions for convergence.
      y: the targets, `[..., event]`.
      tol: relative tolerance, see the module docstring.
      max_iterations: cap on the iterations.
      event_ndims: rightmost dimensions that form one event. An event stops
        iterating once all its entries are within tolerance, so each event's
        answer does not depend on the rest of the batch.

    Returns:
      A :class:`RootResult`; `residual` is `|x + g(x) - y|`, the last step's
      length.
    """
    y = tf.convert_to_tensor(y)
    tolerance = _tolerance(y, tol)
    axes = list(range(-event_ndims, 0))
    finite_y = tf.reduce_all(tf.math.is_finite(y), axis=axes, keepdims=True)

    def event_done(r):
        return tf.reduce_all(r <= tolerance, axis=axes, keepdims=True) | ~finite_y

    r0 = tf.abs(residual_fn(y))
    done0 = event_done(r0)

    def cond(i, x, r, done):
        return (i < max_iterations) & ~tf.reduce_all(done)

    def body(i, x, r, done):
        x_new = y - residual_fn(x)
        r_new = tf.abs(x_new - x)
        x = tf.where(done, x, x_new)
        r = tf.where(done, r, r_new)
        return i + 1, x, r, done | event_done(r)

    n, x, r, done = tf.while_loop(
        cond,
        body,
        (tf.constant(0, tf.int32), y, r0, done0),
        maximum_iterations=max_iterations,
    )
    converged = tf.broadcast_to(done, tf.shape(y))
    return RootResult(x=x, residual=r, tolerance=tolerance, num_iterations=n, converged=converged)


def check_converged(result: RootResult, *, what: str) -> tf.Tensor:
    """Returns `result.x`, or fails loudly where it did not converge.

    Eagerly this raises :class:`ConvergenceError`; in a graph it adds a
    `tf.debugging.Assert` (an `InvalidArgumentError` at run time); under XLA,
    where the assertion is compiled away, unconverged entries become NaN.
    """
    ok = tf.reduce_all(result.converged)
    if tf.executing_eagerly():
        if not bool(ok):
            bad = ~result.converged.numpy()
            excess = (result.residual.numpy() - result.tolerance.numpy())[bad]
            worst = int(np.argmax(excess)) if excess.size else 0
            raise ConvergenceError(
                f"{what} did not converge: {int(bad.sum())} of {bad.size} entries above "
                f"tolerance after {int(result.num_iterations)} iterations; worst residual "
                f"{result.residual.numpy()[bad][worst]:.3g} vs tolerance "
                f"{result.tolerance.numpy()[bad][worst]:.3g}. Raise max_iterations (or tol)."
            )
        return result.x
    worst = tf.reduce_max(tf.where(result.converged, tf.zeros_like(result.residual), result.residual))
    assert_op = tf.debugging.Assert(
        ok,
        [
            f"ConvergenceError: {what} did not converge; worst residual, iterations:",
            worst,
            result.num_iterations,
        ],
    )
    with tf.control_dependencies([assert_op]):
        nan = tf.constant(np.nan, result.x.dtype)
        return tf.where(result.converged, result.x, nan)
