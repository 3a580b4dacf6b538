r"""Neural spline flows: the rational-quadratic spline transformer and `NeuralSplineFlow`.

On :math:`[-B, B]` the transformer is a monotone rational-quadratic spline
with :math:`K` bins (knots :math:`(x^{(k)}, y^{(k)})`, derivatives
:math:`\delta^{(k)}`); outside it is the identity, so the map is a bijection
of all of :math:`\mathbb{R}` with slope 1 at both ends. Within bin :math:`k`,
with :math:`\xi = (x - x^{(k)}) / w_k`, :math:`s_k = h_k / w_k`:

.. math::

   \tau(x) = y^{(k)} + \frac{h_k [s_k \xi^2 + \delta^{(k)} \xi (1 - \xi)]}
                            {s_k + [\delta^{(k+1)} + \delta^{(k)} - 2 s_k] \xi (1 - \xi)},

   \tau'(x) = \frac{s_k^2 [\delta^{(k+1)} \xi^2 + 2 s_k \xi (1 - \xi) + \delta^{(k)} (1 - \xi)^2]}
                  {(s_k + [\delta^{(k+1)} + \delta^{(k)} - 2 s_k] \xi (1 - \xi))^2},

and the inverse solves a quadratic in :math:`\xi` (Durkan et al. 2019, App. A).

Parameter layout per dimension, ``params[..., 3K - 1]``:
``[:K]`` raw bin widths, ``[K:2K]`` raw bin heights, ``[2K:]`` raw derivatives
at the ``K - 1`` interior knots. Widths and heights are
``min_bin_size + (2B - K min_bin_size) softmax(logit_scale * raw)``; derivatives are
``min_slope + softplus(raw + c)`` with ``c`` chosen so that raw zero gives
slope 1. Zero parameters therefore give equal bins and unit slopes: the
identity (to rounding).

A spline flow is a coupling (`Coupling`) or an autoregressive (`IAF`, `MAF`)
layer whose transformer is this spline, not a second implementation;
`NeuralSplineFlow` builds either.

References:
  Durkan, C., Bekasov, A., Murray, I. and Papamakarios, G. (2019). Neural
  Spline Flows. arXiv:1906.04032.

  Gregory, J. A. and Delbourgo, R. (1982). Piecewise Rational Quadratic
  Interpolation to Monotonic Data. IMA Journal of Numerical Analysis 2(2).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import tensorflow as tf

from neutra_flows._utils import check_positive_int
from neutra_flows.bijectors._core import Transformer
from neutra_flows.bijectors.autoregressive import IAF
from neutra_flows.bijectors.coupling import Coupling

__all__ = ["NeuralSplineFlow", "RationalQuadraticTransformer"]


class RationalQuadraticTransformer(Transformer):
    r"""Elementwise rational-quadratic spline on :math:`[-B, B]`, identity outside.

    Args:
      num_bins: :math:`K`, the number of bins (>= 2).
      bound: :math:`B > 0`; the spline acts on :math:`[-B, B]`.
      min_bin_size: lower bound on bin widths and heights; needs
        ``num_bins * min_bin_size < 2 * bound``.
      min_slope: lower bound on the knot derivatives, in (0, 1).
      logit_scale: multiplies the raw bin widths and heights before the softmax
        (> 0; 1 by default). Bin sizes are exponential in the raw values and
        inside a bin the slope falls like ``s^2 / delta`` (``s`` the bin's
        height / width, ``delta`` its knot slopes), so raw values of a few
        units already give slopes near 1e-8: a map float32 cannot invert.
        A conditioner whose outputs grow fast in training (the coupling MLP:
        every output sums all of its last hidden units) needs a scale below 1
        (Durkan et al.'s reference code divides by ``sqrt(hidden units)``).

    ``num_params = 3 * num_bins - 1`` (layout in the module docstring);
    ``params`` is ``[..., 3K - 1]`` for ``x`` of shape ``[...]``.

    Implementation notes. Bins are found by comparisons and read off by a
    one-hot contraction, a graph several times smaller (faster to trace and to
    XLA-compile) than `tfb.RationalQuadraticSpline`'s `searchsorted` +
    `gather`. Inputs off the interval are moved to 0 before the spline formula
    sees them (the double-where trick), so values *and gradients* stay finite
    however far out they are (the NaN-gradient trap of flowjax #239 and
    nflows #23). The end knots are exactly :math:`\pm B`, so the identity
    tails join continuously with slope 1.
    """

    def __init__(
        self,
        num_bins: int = 8,
        bound: float = 5.0,
        *,
        min_bin_size: float = 1e-3,
        min_slope: float = 1e-3,
        logit_scale: float = 1.0,
    ):
        self.num_bins = check_positive_int(num_bins, "num_bins", minimum=2)
        if not (isinstance(logit_scale, (int, float)) and math.isfinite(logit_scale) and logit_scale > 0):
            raise ValueError(f"logit_scale must be a finite number > 0, got {logit_scale!r}")
        self.logit_scale = float(logit_scale)
        if not (isinstance(bound, (int, float)) and math.isfinite(bound) and bound > 0):
            raise ValueError(f"bound must be a finite number > 0, got {bound!r}")
        self.bound = float(bound)
        if not 0 < min_bin_size * self.num_bins < 2 * self.bound:
            raise ValueError(
                f"min_bin_size must be > 0 with num_bins * min_bin_size < 2 * bound, got {min_bin_size}"
            )
        if not 0 < min_slope < 1:
            raise ValueError(f"min_slope must be in (0, 1), got {min_slope}")
        self.min_bin_size = float(min_bin_size)
        self.min_slope = float(min_slope)
        self.num_params = 3 * self.num_bins - 1
        # softplus(raw + c) + min_slope == 1 at raw == 0.
        self._slope_offset = math.log(math.expm1(1.0 - self.min_slope))

    def _bin(self, v: tf.Tensor, params: tf.Tensor, *, by_output: bool):
        """Inside mask, safe input (0 off the interval) and the parameters of v's bin.

        Returns ``x_k, y_k, w_k, h_k, d_k, d_k1``: the bin's left knots, width,
        height and the derivatives at its two knots, each shaped like ``v``.
        """
        # Few, large ops: this runs d times per layer in the sequential directions.
        k = self.num_bins
        span = 2 * self.bound - k * self.min_bin_size
        raw_w, raw_h, raw_d = tf.split(params, [k, k, k - 1], axis=-1)
        if self.logit_scale != 1.0:
            raw_w, raw_h = raw_w * self.logit_scale, raw_h * self.logit_scale
        widths = self.min_bin_size + span * tf.math.softmax(raw_w, axis=-1)
        heights = self.min_bin_size + span * tf.math.softmax(raw_h, axis=-1)
        slopes = self.min_slope + tf.math.softplus(raw_d + self._slope_offset)
        left_x = tf.cumsum(widths, axis=-1, exclusive=True) - self.bound
        left_y = tf.cumsum(heights, axis=-1, exclusive=True) - self.bound
        pad = [[0, 0]] * (params.shape.rank - 1)
        table = tf.stack(
            [
                left_x,
                left_y,
                widths,
                heights,
                tf.pad(slopes, [*pad, [1, 0]], constant_values=1),
                tf.pad(slopes, [*pad, [0, 1]], constant_values=1),
            ],
            axis=-2,
        )
        inside = tf.abs(v) < self.bound
        safe = tf.where(inside, v, tf.zeros_like(v))
        left = left_y if by_output else left_x
        # left[..., 0] = -B < safe, so the count is at least 1.
        index = tf.reduce_sum(tf.cast(safe[..., tf.newaxis] >= left, tf.int32), axis=-1) - 1
        onehot = tf.one_hot(index, k, dtype=v.dtype)
        chosen = tf.reduce_sum(onehot[..., tf.newaxis, :] * table, axis=-1)
        return inside, safe, tf.unstack(chosen, axis=-1)

    def forward(self, x: tf.Tensor, params: tf.Tensor) -> tf.Tensor:
        inside, safe, (x_k, y_k, w_k, h_k, d_k, d_k1) = self._bin(x, params, by_output=False)
        s = h_k / w_k
        xi = (safe - x_k) / w_k
        mix = xi * (1 - xi)
        y = y_k + h_k * (s * xi**2 + d_k * mix) / (s + (d_k1 + d_k - 2 * s) * mix)
        return tf.where(inside, y, x)

    def inverse(self, y: tf.Tensor, params: tf.Tensor) -> tf.Tensor:
        inside, safe, (x_k, y_k, w_k, h_k, d_k, d_k1) = self._bin(y, params, by_output=True)
        s = h_k / w_k
        rel = safe - y_k
        term = rel * (d_k1 + d_k - 2 * s)
        a = h_k * (s - d_k) + term
        b = h_k * d_k - term
        c = -s * rel
        # The cancellation-free root of a xi^2 + b xi + c = 0 (Durkan et al. 2019, App. A.3).
        disc = tf.maximum(b**2 - 4 * a * c, tf.zeros([], y.dtype))
        xi = 2 * c / (-b - tf.sqrt(disc))
        return tf.where(inside, x_k + xi * w_k, y)

    def forward_log_det(self, x: tf.Tensor, params: tf.Tensor) -> tf.Tensor:
        inside, safe, (x_k, _, w_k, h_k, d_k, d_k1) = self._bin(x, params, by_output=False)
        s = h_k / w_k
        xi = (safe - x_k) / w_k
        mix = xi * (1 - xi)
        numer = d_k1 * xi**2 + 2 * s * mix + d_k * (1 - xi) ** 2
        denom = s + (d_k1 + d_k - 2 * s) * mix
        ldj = 2 * tf.math.log(s) + tf.math.log(numer) - 2 * tf.math.log(denom)
        return tf.where(inside, ldj, tf.zeros_like(ldj))

    def __repr__(self) -> str:
        scale = "" if self.logit_scale == 1.0 else f", logit_scale={self.logit_scale:.4g}"
        return f"RationalQuadraticTransformer(num_bins={self.num_bins}, bound={self.bound}{scale})"


# Capitalised like a class: it builds a layer, and reads as one at the call site.
def NeuralSplineFlow(
    conditioner: Callable[[tf.Tensor], tf.Tensor],
    *,
    num_bins: int = 8,
    bound: float = 5.0,
    autoregressive: bool = False,
    num_masked: int | None = None,
    logit_scale: float = 1.0,
    validate_args: bool = False,
    name: str = "neural_spline_flow",
) -> Coupling | IAF:
    r"""A rational-quadratic neural spline flow layer: a `Coupling` or an `IAF` with the spline.

    Not a layer class of its own: the layer is the coupling or autoregressive
    one with `RationalQuadraticTransformer` :math:`\tau` as its transformer
    (spline on :math:`[-B, B]`, identity outside).

    * ``autoregressive=False`` (RQ-NSF (C)): ``Coupling(conditioner,
      num_masked=m, transformer=tau)``,
      :math:`y_{m+1:d} = \tau(x_{m+1:d}; \theta(x_{1:m}))`; forward and
      inverse are one conditioner pass each.
    * ``autoregressive=True`` (RQ-NSF (AR), inverse-autoregressive direction):
      ``IAF(conditioner, transformer=tau)``,
      :math:`z_i = \tau(u_i; \theta_i(u_{<i}))`; forward and its log-det are
      one pass, the inverse :math:`d` passes.

    Log-det :math:`\sum_i \log \tau'(\cdot)` over the transformed coordinates.

    Args:
      conditioner: coupling: ``[..., m] -> [..., d - m, 3K - 1]`` (e.g.
        `neutra_flows.nn.MLP`); autoregressive: ``[..., d] -> [..., d, 3K - 1]``
        (e.g. `neutra_flows.nn.MADE`).
      num_bins: :math:`K`.
      bound: :math:`B`.
      autoregressive: choose the variant.
      num_masked: :math:`m` for the coupling variant (must be ``None`` for the
        autoregressive one).
      logit_scale: scale of the raw bin widths and heights (see
        `RationalQuadraticTransformer`); `make_flow("nsf", d)` uses
        ``1 / sqrt(last hidden width)`` for ``d > 1``.
      validate_args: check arguments at run time.
      name: name of the layer.

    Returns:
      The `Coupling` or `IAF` layer; inputs ``[..., d]`` with any batch shape,
      log-dets ``[...]``.
    """
    transformer = RationalQuadraticTransformer(num_bins, bound, logit_scale=logit_scale)
    if autoregressive:
        if num_masked is not None:
            raise ValueError("num_masked is for the coupling variant; leave it None")
        return IAF(conditioner, transformer=transformer, validate_args=validate_args, name=name)
    if num_masked is None:
        raise ValueError("the coupling variant needs num_masked")
    return Coupling(
        conditioner, num_masked=num_masked, transformer=transformer, validate_args=validate_args, name=name
    )
