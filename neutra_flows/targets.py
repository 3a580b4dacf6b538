"""Targets: unnormalized log densities over one flat vector of unconstrained reals.

Every algorithm in :mod:`neutra_flows` (``fit``, ``sample``) works on a
:class:`Target`: a log density ``log p(z)`` on ``R^d`` (the *unconstrained*
space) together with what is needed to hand results back in the user's terms
(names, shapes, the constrained space).

If the user's density ``log_prob_fn(x)`` lives on a constrained space (positive
scales, simplexes, ...), a *constraining bijector* ``c: R^d -> support`` is
used and the target density on ``R^d`` is the pulled-back density

    log p(z) = log_prob_fn(c(z)) + log|det dc/dz (z)|.

Ways to build one:

* ``Target(log_prob_fn, event_shape, ...)`` for a plain batched callable;
* :meth:`Target.from_joint_distribution` for a (pinned) TFP ``JointDistribution``;
* :meth:`Target.from_inference_gym` for anything shaped like an inference_gym model;
* the built-ins of this module, with exact ground truth where it is known:
  :func:`neals_funnel`, :func:`banana`, :func:`ill_conditioned_gaussian`,
  :func:`correlated_gaussian`, :func:`german_credit_sparse_logistic_regression`,
  :func:`eight_schools`.

Example:

>>> import numpy as np
>>> from neutra_flows import targets
>>> t = targets.banana()
>>> t.event_size, t.dtype.name
(2, 'float32')
>>> sorted(t.ground_truth_std)
['x']
>>> t.unnormalized_log_prob(np.zeros([4, 2], np.float32)).shape
TensorShape([4])

References
----------
* Neal, R. M. "Slice sampling." Annals of Statistics 31(3), 2003 (the funnel).
* Haario, H., Saksman, E. and Tamminen, J. "Adaptive proposal distribution for
  random walk Metropolis algorithm." Computational Statistics 14, 1999 (the banana).
* Hoffman, M., Sountsov, P., Dillon, J. V., Langmore, I., Tran, D. and Vasudevan, S.
  "NeuTra-lizing bad geometry in Hamiltonian Monte Carlo using neural transport."
  2019, arXiv:1903.03704 (ill-conditioned Gaussian, German credit sparse regression).
* Rubin, D. B. "Estimation in parallel randomized experiments." Journal of
  Educational Statistics 6(4), 1981 (eight schools).
"""

from __future__ import annotations

import importlib.resources
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from neutra_flows._utils import as_seed, canonical_dtype, check_positive_int, split_seed

tfb = tfp.bijectors
tfd = tfp.distributions

__all__ = [
    "Target",
    "banana",
    "correlated_gaussian",
    "eight_schools",
    "german_credit_sparse_logistic_regression",
    "ill_conditioned_gaussian",
    "neals_funnel",
]


def _format_point(z: np.ndarray, max_items: int = 12) -> str:
    z = np.asarray(z).reshape(-1)
    shown = ", ".join(f"{float(v):.6g}" for v in z[:max_items])
    if z.size > max_items:
        shown += f", ... ({z.size} values)"
    return f"[{shown}]"


def _as_shape(event_shape: Any) -> tuple[int, ...]:
    if isinstance(event_shape, (int, np.integer)) and not isinstance(event_shape, bool):
        shape = (int(event_shape),)
    else:
        try:
            shape = tuple(tf.TensorShape(event_shape).as_list())
        except (TypeError, ValueError) as err:
            raise ValueError(f"event_shape must be an int or a sequence of ints, got {event_shape!r}") from err
    if len(shape) == 0:
        raise ValueError(
            "event_shape must have at least one dimension; use event_shape=1 (or [1]) for a scalar variable"
        )
    if any(s is None or s < 1 for s in shape):
        raise ValueError(f"event_shape must be fully known and positive, got {shape}")
    return shape


class Target:
    """An unnormalized log density on ``R^d`` plus the way back to the user's variables.

    Args:
      log_prob_fn: a batched callable ``x -> log p(x)`` on the constrained space:
        it receives ``[..., *event_shape]`` and returns ``[...]`` (sum over the
        event dimensions yourself). Need not be normalised.
      event_shape: the shape of one point given to ``log_prob_fn`` (an int for a
        vector). The unconstrained space is
        ``constraining_bijector.inverse_event_shape(event_shape)`` flattened to
        ``[d]``.
      dtype: ``tf.float32`` or ``tf.float64``.
      constraining_bijector: a ``tfb.Bijector`` from the unconstrained space onto
        the support of ``log_prob_fn`` (``tfb.Exp()`` for a positive vector, ...).
        ``None`` means the identity.
      names: ``None`` (one variable ``"x"``), a single name, or, for a vector
        event, one name per coordinate (each becomes a scalar variable).
      name: a label used in messages and reports.
      ground_truth_mean, ground_truth_std: the exact posterior mean and standard
        deviation in the constrained space, as a dict keyed like
        :meth:`named_draws` or as one array of shape ``event_shape``; ``None`` when
        unknown.
      sample_fn: optional exact sampler ``(n, seed) -> [n, *event_shape]`` draws in
        the constrained space (the space of ``log_prob_fn``).
      validate: evaluate the density at a few fixed points now and raise a
        ``ValueError`` on NaN, ``+inf``, a wrong output shape, a missing or zero
        gradient (see :meth:`check`), or a density that cannot be traced by
        ``tf.function`` (numpy calls), as ``fit`` and ``sample`` run it.

    Attributes:
      event_size: ``d``, the size of the flat unconstrained vector.
      dtype: the floating dtype.
      names: the variable names, in the order of the flat vector.
      event_shapes: ``{name: shape}`` of each variable in the constrained space.
    """

    def __init__(
        self,
        log_prob_fn: Callable[[Any], Any],
        event_shape: int | Sequence[int],
        dtype: Any = tf.float32,
        constraining_bijector: tfb.Bijector | None = None,
        names: str | Sequence[str] | None = None,
        *,
        name: str = "target",
        ground_truth_mean: Any = None,
        ground_truth_std: Any = None,
        sample_fn: Callable[[int, Any], Any] | None = None,
        validate: bool = True,
    ):
        if not callable(log_prob_fn):
            raise ValueError(f"log_prob_fn must be callable, got {type(log_prob_fn).__name__}")
        dtype = canonical_dtype(dtype)
        shape = _as_shape(event_shape)
        if constraining_bijector is not None and not isinstance(constraining_bijector, tfb.Bijector):
            raise ValueError(
                "constraining_bijector must be a tfp.bijectors.Bijector or None, got "
                f"{type(constraining_bijector).__name__}"
            )
        if constraining_bijector is None:
            unconstrained = shape
        else:
            unconstrained = tuple(tf.TensorShape(constraining_bijector.inverse_event_shape(shape)).as_list())
        d = int(np.prod(unconstrained))
        parts = []
        if constraining_bijector is not None:
            parts.append(constraining_bijector)
        if len(unconstrained) != 1:
            parts.append(tfb.Reshape(event_shape_out=unconstrained, event_shape_in=[d]))
        bijector = None if not parts else (parts[0] if len(parts) == 1 else tfb.Chain(parts))

        if names is None:
            names_t: tuple[str, ...] = ("x",)
        elif isinstance(names, str):
            names_t = (names,)
        else:
            names_t = tuple(str(n) for n in names)
        if len(set(names_t)) != len(names_t):
            raise ValueError(f"names must be unique, got {names_t}")
        if len(names_t) == 1:
            split = False
            event_shapes = {names_t[0]: shape}
        elif len(shape) == 1 and len(names_t) == shape[0]:
            split = True
            event_shapes = {n: () for n in names_t}
        else:
            raise ValueError(
                f"names must be one name or one per coordinate of a vector event "
                f"(event_shape={shape}); got {len(names_t)} names"
            )

        def to_leaves(x):
            return list(tf.unstack(x, axis=-1)) if split else [x]

        def from_leaves(leaves):
            return tf.stack(leaves, axis=-1) if split else leaves[0]

        self._setup(
            log_prob_fn=log_prob_fn,
            bijector=bijector,
            event_size=d,
            dtype=dtype,
            names=names_t,
            event_shapes=event_shapes,
            to_leaves=to_leaves,
            from_leaves=from_leaves,
            name=name,
            ground_truth_mean=ground_truth_mean,
            ground_truth_std=ground_truth_std,
            sample_fn=sample_fn,
            validate=validate,
        )

    # -- construction helpers -------------------------------------------------

    def _setup(
        self,
        *,
        log_prob_fn,
        bijector,
        event_size,
        dtype,
        names,
        event_shapes,
        to_leaves,
        from_leaves,
        name,
        ground_truth_mean,
        ground_truth_std,
        sample_fn,
        validate,
    ):
        if event_size < 1:
            raise ValueError(f"the unconstrained space must have size >= 1, got {event_size}")
        if sample_fn is not None and not callable(sample_fn):
            raise ValueError(f"sample_fn must be callable or None, got {type(sample_fn).__name__}")
        self._log_prob_fn = log_prob_fn
        self._bijector = bijector
        self._event_size = int(event_size)
        self._dtype = dtype
        self._names = tuple(names)
        self._event_shapes = {k: tuple(v) for k, v in event_shapes.items()}
        self._to_leaves = to_leaves
        self._from_leaves = from_leaves
        self.name = str(name)
        self._sample_fn = sample_fn
        self._ground_truth_mean = self._as_named(ground_truth_mean, "ground_truth_mean")
        self._ground_truth_std = self._as_named(ground_truth_std, "ground_truth_std")
        if validate:
            self._validate_at_start()

    def _as_named(self, value: Any, what: str) -> dict[str, np.ndarray] | None:
        if value is None:
            return None
        if isinstance(value, Mapping) and set(value) == set(self._names):
            out = {k: np.asarray(value[k], dtype=self._dtype.as_numpy_dtype) for k in self._names}
        elif isinstance(value, Mapping):
            raise ValueError(f"{what} must have the keys {sorted(self._names)}, got {sorted(value)}")
        else:
            try:
                leaves = self._to_leaves(tf.nest.map_structure(np.asarray, value))
            except (TypeError, ValueError) as err:
                raise ValueError(
                    f"{what} must be a dict keyed by {list(self._names)} or one array per "
                    f"the event structure; got {value!r}"
                ) from err
            out = {
                k: np.asarray(leaf, dtype=self._dtype.as_numpy_dtype)
                for k, leaf in zip(self._names, leaves, strict=True)
            }
        for k in self._names:
            if out[k].shape != self._event_shapes[k]:
                raise ValueError(f"{what}[{k!r}] must have shape {self._event_shapes[k]}, got {out[k].shape}")
        return out

    def _validate_at_start(self):
        d = self._event_size
        # Deterministic probe points: the origin and two small, non-symmetric points.
        ramp = np.linspace(-0.5, 0.5, d) if d > 1 else np.array([0.3])
        z = np.stack([np.zeros(d), ramp, -0.7 * ramp[::-1]]).astype(self._dtype.as_numpy_dtype)
        # fit and sample run the density inside tf.function: a density that only
        # works eagerly (numpy calls, Python branches on values) must fail here,
        # not after minutes of set-up. Tracing is cheap: nothing is executed.
        graph_error = self._trace_error(z.shape)
        if graph_error is not None and _looks_like_numpy(graph_error):
            raise ValueError(
                f"{self.name}: the log density calls numpy on a TensorFlow tensor when traced by "
                "tf.function (as fit and sample do): write log_prob_fn with TensorFlow ops "
                f"(tf.math, tf.linalg, tfp.distributions), not numpy. The error: {_first_line(graph_error)}"
            ) from graph_error
        self.check(z)
        if graph_error is not None:
            raise ValueError(
                f"{self.name}: the log density works eagerly but not inside tf.function, where fit and "
                "sample run it; use TensorFlow ops only (no numpy, no Python `if` on tensor values). "
                f"The error: {_first_line(graph_error)}"
            ) from graph_error

    def _trace_error(self, shape: tuple[int, ...]) -> Exception | None:
        spec = tf.TensorSpec(shape, self._dtype)
        try:
            tf.function(self.unnormalized_log_prob, autograph=False).get_concrete_function(spec)
        except Exception as err:  # noqa: BLE001 - any failure of user code is reported, with its text
            return err
        return None

    @classmethod
    def _from_structure(
        cls,
        *,
        log_prob_fn,
        structured_bijector,
        event_shape,
        dtype_struct,
        names,
        name,
        ground_truth_mean,
        ground_truth_std,
        sample_fn=None,
        validate=True,
    ) -> Target:
        flat_dtypes = tf.nest.flatten(dtype_struct)
        dtypes = {canonical_dtype(d) for d in flat_dtypes}
        if len(dtypes) != 1:
            raise ValueError(f"all latent variables must share one float dtype, got {dtypes}")
        dtype = dtypes.pop()
        # TensorShape is a leaf for tf.nest; map it through the dtype structure.
        constrained_shapes = [
            tuple(tf.TensorShape(s).as_list()) for s in _flatten_up_to(dtype_struct, event_shape)
        ]
        unconstrained = [
            tuple(tf.TensorShape(s).as_list())
            for s in _flatten_up_to(dtype_struct, structured_bijector.inverse_event_shape(event_shape))
        ]
        for n, s in zip(names, unconstrained, strict=True):
            if any(v is None for v in s):
                raise ValueError(f"the shape of {n!r} must be fully known, got {s}")
        sizes = [int(np.prod(s)) for s in unconstrained]
        index_struct = tf.nest.pack_sequence_as(dtype_struct, list(range(len(sizes))))
        parts = [
            structured_bijector,
            tfb.Restructure(index_struct),
            tfb.JointMap(
                [
                    tfb.Reshape(event_shape_out=s, event_shape_in=[n])
                    for s, n in zip(unconstrained, sizes, strict=True)
                ]
            ),
            tfb.Split(sizes),
        ]
        bijector = tfb.Chain(parts)

        def to_leaves(x):
            return tf.nest.flatten(x)

        def from_leaves(leaves):
            return tf.nest.pack_sequence_as(dtype_struct, list(leaves))

        target = cls.__new__(cls)
        target._setup(
            log_prob_fn=log_prob_fn,
            bijector=bijector,
            event_size=sum(sizes),
            dtype=dtype,
            names=names,
            event_shapes=dict(zip(names, constrained_shapes, strict=True)),
            to_leaves=to_leaves,
            from_leaves=from_leaves,
            name=name,
            ground_truth_mean=ground_truth_mean,
            ground_truth_std=ground_truth_std,
            sample_fn=sample_fn,
            validate=validate,
        )
        return target

    @classmethod
    def from_joint_distribution(
        cls,
        jd: tfd.Distribution,
        *,
        name: str | None = None,
        ground_truth_mean: Any = None,
        ground_truth_std: Any = None,
        validate: bool = True,
    ) -> Target:
        """A target from a TFP joint distribution over the latent variables.

        ``jd`` is a ``JointDistribution{Coroutine,Named,Sequential}[AutoBatched]``
        pinned to the observed data (``jd.experimental_pin(y=...)``) or one whose
        every variable is latent (the data built into its likelihood). The
        structured latents are flattened into one vector
        ``z = concat([flatten(b_k^{-1}(x_k)) for k])`` where ``b`` is
        ``jd.experimental_default_event_space_bijector()``, so scales, simplexes
        and correlation matrices live on ``R^d``. :meth:`named_draws` returns
        ``{variable name: [..., *event_shape_k]}`` in the constrained space.

        Example:

        >>> import tensorflow_probability as tfp
        >>> tfd = tfp.distributions
        >>> jd = tfd.JointDistributionNamed(dict(
        ...     scale=tfd.HalfNormal(1.0),
        ...     y=lambda scale: tfd.Normal(0.0, scale)))
        >>> t = Target.from_joint_distribution(jd.experimental_pin(y=0.3))
        >>> t.event_size, t.names
        (1, ('scale',))
        """
        needed = ("experimental_default_event_space_bijector", "event_shape", "dtype")
        missing = [a for a in needed if not hasattr(jd, a)]
        if missing:
            raise ValueError(
                f"from_joint_distribution needs a tfp JointDistribution (or one pinned with "
                f"experimental_pin); {type(jd).__name__} lacks {missing}"
            )
        dtype_struct = jd.dtype
        flat = tf.nest.flatten(dtype_struct)
        names = _structure_names(jd, dtype_struct, len(flat))
        log_prob = getattr(jd, "unnormalized_log_prob", None) or jd.log_prob
        return cls._from_structure(
            log_prob_fn=log_prob,
            structured_bijector=jd.experimental_default_event_space_bijector(),
            event_shape=jd.event_shape,
            dtype_struct=dtype_struct,
            names=names,
            name=name or getattr(jd, "name", None) or "joint_distribution",
            ground_truth_mean=ground_truth_mean,
            ground_truth_std=ground_truth_std,
            validate=validate,
        )

    @classmethod
    def from_inference_gym(cls, model: Any, *, validate: bool = True) -> Target:
        """A target from anything shaped like an ``inference_gym`` model (duck-typed).

        The model needs ``unnormalized_log_prob(x)``, ``default_event_space_bijector``
        (a bijector, or a structure of bijectors matching ``event_shape``),
        ``event_shape`` and ``dtype`` (both possibly structures). If it has
        ``sample_transformations['identity']`` with ``ground_truth_mean`` /
        ``ground_truth_standard_deviation``, those become the ground truth.
        ``inference_gym`` itself is not needed.
        """
        needed = ("unnormalized_log_prob", "default_event_space_bijector", "event_shape", "dtype")
        missing = [a for a in needed if not hasattr(model, a)]
        if missing:
            raise ValueError(
                f"from_inference_gym needs a model with {list(needed)}; {type(model).__name__} lacks {missing}"
            )
        dtype_struct = model.dtype
        bij = model.default_event_space_bijector
        if not isinstance(bij, tfb.Bijector):
            bij = tfb.JointMap(bij)
        elif not tf.nest.is_nested(dtype_struct):
            # A single-tensor model: wrap it so the structured path applies unchanged.
            dtype_struct = [dtype_struct]
            bij = tfb.JointMap([bij])
        structured = tf.nest.is_nested(model.dtype)
        event_shape = model.event_shape if structured else [tf.TensorShape(model.event_shape)]
        flat = tf.nest.flatten(dtype_struct)
        names = _structure_names(None, dtype_struct, len(flat)) if structured else ["x"]
        gt_mean = gt_std = None
        transformations = getattr(model, "sample_transformations", None) or {}
        identity = transformations.get("identity") if isinstance(transformations, Mapping) else None
        if identity is not None:
            gt_mean = getattr(identity, "ground_truth_mean", None)
            gt_std = getattr(identity, "ground_truth_standard_deviation", None)
            if not structured:
                gt_mean = None if gt_mean is None else [gt_mean]
                gt_std = None if gt_std is None else [gt_std]

        if structured:
            log_prob_fn = model.unnormalized_log_prob
        else:

            def log_prob_fn(x):
                return model.unnormalized_log_prob(x[0])

        return cls._from_structure(
            log_prob_fn=log_prob_fn,
            structured_bijector=bij,
            event_shape=event_shape,
            dtype_struct=dtype_struct,
            names=names,
            name=str(getattr(model, "name", None) or type(model).__name__),
            ground_truth_mean=gt_mean,
            ground_truth_std=gt_std,
            validate=validate,
        )

    # -- the contract -----------------------------------------------------------

    @property
    def event_size(self) -> int:
        """``d``: the size of the flat unconstrained vector."""
        return self._event_size

    @property
    def dtype(self) -> tf.DType:
        return self._dtype

    @property
    def names(self) -> tuple[str, ...]:
        return self._names

    @property
    def event_shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self._event_shapes)

    @property
    def constraining_bijector(self) -> tfb.Bijector:
        """The bijector from flat ``[..., d]`` to the user's constrained value."""
        return self._bijector if self._bijector is not None else tfb.Identity()

    @property
    def ground_truth_mean(self) -> dict[str, np.ndarray] | None:
        return None if self._ground_truth_mean is None else dict(self._ground_truth_mean)

    @property
    def ground_truth_std(self) -> dict[str, np.ndarray] | None:
        return None if self._ground_truth_std is None else dict(self._ground_truth_std)

    @property
    def has_exact_sampler(self) -> bool:
        return self._sample_fn is not None

    def unnormalized_log_prob(self, z: Any) -> tf.Tensor:
        """``[..., d] -> [...]``: ``log_prob_fn(c(z)) + log|det c'(z)|``."""
        z = tf.convert_to_tensor(z, dtype=self._dtype)
        if self._bijector is None:
            lp = self._log_prob_fn(z)
            return tf.cast(lp, self._dtype)
        x = self._bijector.forward(z)
        lp = tf.cast(self._log_prob_fn(x), self._dtype)
        return lp + tf.cast(self._bijector.forward_log_det_jacobian(z, event_ndims=1), self._dtype)

    def constrain(self, z: Any) -> Any:
        """The constraining bijector's forward: ``[..., d]`` to the user's value."""
        z = tf.convert_to_tensor(z, dtype=self._dtype)
        return z if self._bijector is None else self._bijector.forward(z)

    def unconstrain(self, x: Any) -> tf.Tensor:
        """The inverse of :meth:`constrain`: a constrained value to flat ``[..., d]``.

        ``x`` is a dict keyed by :attr:`names` or the structure ``log_prob_fn`` takes.
        """
        if isinstance(x, Mapping) and set(x) == set(self._names):
            x = self._from_leaves([tf.convert_to_tensor(x[k], dtype=self._dtype) for k in self._names])
        x = tf.nest.map_structure(lambda t: tf.convert_to_tensor(t, dtype=self._dtype), x)
        return x if self._bijector is None else self._bijector.inverse(x)

    def named_draws(self, z: Any) -> dict[str, np.ndarray]:
        """``[..., d]`` unconstrained draws to ``{name: [..., *event_shape]}`` (constrained)."""
        z = np.asarray(z)
        if z.ndim == 0 or z.shape[-1] != self._event_size:
            raise ValueError(f"{self.name}: named_draws expects [..., {self._event_size}], got shape {z.shape}")
        leaves = self._to_leaves(self.constrain(z))
        return {k: np.asarray(v) for k, v in zip(self._names, leaves, strict=True)}

    def sample(self, n: int, seed: Any) -> tf.Tensor:
        """Exact draws as flat unconstrained ``[n, d]``.

        Raises ``NotImplementedError`` when :attr:`has_exact_sampler` is False.
        """
        n = check_positive_int(n, "n")
        if self._sample_fn is None:
            raise NotImplementedError(f"{self.name} has no exact sampler")
        x = self._sample_fn(n, as_seed(seed))
        z = self.unconstrain(x)
        return tf.reshape(z, [n, self._event_size])

    def check(self, z: Any) -> None:
        """Raises ``ValueError`` if the log density at ``z`` (``[..., d]``) is NaN or
        ``+inf``, has the wrong shape, or cannot be evaluated, or if its gradient is
        missing (None) or zero at every point where it is finite. ``-inf`` is allowed."""
        z = np.asarray(z, dtype=self._dtype.as_numpy_dtype)
        if z.ndim == 0 or z.shape[-1] != self._event_size:
            raise ValueError(f"{self.name}: points must have shape [..., {self._event_size}], got {z.shape}")
        z_tensor = tf.convert_to_tensor(z)
        try:
            with tf.GradientTape() as tape:
                tape.watch(z_tensor)
                lp_tensor = self.unnormalized_log_prob(z_tensor)
        except (tf.errors.InvalidArgumentError, ValueError, TypeError) as err:
            raise ValueError(
                f"{self.name}: the log density failed at points of shape {z.shape} "
                f"(first point {_format_point(z.reshape(-1, self._event_size)[0])}): {err}"
            ) from err
        lp = np.asarray(lp_tensor)
        expected = z.shape[:-1]
        if lp.shape != expected:
            hint = ""
            if lp.shape == z.shape or (lp.ndim > len(expected)):
                hint = " (did log_prob_fn forget to sum over the event dimensions?)"
            elif lp.ndim < len(expected):
                hint = " (log_prob_fn must be batched: reduce over the event axes only)"
            raise ValueError(
                f"{self.name}: the log density has shape {lp.shape} for points of shape "
                f"{z.shape}; expected {expected}{hint}"
            )
        bad = np.isnan(lp) | (lp == np.inf)
        if bad.any():
            idx = np.unravel_index(int(np.argmax(bad)), lp.shape) if lp.ndim else ()
            value = lp[idx]
            what = "NaN" if np.isnan(value) else "+inf"
            raise ValueError(
                f"{self.name}: the log density is {what} at z = {_format_point(z[idx])}"
                f" ({int(bad.sum())} of {bad.size} points bad); -inf (outside the "
                "support) is allowed, NaN and +inf are not"
            )
        self._check_gradient(tape.gradient(lp_tensor, z_tensor), lp)

    def _check_gradient(self, grad: tf.Tensor | None, lp: np.ndarray) -> None:
        """Raises when the density has no gradient: None, or zero at every point where it is finite.

        fit and sample follow the gradient; a density built from ops without one
        (tf.round, a cast to int, tf.stop_gradient, numpy) would otherwise train
        to garbage or leave the chains where they started, without an error.
        """
        finite = np.isfinite(lp)
        if grad is not None:
            g = np.asarray(grad)[finite]
            if g.size == 0 or not np.all(g == 0):
                return
            what = f"zero at all {int(finite.sum())} points checked"
        else:
            what = "missing (None: no differentiable path from z to log p)"
        raise ValueError(
            f"{self.name}: the gradient of the log density is {what}. fit and sample need "
            "gradients: write log_prob_fn with differentiable TensorFlow ops (tf.math, tfp); "
            "tf.round, casts to int, tf.stop_gradient and numpy have none. A density that is "
            "truly flat (a uniform on an interval) should be given a constraining_bijector "
            "(e.g. tfb.Sigmoid(low, high)) instead of -inf outside its support."
        )

    def __repr__(self) -> str:
        gt = "known" if self._ground_truth_mean is not None else "unknown"
        return (
            f"Target(name={self.name!r}, event_size={self._event_size}, "
            f"dtype={self._dtype.name}, names={list(self._names)}, ground_truth={gt}, "
            f"exact_sampler={self.has_exact_sampler})"
        )


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:300] if text else ''}"


def _looks_like_numpy(err: Exception) -> bool:
    text = str(err).lower()
    return "numpy" in text or "__array__" in text


def _structure_names(jd: Any, dtype_struct: Any, n: int) -> list[str]:
    if isinstance(dtype_struct, Mapping):
        return [str(k) for k in sorted(dtype_struct)] if n == len(dtype_struct) else _fallback(n)
    fields = getattr(dtype_struct, "_fields", None)
    if fields is not None and len(fields) == n:
        return [str(f) for f in fields]
    if jd is not None:
        try:
            base = getattr(jd, "distribution", jd)
            resolved = list(base._flat_resolve_names())
            pins = getattr(jd, "pins", None) or {}
            resolved = [r for r in resolved if r not in pins]
            if len(resolved) == n and len(set(resolved)) == n:
                return [str(r) for r in resolved]
        except (AttributeError, TypeError, ValueError):
            pass
    return _fallback(n)


def _flatten_up_to(structure: Any, value: Any) -> list[Any]:
    """Flattens `value` only as deep as `structure` (its leaves may be lists, shapes)."""
    if isinstance(structure, Mapping):
        return [x for k in sorted(structure) for x in _flatten_up_to(structure[k], value[k])]
    if isinstance(structure, (list, tuple)):
        if len(structure) != len(value):
            raise ValueError(f"structure mismatch: {structure} vs {value}")
        return [x for s, v in zip(structure, value, strict=True) for x in _flatten_up_to(s, v)]
    return [value]


def _fallback(n: int) -> list[str]:
    return [f"x{i}" for i in range(n)]


# -- built-in targets ------------------------------------------------------------


def neals_funnel(ndims: int = 10, *, dtype: Any = tf.float32) -> Target:
    """Neal's funnel: ``x0 ~ N(0, 3)``, ``x_i ~ N(0, exp(x0 / 2))`` for ``i = 1..ndims-1``.

    One variable ``"x"`` of shape ``[ndims]``. Ground truth (exact): ``x0`` has
    mean 0 and standard deviation 3; each ``x_i`` has mean 0 and
    ``Var(x_i) = E[exp(x0)] = exp(9 / 2)``, so standard deviation ``exp(9 / 4)``.
    Has an exact sampler.
    """
    ndims = check_positive_int(ndims, "ndims", minimum=2)
    dtype = canonical_dtype(dtype)

    def log_prob_fn(x):
        x0 = x[..., 0]
        rest = x[..., 1:]
        lp0 = tfd.Normal(tf.constant(0.0, dtype), tf.constant(3.0, dtype)).log_prob(x0)
        scale = tf.exp(x0 / 2)[..., tf.newaxis]
        lp_rest = tfd.Normal(tf.zeros([], dtype), scale).log_prob(rest)
        return lp0 + tf.reduce_sum(lp_rest, axis=-1)

    def sample_fn(n, seed):
        s0, s1 = split_seed(seed, 2)
        x0 = 3.0 * tf.random.stateless_normal([n, 1], seed=s0, dtype=dtype)
        rest = tf.exp(x0 / 2) * tf.random.stateless_normal([n, ndims - 1], seed=s1, dtype=dtype)
        return tf.concat([x0, rest], axis=-1)

    std = np.full([ndims], math.exp(9.0 / 4.0))
    std[0] = 3.0
    return Target(
        log_prob_fn,
        [ndims],
        dtype,
        name=f"neals_funnel_{ndims}d",
        ground_truth_mean=np.zeros([ndims]),
        ground_truth_std=std,
        sample_fn=sample_fn,
    )


def banana(ndims: int = 2, curvature: float = 0.03, *, dtype: Any = tf.float32) -> Target:
    """The banana: ``x0 ~ N(0, 10)``, ``x1 ~ N(b (x0^2 - 100), 1)`` with ``b = curvature``.

    Coordinates beyond the second (``ndims > 2``) are independent ``N(0, 1)``.
    Normalised (``log p`` integrates to 1), so ``-ELBO`` estimates ``KL(q || p)``
    up to the ELBO's bias. Ground truth (exact): ``E[x1] = b (E[x0^2] - 100) = 0``
    and ``Var(x1) = 1 + b^2 Var(x0^2) = 1 + 2 b^2 10^4``. Has an exact sampler.
    """
    ndims = check_positive_int(ndims, "ndims", minimum=2)
    dtype = canonical_dtype(dtype)
    b = float(curvature)
    if not math.isfinite(b):
        raise ValueError(f"curvature must be finite, got {curvature}")

    def log_prob_fn(x):
        x0, x1 = x[..., 0], x[..., 1]
        normal = tfd.Normal(tf.zeros([], dtype), tf.ones([], dtype))
        lp = tfd.Normal(tf.zeros([], dtype), tf.constant(10.0, dtype)).log_prob(x0)
        lp = lp + normal.log_prob(x1 - b * (tf.square(x0) - 100.0))
        if ndims > 2:
            lp = lp + tf.reduce_sum(normal.log_prob(x[..., 2:]), axis=-1)
        return lp

    def sample_fn(n, seed):
        eps = tf.random.stateless_normal([n, ndims], seed=seed, dtype=dtype)
        x0 = 10.0 * eps[:, :1]
        x1 = eps[:, 1:2] + b * (tf.square(x0) - 100.0)
        return tf.concat([x0, x1, eps[:, 2:]], axis=-1)

    std = np.ones([ndims])
    std[0] = 10.0
    std[1] = math.sqrt(1.0 + 2.0 * b**2 * 1e4)
    return Target(
        log_prob_fn,
        [ndims],
        dtype,
        name=f"banana_{ndims}d",
        ground_truth_mean=np.zeros([ndims]),
        ground_truth_std=std,
        sample_fn=sample_fn,
    )


def _gaussian_target(mean, scale_tril, name, dtype) -> Target:
    """A Gaussian target ``N(mean, L L^T)`` from numpy float64 ``mean`` and ``scale_tril``."""
    d = mean.shape[0]
    cov = scale_tril @ scale_tril.T
    mvn_mean = tf.constant(mean, dtype)
    mvn_tril = tf.constant(scale_tril, dtype)

    def log_prob_fn(x):
        return tfd.MultivariateNormalTriL(mvn_mean, mvn_tril).log_prob(x)

    def sample_fn(n, seed):
        eps = tf.random.stateless_normal([n, d], seed=seed, dtype=dtype)
        return mvn_mean + tf.linalg.matvec(mvn_tril, eps)

    t = Target(
        log_prob_fn,
        [d],
        dtype,
        name=name,
        ground_truth_mean=mean,
        ground_truth_std=np.sqrt(np.diag(cov)),
        sample_fn=sample_fn,
    )
    t.covariance = cov
    return t


def correlated_gaussian(
    ndims: int = 2,
    rho: float = 0.9,
    *,
    mean: Any = 0.0,
    scale: Any = 1.0,
    dtype: Any = tf.float32,
) -> Target:
    """An equicorrelated Gaussian: ``Cov = diag(s) ((1 - rho) I + rho 11^T) diag(s)``.

    ``mean`` and ``scale`` (``s``) broadcast to ``[ndims]``; ``rho`` must lie in
    ``(-1 / (ndims - 1), 1)``. The exact covariance is kept in ``target.covariance``
    (a float64 numpy array) for tests. Exact ground truth and sampler.
    """
    ndims = check_positive_int(ndims, "ndims")
    dtype = canonical_dtype(dtype)
    rho = float(rho)
    low = -1.0 / (ndims - 1) if ndims > 1 else -1.0
    if not (low < rho < 1.0):
        raise ValueError(f"rho must lie in ({low:.4g}, 1) for ndims={ndims}, got {rho}")
    mean = np.broadcast_to(np.asarray(mean, np.float64), [ndims]).copy()
    scale = np.broadcast_to(np.asarray(scale, np.float64), [ndims]).copy()
    if not np.all(scale > 0):
        raise ValueError(f"scale must be positive, got {scale}")
    corr = (1.0 - rho) * np.eye(ndims) + rho * np.ones([ndims, ndims])
    cov = corr * np.outer(scale, scale)
    return _gaussian_target(mean, np.linalg.cholesky(cov), f"correlated_gaussian_{ndims}d", dtype)


def ill_conditioned_gaussian(ndims: int = 100, *, seed: int = 1, dtype: Any = tf.float32) -> Target:
    """The NeuTra paper's ill-conditioned Gaussian ``N(0, Q diag(1 / lam) Q^T)``.

    The precision's eigenvalues ``lam`` are drawn from ``Gamma(0.8, rate=1)`` and
    ``Q`` is a uniformly random rotation (QR of a Gaussian matrix with the sign
    fix), both from ``numpy.random.default_rng(seed)``, so the target is fixed for
    a given ``seed``. Exact ground truth and sampler; ``target.covariance`` holds
    the covariance (float64 numpy).
    """
    ndims = check_positive_int(ndims, "ndims")
    dtype = canonical_dtype(dtype)
    rng = np.random.default_rng(check_positive_int(seed, "seed", minimum=0))
    lam = rng.gamma(shape=0.8, scale=1.0, size=ndims)
    q, r = np.linalg.qr(rng.standard_normal([ndims, ndims]))
    q = q * np.sign(np.diag(r))
    # Cholesky of the covariance via QR of its square root, for numerical safety
    # when the condition number is large.
    root = q * (1.0 / np.sqrt(lam))
    _, r2 = np.linalg.qr(root.T)
    tril = r2.T * np.sign(np.diag(r2))
    return _gaussian_target(np.zeros(ndims), tril, f"ill_conditioned_gaussian_{ndims}d", dtype)


_SCALE_BIJECTORS: dict[str, Callable[[], tfb.Bijector]] = {"exp": tfb.Exp, "softplus": tfb.Softplus}


def _load_german_credit() -> tuple[np.ndarray, np.ndarray]:
    resource = importlib.resources.files("neutra_flows").joinpath("data/german_credit_numeric.csv")
    with resource.open("r") as f:
        raw = np.loadtxt(f, delimiter=",")
    features, labels = raw[:, :-1], raw[:, -1]
    # Population standard deviation, as TFP's inference_gym does.
    features = (features - features.mean(axis=0)) / features.std(axis=0)
    features = np.concatenate([features, np.ones([features.shape[0], 1])], axis=1)
    return features, labels - 1.0


def german_credit_sparse_logistic_regression(*, dtype: Any = tf.float32, scale_bijector: str = "exp") -> Target:
    """The NeuTra paper's 51-D sparse logistic regression on German credit (numeric).

    ::

        global_scale ~ Gamma(0.5, 0.5)
        local_scales[i] ~ Gamma(0.5, 0.5),   unscaled_weights[i] ~ N(0, 1),   i < 25
        weights = unscaled_weights * local_scales * global_scale
        label[j] ~ Bernoulli(logits = features[j] @ weights)

    1000 points, 24 standardised features (population std) plus a bias column,
    labels = class - 1. The positive scales are unconstrained with
    ``scale_bijector``: ``"exp"`` (the default) or ``"softplus"``, the two
    options of TFP's inference_gym ``GermanCreditNumericSparseLogisticRegression``
    (``positive_constraint_fn``), the same model. The flat vector is
    ``[b^-1(global_scale), b^-1(local_scales) (25), unscaled_weights (25)]``.

    Ground truth: inference_gym's published Stan estimates of the posterior mean
    and standard deviation of ``global_scale``, ``local_scales`` and
    ``unscaled_weights`` (see :mod:`neutra_flows.models._german_credit_truth`);
    estimates from long runs, not exact values.
    """
    # Imported here: the models package imports this module.
    from neutra_flows.models import _german_credit_truth

    if scale_bijector not in _SCALE_BIJECTORS:
        raise ValueError(f"scale_bijector must be one of {sorted(_SCALE_BIJECTORS)}, got {scale_bijector!r}")
    dtype = canonical_dtype(dtype)
    features_np, labels_np = _load_german_credit()
    features = tf.constant(features_np, dtype)
    labels = tf.constant(labels_np, dtype)
    k = features_np.shape[1]
    half = tf.constant(0.5, dtype)
    prior = tfd.JointDistributionNamed(
        dict(
            unscaled_weights=tfd.Sample(tfd.Normal(tf.zeros([], dtype), 1.0), k),
            local_scales=tfd.Sample(tfd.Gamma(half, half), k),
            global_scale=tfd.Gamma(half, half),
        )
    )

    def log_prob_fn(x):
        weights = x["unscaled_weights"] * x["local_scales"] * x["global_scale"][..., tf.newaxis]
        logits = tf.einsum("nd,...d->...n", features, weights)
        # Bernoulli log-likelihood written with softplus for stability at large |logits|.
        loglik = labels * logits - tf.nn.softplus(logits)
        return prior.log_prob(x) + tf.reduce_sum(loglik, axis=-1)

    positive = _SCALE_BIJECTORS[scale_bijector]
    bijectors = dict(unscaled_weights=tfb.Identity(), local_scales=positive(), global_scale=positive())
    return Target._from_structure(
        log_prob_fn=log_prob_fn,
        structured_bijector=tfb.JointMap(bijectors),
        event_shape=prior.event_shape,
        dtype_struct=prior.dtype,
        names=sorted(bijectors),
        name="german_credit_sparse_logistic_regression",
        ground_truth_mean=_german_credit_truth.MEAN,
        ground_truth_std=_german_credit_truth.STD,
    )


_EIGHT_SCHOOLS_Y = np.array([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
_EIGHT_SCHOOLS_SIGMA = np.array([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])


def eight_schools(*, dtype: Any = tf.float32) -> Target:
    """Eight schools, centred parameterization (the classic funnel in a real model).

    ::

        mu ~ N(0, 5),  tau ~ HalfCauchy(0, 5),
        theta[i] ~ N(mu, tau),  y[i] ~ N(theta[i], sigma[i]),  i < 8

    Built from a pinned ``JointDistributionCoroutine``: the variables
    are ``mu``, ``tau`` (positive, unconstrained by TFP's default bijector) and
    ``theta`` (shape ``[8]``); ``d = 10``. Ground truth: ``None``.
    """
    dtype = canonical_dtype(dtype)
    y = tf.constant(_EIGHT_SCHOOLS_Y, dtype)
    sigma = tf.constant(_EIGHT_SCHOOLS_SIGMA, dtype)
    zero, five = tf.constant(0.0, dtype), tf.constant(5.0, dtype)

    root = tfd.JointDistributionCoroutine.Root

    # Written batch-aware by hand (not AutoBatched): eager calls stay cheap.
    @tfd.JointDistributionCoroutine
    def model():
        mu = yield root(tfd.Normal(zero, five, name="mu"))
        tau = yield root(tfd.HalfCauchy(zero, five, name="tau"))
        ones = tf.ones([8], dtype)
        theta = yield tfd.Independent(
            tfd.Normal(mu[..., tf.newaxis] * ones, tau[..., tf.newaxis] * ones), 1, name="theta"
        )
        yield tfd.Independent(tfd.Normal(theta, sigma), 1, name="y")

    return Target.from_joint_distribution(model.experimental_pin(y=y), name="eight_schools")
