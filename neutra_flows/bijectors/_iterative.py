r"""`IterativeInverse`: the shared base of the layers whose inverse has no closed form.

NAF, BNAF, Sylvester and residual layers invert the same way:

1. **solve** ``f(x) = y`` with the parameters and the target held constant
   (`tf.stop_gradient`), by one of the solvers of
   `neutra_flows.bijectors._root_finding`;
2. take **one Newton step** from that solution with the Jacobian held
   constant, :math:`x \leftarrow x - J^{-1} (f(x) - y)`: the value moves by less
   than the tolerance, and the gradient with respect to ``y`` and the
   parameters is the implicit-function one, :math:`dx = J^{-1} (dy - df)`,
   obtained without differentiating through the iterations;
3. **check convergence** (`check_converged`): an error eagerly and in graphs,
   NaN under XLA, never a silently wrong number.

A subclass supplies steps 1 and 2 (`_solve` and `_implicit_step`) and inherits
`inverse_with_info` and `_inverse`; a layer that holds its own parameters
stores its event size and solver options with `_init_solver`.
"""

from __future__ import annotations

import tensorflow as tf

from neutra_flows._utils import check_positive_int
from neutra_flows.bijectors._core import VectorBijector
from neutra_flows.bijectors._root_finding import RootResult, check_converged

__all__ = ["IterativeInverse"]


class IterativeInverse(VectorBijector):
    r"""Base of the bijectors whose inverse is solved numerically.

    Subclasses implement the forward map and its log-det as usual, plus:

    * ``_solve(y) -> RootResult``: solves ``f(x) = y`` for a target ``y`` that
      carries no gradient, with the parameters held constant; ``result.x``
      may be in the subclass's own coordinates (Sylvester solves for
      :math:`Q^\top x`);
    * ``_implicit_step(x, y) -> x``: from that solution (no gradient), the
      Newton step with the Jacobian held constant, returning the preimage of
      ``y`` (with its gradient) in the input space.

    Convergence is judged per event: an event whose coordinates did not all
    converge is flagged as a whole (in a triangular system a coordinate
    solved against an unconverged predecessor cannot be trusted), so under
    XLA such events come back as NaN.

    Shapes: events ``[..., d]``; the diagnostics have the shape of ``y``.
    """

    def _init_solver(self, event_size: int, *, tol: float | None, max_iterations: int) -> int:
        """Stores `d` and the options of `_solve` (``tol=None``: the dtype's default); returns `d`."""
        self._event_size = check_positive_int(event_size, "event_size")
        self._tol = tol
        self._max_iterations = check_positive_int(max_iterations, "max_iterations")
        return self._event_size

    def _solve(self, y: tf.Tensor) -> RootResult:
        raise NotImplementedError

    def _implicit_step(self, x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        raise NotImplementedError

    def inverse_with_info(self, y) -> RootResult:
        """The inverse without the convergence check, with its diagnostics.

        Returns:
          A :class:`~neutra_flows.bijectors._root_finding.RootResult`: ``x``,
          the preimage of ``y`` (differentiable); from the solver (for the
          triangular solvers, the last sweep) the elementwise ``residual`` of
          the whole map and the ``tolerance``; ``num_iterations`` (summed over
          sweeps); ``converged``, per event and broadcast to the shape of ``y``.
        """
        y = tf.convert_to_tensor(y, self.dtype)
        result = self._solve(tf.stop_gradient(y))
        x = self._implicit_step(tf.stop_gradient(result.x), y)
        converged = tf.broadcast_to(tf.reduce_all(result.converged, axis=-1, keepdims=True), tf.shape(x))
        return result._replace(x=x, converged=converged)

    def _inverse(self, y):
        return check_converged(self.inverse_with_info(y), what=f"{type(self).__name__}.inverse")
