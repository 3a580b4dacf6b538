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

* ``Target(log_prob_fn, event_shape, ...)`` for a plain batched callable (one
  array, or a structure of arrays);
* :meth:`Target.from_joint_distribution` for a (pinned) TFP ``JointDistribution``;
* :meth:`Target.from_inference_gym` for anything shaped like an inference_gym model;
* the built-ins of :mod:`neutra_flows.models`: textbook targets with exact ground
  truth (funnel, banana, Gaussians, German credit, eight schools) and real models
  with reference posteriors (posteriordb).

Example:

>>> import numpy as np
>>> import tensorflow as tf
>>> t = Target(lambda x: -0.5 * tf.reduce_sum(tf.square(x), axis=-1), 2, names=["a", "b"],
...            ground_truth_mean=[0.0, 0.0], ground_truth_std=[1.0, 1.0])
>>> t.event_size, t.names
(2, ('a', 'b'))
>>> t.ground_truth_std["b"]
array(1., dtype=float32)
>>> t.named_draws(np.zeros([4, 3, 2]))["a"].shape
(4, 3)
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from neutra_flows import _checks, _layout
from neutra_flows._utils import as_seed, check_positive_int
from neutra_flows.derived import DerivedQuantity, named_leaves

tfb = tfp.bijectors
tfd = tfp.distributions

__all__ = ["Target"]


class Target:
    """An unnormalized log density on ``R^d`` plus the way back to the user's variables.

    Args:
      log_prob_fn: a batched callable ``x -> log p(x)`` on the constrained space:
        it receives ``[..., *event_shape]`` and returns ``[...]`` (sum over the
        event dimensions yourself). Need not be normalised.
      event_shape: the shape of one point given to ``log_prob_fn`` (an int for a
        vector). The unconstrained space is
        ``constraining_bijector.inverse_event_shape(event_shape)`` flattened to
        ``[d]``. With a structured ``dtype``, the matching structure of shapes.
      dtype: ``tf.float32`` or ``tf.float64``; or, for several variables, a
        structure (dict, list, namedtuple) of one of them, which ``log_prob_fn``
        then receives as ``{name: [..., *shape_k]}`` (the same structure).
      constraining_bijector: a ``tfb.Bijector`` from the unconstrained space onto
        the support of ``log_prob_fn`` (``tfb.Exp()`` for a positive vector, ...;
        a joint bijector such as ``tfb.JointMap`` for a structure). ``None``
        means the identity.
      names: ``None`` (one variable ``"x"``), a single name, or, for a vector
        event, one name per coordinate (each becomes a scalar variable). For a
        structure, one name per variable in ``tf.nest`` order; ``None`` takes the
        dict keys or namedtuple fields.
      name: a label used in messages and reports.
      ground_truth_mean, ground_truth_std: the exact posterior mean and standard
        deviation in the constrained space, as a dict keyed like
        :meth:`named_draws` or as one array of shape ``event_shape``; ``None`` when
        unknown.
      ground_truth_mean_se: the truth's own Monte Carlo standard error of the
        mean (shaped like ``ground_truth_mean``), where the truth is itself an
        estimate; ``compare`` then tests ``|mean - truth| / sqrt(MCSE^2 + SE^2)``.
      derived: a :class:`~neutra_flows.derived.DerivedQuantity` (a function of the
        draws with its own truth) that ``sample`` evaluates on the draws and
        ``compare`` checks; ``from_inference_gym`` makes one where the gym's
        truth is not of the sampled variables.
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
        event_shape: int | Sequence[int] | Any,
        dtype: Any = tf.float32,
        constraining_bijector: tfb.Bijector | None = None,
        names: str | Sequence[str] | None = None,
        *,
        name: str = "target",
        ground_truth_mean: Any = None,
        ground_truth_std: Any = None,
        sample_fn: Callable[[int, Any], Any] | None = None,
        validate: bool = True,
        ground_truth_mean_se: Any = None,
        derived: Any = None,
    ):
        if not callable(log_prob_fn):
            raise ValueError(f"log_prob_fn must be callable, got {type(log_prob_fn).__name__}")
        self._dtype = _layout.common_dtype(dtype)
        self._layout = _layout.make_layout(event_shape, dtype, constraining_bijector, names)
        if sample_fn is not None and not callable(sample_fn):
            raise ValueError(f"sample_fn must be callable or None, got {type(sample_fn).__name__}")
        self._log_prob_fn = log_prob_fn
        self.name = str(name)
        self._sample_fn = sample_fn
        self._ground_truth_mean = self._layout.named_values(ground_truth_mean, "ground_truth_mean", self._dtype)
        self._ground_truth_std = self._layout.named_values(ground_truth_std, "ground_truth_std", self._dtype)
        self._ground_truth_mean_se = self._layout.named_values(ground_truth_mean_se, "ground_truth_mean_se",
                                                               self._dtype)
        if derived is not None and not callable(getattr(derived, "draws", None)):
            raise ValueError(f"derived must be a DerivedQuantity, got {type(derived).__name__}")
        self.derived = derived
        if validate:
            _checks.validate_at_start(self)

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

        Raises:
          ValueError: ``jd`` is not a joint distribution; a latent variable is
            discrete (an integer or boolean dtype, or no default event-space
            bijector: ``Poisson``, ``Bernoulli``, ``Categorical``), or the model
            is batched (a batch shape other than ``[]``); the message names the
            variable.
        """
        needed = ("experimental_default_event_space_bijector", "event_shape", "dtype")
        missing = [a for a in needed if not hasattr(jd, a)]
        if missing:
            raise ValueError(
                f"from_joint_distribution needs a tfp JointDistribution (or one pinned with "
                f"experimental_pin); {type(jd).__name__} lacks {missing}"
            )
        names = _layout.variable_names(jd.dtype, lambda: _resolved_names(jd))
        _check_jd_latents(jd, names)
        log_prob = getattr(jd, "unnormalized_log_prob", None) or jd.log_prob
        log_prob, event_shape, dtype, bijector = _as_structure(
            log_prob, jd.event_shape, jd.dtype, _event_space_bijector(jd)
        )
        return cls(
            log_prob,
            event_shape,
            dtype,
            bijector,
            names,
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
        ``event_shape`` and ``dtype`` (both possibly structures: a dict, a
        namedtuple, the gym's ``StructTuple``). ``inference_gym`` itself is not needed.

        The truth comes from ``sample_transformations['identity']`` (its
        ``ground_truth_mean``, ``ground_truth_standard_deviation`` and
        ``ground_truth_mean_standard_error``). Where that transformation really
        is the identity on the model's variables (checked at a few points), the
        truth is the variables' own. Elsewhere (the gym's stochastic-volatility
        models centre the log-volatility; its Brownian-motion models stack
        ``x_0 ... x_29`` into ``locs``) the transformation becomes the target's
        :attr:`derived` quantity: ``sample`` applies it to the draws and
        ``compare`` checks those against the truth. A part of the truth that
        matches no output is dropped with a ``UserWarning`` saying why.
        """
        needed = ("unnormalized_log_prob", "default_event_space_bijector", "event_shape", "dtype")
        missing = [a for a in needed if not hasattr(model, a)]
        if missing:
            raise ValueError(
                f"from_inference_gym needs a model with {list(needed)}; {type(model).__name__} lacks {missing}"
            )
        try:
            return cls._from_gym_model(model, validate)
        except ModuleNotFoundError as err:
            if "tensorflow_datasets" not in str(err):
                raise
            raise ValueError(
                f"{getattr(model, 'name', None) or type(model).__name__} is conditioned on a dataset that "
                "inference_gym downloads with TensorFlow Datasets, which is not installed: pip install "
                "tensorflow-datasets (the first load also needs network access). The German credit numeric "
                "regressions ship with this package: neutra_flows.models.german_credit_numeric_regression"
            ) from err

    @classmethod
    def _from_gym_model(cls, model: Any, validate: bool) -> Target:
        structured = tf.nest.is_nested(model.dtype)
        bijector = model.default_event_space_bijector
        if not isinstance(bijector, tfb.Bijector):
            bijector = tfb.JointMap(bijector)
        log_prob, event_shape, dtype, bijector = _as_structure(
            model.unnormalized_log_prob, model.event_shape, model.dtype, bijector
        )
        name = str(getattr(model, "name", None) or type(model).__name__)
        names = _layout.variable_names(dtype) if structured else ["x"]
        make = functools.partial(cls, log_prob, event_shape, dtype, bijector, names, name=name)
        transformations = getattr(model, "sample_transformations", None) or {}
        identity = transformations.get("identity") if isinstance(transformations, Mapping) else None
        if identity is None:
            return make(validate=validate)
        target = make(validate=False)  # only to evaluate the transformation at a few points
        # The target hands the model's value wrapped in a list when the model has one array.
        as_model = (lambda value: value) if structured else (lambda value: value[0])
        # A transformation that only carries a truth (no function) is taken at its name: the identity.
        apply = identity if callable(identity) else (lambda value: value)
        derived = DerivedQuantity.build(
            lambda value: apply(as_model(value)), target.constrain(_probe_points(target)), name="identity",
            mean=getattr(identity, "ground_truth_mean", None),
            std=getattr(identity, "ground_truth_standard_deviation", None),
            mean_se=getattr(identity, "ground_truth_mean_standard_error", None), owner=name)
        if not derived.has_truth:
            return make(validate=validate)
        if _is_identity(derived, target):
            return make(validate=validate, ground_truth_mean=derived.ground_truth_mean,
                        ground_truth_std=derived.ground_truth_std,
                        ground_truth_mean_se=derived.ground_truth_mean_se)
        return make(validate=validate, derived=derived)

    # -- the contract -----------------------------------------------------------

    @property
    def event_size(self) -> int:
        """``d``: the size of the flat unconstrained vector."""
        return self._layout.event_size

    @property
    def dtype(self) -> tf.DType:
        return self._dtype

    @property
    def names(self) -> tuple[str, ...]:
        return self._layout.names

    @property
    def event_shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self._layout.event_shapes)

    @property
    def constraining_bijector(self) -> tfb.Bijector:
        """The bijector from flat ``[..., d]`` to the user's constrained value."""
        return self._layout.bijector if self._layout.bijector is not None else tfb.Identity()

    @property
    def ground_truth_mean(self) -> dict[str, np.ndarray] | None:
        return None if self._ground_truth_mean is None else dict(self._ground_truth_mean)

    @property
    def ground_truth_std(self) -> dict[str, np.ndarray] | None:
        return None if self._ground_truth_std is None else dict(self._ground_truth_std)

    @property
    def ground_truth_mean_se(self) -> dict[str, np.ndarray] | None:
        """The truth's own standard error of the mean, where it is an estimate; else None."""
        return None if self._ground_truth_mean_se is None else dict(self._ground_truth_mean_se)

    @property
    def has_exact_sampler(self) -> bool:
        return self._sample_fn is not None

    def unnormalized_log_prob(self, z: Any) -> tf.Tensor:
        """``[..., d] -> [...]``: ``log_prob_fn(c(z)) + log|det c'(z)|``."""
        z = tf.convert_to_tensor(z, dtype=self._dtype)
        bijector = self._layout.bijector
        if bijector is None:
            lp = self._log_prob_fn(z)
            return tf.cast(lp, self._dtype)
        x = bijector.forward(z)
        lp = tf.cast(self._log_prob_fn(x), self._dtype)
        return lp + tf.cast(bijector.forward_log_det_jacobian(z, event_ndims=1), self._dtype)

    def constrain(self, z: Any) -> Any:
        """The constraining bijector's forward: ``[..., d]`` to the user's value."""
        z = tf.convert_to_tensor(z, dtype=self._dtype)
        return z if self._layout.bijector is None else self._layout.bijector.forward(z)

    def unconstrain(self, x: Any) -> tf.Tensor:
        """The inverse of :meth:`constrain`: a constrained value to flat ``[..., d]``.

        ``x`` is a dict keyed by :attr:`names` or the structure ``log_prob_fn`` takes.
        """
        if isinstance(x, Mapping) and set(x) == set(self.names):
            x = self._layout.pack([tf.convert_to_tensor(x[k], dtype=self._dtype) for k in self.names])
        x = tf.nest.map_structure(lambda t: tf.convert_to_tensor(t, dtype=self._dtype), x)
        return x if self._layout.bijector is None else self._layout.bijector.inverse(x)

    def named_draws(self, z: Any) -> dict[str, np.ndarray]:
        """``[..., d]`` unconstrained draws to ``{name: [..., *event_shape]}`` (constrained)."""
        z = np.asarray(z)
        if z.ndim == 0 or z.shape[-1] != self.event_size:
            raise ValueError(f"{self.name}: named_draws expects [..., {self.event_size}], got shape {z.shape}")
        leaves = self._layout.leaves(self.constrain(z))
        return {k: np.asarray(v) for k, v in zip(self.names, leaves, strict=True)}

    def sample(self, n: int, seed: Any) -> tf.Tensor:
        """Exact draws as flat unconstrained ``[n, d]``.

        Raises ``NotImplementedError`` when :attr:`has_exact_sampler` is False.
        """
        n = check_positive_int(n, "n")
        if self._sample_fn is None:
            raise NotImplementedError(f"{self.name} has no exact sampler")
        x = self._sample_fn(n, as_seed(seed))
        z = self.unconstrain(x)
        return tf.reshape(z, [n, self.event_size])

    def check(self, z: Any) -> None:
        """Raises ``ValueError`` if the log density at ``z`` (``[..., d]``) is NaN or
        ``+inf``, has the wrong shape, or cannot be evaluated, or if its gradient is
        missing (None) or zero at every point where it is finite. ``-inf`` is allowed."""
        _checks.check_points(self, z)

    def __repr__(self) -> str:
        gt = "known" if self._ground_truth_mean is not None else "unknown"
        return (
            f"Target(name={self.name!r}, event_size={self.event_size}, "
            f"dtype={self._dtype.name}, names={list(self.names)}, ground_truth={gt}, "
            f"exact_sampler={self.has_exact_sampler})"
        )


def _as_structure(log_prob_fn: Callable, event_shape: Any, dtype: Any, bijector: tfb.Bijector) -> tuple:
    """``(log_prob_fn, event_shape, dtype, bijector)`` of a structured model; a model of one
    tensor is wrapped as a one-element list, so the structured layout applies unchanged."""
    if tf.nest.is_nested(dtype):
        return log_prob_fn, event_shape, dtype, bijector

    def first(x):
        return log_prob_fn(x[0])

    return first, [tf.TensorShape(event_shape)], [dtype], tfb.JointMap([bijector])


_CONTINUOUS_ONLY = (
    "a Target's variables must be continuous (NeuTra moves them along gradients): pin it to "
    "observed data with jd.experimental_pin, or sum it out of the model (e.g. tfd.MixtureSameFamily "
    "over its values)"
)


def _check_jd_latents(jd: Any, names: Sequence[str]) -> None:
    """Refuses integer or boolean latents and batched models, naming the variable, before TFP trips on them."""
    for name, dtype in zip(names, tf.nest.flatten(jd.dtype), strict=False):
        if not tf.as_dtype(dtype).is_floating:
            raise ValueError(
                f"from_joint_distribution: the latent variable {name!r} is discrete "
                f"({tf.as_dtype(dtype).name}); {_CONTINUOUS_ONLY}"
            )
    # An AutoBatched model has one batch shape; the others one per variable.
    shapes = jd.batch_shape
    named = zip(names, tf.nest.flatten(shapes), strict=False) if tf.nest.is_nested(shapes) else [(None, shapes)]
    for name, shape in named:
        shape = tf.TensorShape(shape)
        if shape.rank is not None and shape.rank > 0:
            what = "the model" if name is None else f"the variable {name!r}"
            raise ValueError(
                f"from_joint_distribution: {what} has batch shape {shape.as_list()}, so the model is a "
                "batch of independent models, not one target. Make the batch part of the event: "
                "tfd.Sample(..., n) or tfd.Independent(..., reinterpreted_batch_ndims=1), or use a "
                "JointDistribution*AutoBatched with batch_ndims=0"
            )


def _event_space_bijector(jd: Any) -> tfb.Bijector:
    """``jd``'s default event-space bijector; a ``ValueError`` naming a latent that has none."""
    try:
        return jd.experimental_default_event_space_bijector()
    except AttributeError as err:
        # TFP builds its joint bijector from every part's, and a discrete part
        # (Poisson, Bernoulli of floats) has None: name the culprit instead.
        discrete = _latents_without_bijector(jd)
        if not discrete:
            raise
        raise ValueError(
            f"from_joint_distribution: the latent variable(s) {', '.join(discrete)} are discrete (no "
            f"default event-space bijector); {_CONTINUOUS_ONLY}"
        ) from err


def _latents_without_bijector(jd: Any) -> list[str]:
    """``"name (Distribution)"`` of each unpinned part of ``jd`` without an event-space bijector."""
    base = getattr(jd, "distribution", jd)
    pins = getattr(jd, "pins", None) or {}
    parts, _ = base.sample_distributions(seed=(0, 0))
    return [f"{name!r} ({type(part).__name__})"
            for name, part in zip(base._flat_resolve_names(), base._model_flatten(parts), strict=True)
            if name not in pins and part.experimental_default_event_space_bijector() is None]


def _resolved_names(jd: Any) -> list[str] | None:
    """The variable names a (pinned) joint distribution resolves, or None."""
    try:
        base = getattr(jd, "distribution", jd)
        resolved = list(base._flat_resolve_names())
        pins = getattr(jd, "pins", None) or {}
        return [r for r in resolved if r not in pins]
    except (AttributeError, TypeError, ValueError):
        return None


def _probe_points(target: Target) -> tf.Tensor:
    """A few fixed unconstrained points, to evaluate a transformation at."""
    return tf.random.stateless_normal([3, target.event_size], seed=[3, 5], dtype=target.dtype)


def _is_identity(derived: DerivedQuantity, target: Target) -> bool:
    """Whether ``derived`` returns the target's own variables (same names, shapes and values)."""
    if derived.shapes != target.event_shapes:
        return False
    z = _probe_points(target)
    out = named_leaves(derived.fn(target.constrain(z)))
    own = target.named_draws(z.numpy())
    return all(np.allclose(np.asarray(out[k], np.float64), np.asarray(own[k], np.float64), rtol=1e-5, atol=1e-6)
               for k in own)
