"""The flow registry: `make_flow(name, event_size, **options)` and `FLOW_NAMES`.

Each entry of `_REGISTRY` is a `FlowSpec`: a builder
``(event_size, dtype, **options) -> list of layers`` (in forward order) and the
options it accepts with their defaults. `make_flow` checks the options
(`_OPTION_CHECKS` normalises each known option; a spec may add its own checks),
builds the layers, and wraps them in a `neutra_flows.bijectors.Flow` carrying
``flow_config`` (the resolved options, JSON-able) and ``exact_log_det``.

Adding a flow costs one entry::

    "sylvester": FlowSpec(_build_sylvester, {**_NETWORK, "num_layers": 4}, "..."),

plus, for an option name not seen before, a check in ``checks=`` (or in
`_OPTION_CHECKS` if several flows share it). `FLOW_NAMES` follows the registry.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp
import tf_keras

from neutra_flows._utils import canonical_dtype, check_positive_int
from neutra_flows.bijectors import (
    IAF,
    MAF,
    AffineDiagonal,
    AffineLowerTriangular,
    Flow,
    Identity,
    NeuralSplineFlow,
    RealNVP,
)
from neutra_flows.bijectors.affine import AffineTransformer
from neutra_flows.bijectors.bnaf import BlockNeuralAutoregressive
from neutra_flows.bijectors.linear import LULinear
from neutra_flows.bijectors.naf import NAF, DeepSigmoidalTransformer
from neutra_flows.bijectors.residual import RESIDUAL_ACTIVATIONS, InvertibleResidual
from neutra_flows.bijectors.spline import RationalQuadraticTransformer
from neutra_flows.bijectors.sylvester import HouseholderSylvester
from neutra_flows.nn import MADE, MLP

tfb = tfp.bijectors

__all__ = ["FLOW_NAMES", "FlowSpec", "make_flow"]

Builder = Callable[..., Sequence[tfb.Bijector]]


@dataclasses.dataclass(frozen=True)
class FlowSpec:
    """One registry entry.

    Attributes:
      build: ``build(event_size, dtype, **options) -> layers`` in forward order.
      defaults: the options the flow accepts, with their defaults.
      summary: one line for error messages and docs.
      checks: extra option checks ``name -> (value, event_size) -> value``,
        used before the shared `_OPTION_CHECKS`.
      exact_log_det: ``False`` for flows whose log-det is a stochastic estimate.
    """

    build: Builder
    defaults: Mapping[str, Any]
    summary: str
    checks: Mapping[str, Callable[[Any, int], Any]] = dataclasses.field(default_factory=dict)
    exact_log_det: bool = True


# ---------------------------------------------------------------- option checks


def _check_num_layers(value: Any, event_size: int) -> int:
    return check_positive_int(value, "num_layers")


def _check_hidden_units(value: Any, event_size: int) -> list[int]:
    if value is None:
        # The NeuTra paper uses [d, d]; small d gets a floor of 32 units.
        return [max(event_size, 32)] * 2
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) == 0:
        raise ValueError(f"hidden_units must be a non-empty list of ints >= 1, got {value!r}")
    return [check_positive_int(v, "each hidden_units entry") for v in value]


def _check_activation(value: Any, event_size: int) -> str:
    if not isinstance(value, str):
        raise ValueError(f"activation must be a tf_keras activation name such as 'elu', got {value!r}")
    try:
        tf_keras.activations.get(value)
    except (ValueError, TypeError) as err:
        raise ValueError(f"activation {value!r} is not a tf_keras activation name") from err
    return value


_PERMUTATIONS = ("reverse", "random")


def _check_permutation(value: Any, event_size: int) -> str:
    if value not in _PERMUTATIONS:
        raise ValueError(f"permutation must be one of {_PERMUTATIONS}, got {value!r}")
    return value


def _check_seed(value: Any, event_size: int) -> int:
    return check_positive_int(value, "seed", minimum=0)


def _check_num_bins(value: Any, event_size: int) -> int:
    return check_positive_int(value, "num_bins", minimum=2)


def _check_bound(value: Any, event_size: int) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"bound must be a finite number > 0, got {value!r}")
    if not (math.isfinite(float(value)) and float(value) > 0):
        raise ValueError(f"bound must be a finite number > 0, got {value!r}")
    return float(value)


def _check_output_affine(value: Any, event_size: int) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"output_affine must be True or False, got {value!r}")
    return bool(value)


_WHITENING = ("auto", "full", "diag", "none")


def _check_whitening(value: Any, event_size: int) -> str:
    """``"auto"`` resolves here, so a saved config rebuilds the same layer."""
    if value not in _WHITENING:
        raise ValueError(f"whitening must be one of {_WHITENING}, got {value!r}")
    if value == "auto":
        from neutra_flows.whitening import FULL_RANK_MAX_DIM

        return "full" if event_size <= FULL_RANK_MAX_DIM else "diag"
    return value


_OPTION_CHECKS: dict[str, Callable[[Any, int], Any]] = {
    "output_affine": _check_output_affine,
    "whitening": _check_whitening,
    "num_layers": _check_num_layers,
    "hidden_units": _check_hidden_units,
    "activation": _check_activation,
    "permutation": _check_permutation,
    "seed": _check_seed,
    "num_bins": _check_num_bins,
    "bound": _check_bound,
}


# ---------------------------------------------------------------- stacking


def _permutation_list(event_size: int, count: int, kind: str, seed: int) -> list[np.ndarray]:
    if kind == "reverse":
        return [np.arange(event_size)[::-1] for _ in range(count)]
    rng = np.random.default_rng([seed, 0x5045524D])
    return [rng.permutation(event_size) for _ in range(count)]


def _layer_seeds(seed: int, count: int) -> list[int]:
    state = np.random.SeedSequence([seed, 0x4C415952]).generate_state(count)
    return [int(s) % (2**31 - 1) for s in state]


def _stack(
    make_layer: Callable[[int, int], tfb.Bijector],
    event_size: int,
    *,
    num_layers: int,
    permutation: str,
    seed: int,
) -> list[tfb.Bijector]:
    """``[layer_0, perm_0, layer_1, ..., layer_{L-1}, undo]`` in forward order.

    `make_layer(i, layer_seed)` builds layer ``i``. The final permutation undoes
    the product of the others, so coordinates come out in their input order
    and an untrained stack is exactly the identity whatever ``num_layers``.
    """
    seeds = _layer_seeds(seed, num_layers)
    perms = _permutation_list(event_size, num_layers - 1, permutation, seed) if event_size > 1 else []
    layers: list[tfb.Bijector] = []
    total = np.arange(event_size)
    for i in range(num_layers):
        layers.append(make_layer(i, seeds[i]))
        if i < len(perms):
            # tfb.Permute(p) maps x to x[..., p]; composing p after `total` gives total[p].
            layers.append(tfb.Permute(perms[i].astype(np.int32), name=f"permute_{i}"))
            total = total[perms[i]]
    if not np.array_equal(total, np.arange(event_size)):
        layers.append(tfb.Permute(np.argsort(total).astype(np.int32), name="permute_undo"))
    return layers


# ---------------------------------------------------------------- builders


def _autoregressive_builder(layer_cls: type, spline: bool = False) -> Builder:
    def build(
        event_size: int,
        dtype: tf.DType,
        *,
        num_layers: int,
        hidden_units: list[int],
        activation: str,
        permutation: str,
        seed: int,
        num_bins: int = 8,
        bound: float = 5.0,
    ) -> list[tfb.Bijector]:
        transformer = RationalQuadraticTransformer(num_bins, bound) if spline else AffineTransformer()

        def make_layer(i: int, layer_seed: int) -> tfb.Bijector:
            made = MADE(
                event_size,
                transformer.num_params,
                hidden_units=hidden_units,
                activation=activation,
                seed=layer_seed,
                dtype=dtype,
            )
            if spline:
                return NeuralSplineFlow(
                    made, num_bins=num_bins, bound=bound, autoregressive=True, name=f"nsf_ar_{i}"
                )
            return layer_cls(made, name=f"{layer_cls.__name__.lower()}_{i}")

        return _stack(make_layer, event_size, num_layers=num_layers, permutation=permutation, seed=seed)

    return build


def _coupling_builder(spline: bool) -> Builder:
    def build(
        event_size: int,
        dtype: tf.DType,
        *,
        num_layers: int,
        hidden_units: list[int],
        activation: str,
        permutation: str,
        seed: int,
        num_bins: int = 8,
        bound: float = 5.0,
    ) -> list[tfb.Bijector]:
        num_masked = event_size // 2
        transformer = RationalQuadraticTransformer(num_bins, bound) if spline else AffineTransformer()
        # The MLP's every output sums all its last hidden units, so Adam grows the
        # spline logits fast (MADE's masks cut most of those paths); 10 steps at
        # rate 0.05 gave bins whose slopes fall to ~1e-8, not invertible in
        # float32. Scaling the width and height logits by 1/sqrt(width) keeps
        # the spline well conditioned (Durkan et al.'s reference code does the same).
        logit_scale = 1.0 / math.sqrt(hidden_units[-1]) if num_masked > 0 and hidden_units else 1.0

        def make_layer(i: int, layer_seed: int) -> tfb.Bijector:
            mlp = MLP(
                num_masked,
                (event_size - num_masked, transformer.num_params),
                hidden_units=hidden_units,
                activation=activation,
                seed=layer_seed,
                dtype=dtype,
            )
            if spline:
                return NeuralSplineFlow(
                    mlp,
                    num_bins=num_bins,
                    bound=bound,
                    num_masked=num_masked,
                    logit_scale=logit_scale,
                    name=f"nsf_{i}",
                )
            return RealNVP(mlp, num_masked=num_masked, name=f"real_nvp_{i}")

        return _stack(make_layer, event_size, num_layers=num_layers, permutation=permutation, seed=seed)

    return build


def _build_affine_diag(event_size: int, dtype: tf.DType) -> list[tfb.Bijector]:
    shift = tf.Variable(tf.zeros([event_size], dtype), name="shift")
    log_scale = tf.Variable(tf.zeros([event_size], dtype), name="log_scale")
    return [AffineDiagonal(shift, log_scale)]


def _build_affine_tril(event_size: int, dtype: tf.DType) -> list[tfb.Bijector]:
    shift = tf.Variable(tf.zeros([event_size], dtype), name="shift")
    tril = tf.Variable(tf.zeros([event_size * (event_size + 1) // 2], dtype), name="tril_params")
    return [AffineLowerTriangular(shift, tril)]


def _build_whitening(event_size: int, dtype: tf.DType, kind: str) -> list[tfb.Bijector]:
    """The output-side affine that `fit` sets to a Gaussian fit before training the rest."""
    if kind == "none":
        return []
    shift = tf.Variable(tf.zeros([event_size], dtype), name="whitening_shift")
    if kind == "diag":
        log_scale = tf.Variable(tf.zeros([event_size], dtype), name="whitening_log_scale")
        return [AffineDiagonal(shift, log_scale, name="whitening")]
    tril = tf.Variable(tf.zeros([event_size * (event_size + 1) // 2], dtype), name="whitening_tril_params")
    return [AffineLowerTriangular(shift, tril, name="whitening")]


def _build_identity(event_size: int, dtype: tf.DType) -> list[tfb.Bijector]:
    return [Identity(dtype=dtype)]


# ---------------------------------------------------------------- issue 6 flows
# NAF, BNAF, Sylvester, LU-linear and residual flows (docs/more_flows.md).


def _check_optional_tol(value: Any, event_size: int) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"tol must be None or a number in (0, 1), got {value!r}")
    if not 0.0 < float(value) < 1.0:
        raise ValueError(f"tol must be None or a number in (0, 1), got {value!r}")
    return float(value)


def _check_open_unit(key: str) -> Callable[[Any, int], float]:
    def check(value: Any, event_size: int) -> float:
        ok = not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating))
        if not (ok and 0.0 < float(value) < 1.0):
            raise ValueError(f"{key} must be a number in (0, 1), got {value!r}")
        return float(value)

    return check


def _check_int(key: str, minimum: int = 1) -> Callable[[Any, int], int]:
    return lambda value, event_size: check_positive_int(value, key, minimum=minimum)


def _check_choice(key: str, choices: tuple[str, ...]) -> Callable[[Any, int], str]:
    def check(value: Any, event_size: int) -> str:
        if value not in choices:
            raise ValueError(f"{key} must be one of {choices}, got {value!r}")
        return value

    return check


def _check_num_householder(value: Any, event_size: int) -> int | None:
    return None if value is None else check_positive_int(value, "num_householder")


_ITERATIVE_CHECKS = {"tol": _check_optional_tol, "max_iterations": _check_int("max_iterations")}


def _build_naf(
    event_size: int,
    dtype: tf.DType,
    *,
    num_layers: int,
    hidden_units: list[int],
    activation: str,
    permutation: str,
    seed: int,
    num_components: int,
    min_slope: float,
    tol: float | None,
    max_iterations: int,
) -> list[tfb.Bijector]:
    transformer = DeepSigmoidalTransformer(
        num_components, min_slope=min_slope, tol=tol, max_iterations=max_iterations
    )

    def make_layer(i: int, layer_seed: int) -> tfb.Bijector:
        made = MADE(
            event_size,
            transformer.num_params,
            hidden_units=hidden_units,
            activation=activation,
            seed=layer_seed,
            dtype=dtype,
        )
        return NAF(made, transformer=transformer, name=f"naf_{i}")

    return _stack(make_layer, event_size, num_layers=num_layers, permutation=permutation, seed=seed)


def _build_bnaf(
    event_size: int,
    dtype: tf.DType,
    *,
    num_layers: int,
    hidden_factor: int,
    num_hidden_layers: int,
    permutation: str,
    seed: int,
    tol: float | None,
    max_iterations: int,
) -> list[tfb.Bijector]:
    def make_layer(i: int, layer_seed: int) -> tfb.Bijector:
        return BlockNeuralAutoregressive(
            event_size,
            hidden_factor=hidden_factor,
            num_hidden_layers=num_hidden_layers,
            tol=tol,
            max_iterations=max_iterations,
            seed=layer_seed,
            dtype=dtype,
            name=f"bnaf_{i}",
        )

    return _stack(make_layer, event_size, num_layers=num_layers, permutation=permutation, seed=seed)


def _build_sylvester(
    event_size: int,
    dtype: tf.DType,
    *,
    num_layers: int,
    num_householder: int | None,
    seed: int,
    tol: float | None,
    max_iterations: int,
) -> list[tfb.Bijector]:
    # No permutations: each layer's random rotation Q already mixes coordinates.
    return [
        HouseholderSylvester(
            event_size,
            num_householder=num_householder,
            tol=tol,
            max_iterations=max_iterations,
            seed=layer_seed,
            dtype=dtype,
            name=f"sylvester_{i}",
        )
        for i, layer_seed in enumerate(_layer_seeds(seed, num_layers))
    ]


def _build_lu_linear(event_size: int, dtype: tf.DType, *, permutation: str, seed: int) -> list[tfb.Bijector]:
    return [LULinear(event_size, permutation=permutation, seed=seed, dtype=dtype)]


def _build_residual(
    event_size: int,
    dtype: tf.DType,
    *,
    num_layers: int,
    hidden_units: list[int],
    activation: str,
    lipschitz: float,
    log_det: str,
    seed: int,
    tol: float | None,
    max_iterations: int,
) -> list[tfb.Bijector]:
    return [
        InvertibleResidual(
            event_size,
            hidden_units=hidden_units,
            activation=activation,
            lipschitz=lipschitz,
            log_det=log_det,
            tol=tol,
            max_iterations=max_iterations,
            seed=layer_seed,
            dtype=dtype,
            name=f"residual_{i}",
        )
        for i, layer_seed in enumerate(_layer_seeds(seed, num_layers))
    ]


_MORE_FLOWS: dict[str, FlowSpec] = {
    "naf": FlowSpec(
        _build_naf,
        {
            "num_layers": 3,
            "hidden_units": None,
            "activation": "elu",
            "permutation": "reverse",
            "seed": 0,
            "num_components": 8,
            "output_affine": False,
            "whitening": "auto",
            "min_slope": 0.01,
            "tol": None,
            "max_iterations": 100,
        },
        "neural autoregressive flow, deep sigmoidal transformer (iterative inverse)",
        checks={
            **_ITERATIVE_CHECKS,
            "num_components": _check_int("num_components"),
            "min_slope": _check_open_unit("min_slope"),
        },
    ),
    "bnaf": FlowSpec(
        _build_bnaf,
        {
            "num_layers": 2,
            "hidden_factor": 8,
            "output_affine": True,
            "whitening": "auto",
            "num_hidden_layers": 1,
            "permutation": "reverse",
            "seed": 0,
            "tol": None,
            "max_iterations": 100,
        },
        "block neural autoregressive flow with linear tails (iterative inverse)",
        checks={
            **_ITERATIVE_CHECKS,
            "hidden_factor": _check_int("hidden_factor"),
            "num_hidden_layers": _check_int("num_hidden_layers"),
        },
    ),
    "sylvester": FlowSpec(
        _build_sylvester,
        {
            "num_layers": 4,
            "num_householder": None,
            "output_affine": True,
            "whitening": "auto",
            "seed": 0,
            "tol": None,
            "max_iterations": 100,
        },
        "Householder Sylvester flow (iterative inverse)",
        checks={**_ITERATIVE_CHECKS, "num_householder": _check_num_householder},
    ),
    "lu_linear": FlowSpec(
        _build_lu_linear,
        {"permutation": "identity", "seed": 0},
        "invertible dense layer W = P L U (learned linear mixing)",
        checks={"permutation": _check_choice("permutation", ("identity", "reverse", "random"))},
    ),
    "residual": FlowSpec(
        _build_residual,
        {
            "num_layers": 4,
            "hidden_units": None,
            "activation": "lipswish",
            "lipschitz": 0.9,
            "output_affine": True,
            "whitening": "auto",
            "log_det": "exact",
            "seed": 0,
            "tol": None,
            "max_iterations": 500,
        },
        "invertible residual flow, exact log-det (fixed-point inverse)",
        checks={
            **_ITERATIVE_CHECKS,
            "activation": _check_choice("activation", RESIDUAL_ACTIVATIONS),
            "lipschitz": _check_open_unit("lipschitz"),
            "log_det": _check_choice("log_det", ("exact", "stochastic")),
        },
    ),
}


# ``output_affine`` (a learned elementwise scale and shift after the stack) is
# on where the layers cannot set the target's scale themselves: coupling flows
# train less reliably without it and spline layers are the identity outside
# [-bound, bound]. The autoregressive affine flows scale every coordinate already.
_NETWORK: dict[str, Any] = {
    "num_layers": 3,
    "output_affine": False,
    "whitening": "auto",
    "hidden_units": None,
    "activation": "elu",
    "permutation": "reverse",
    "seed": 0,
}
_SPLINE: dict[str, Any] = {**_NETWORK, "num_layers": 4, "output_affine": True, "num_bins": 8, "bound": 5.0}

_REGISTRY: dict[str, FlowSpec] = {
    "iaf": FlowSpec(_autoregressive_builder(IAF), _NETWORK, "inverse autoregressive flow (parallel forward)"),
    "maf": FlowSpec(_autoregressive_builder(MAF), _NETWORK, "masked autoregressive flow (parallel inverse)"),
    "realnvp": FlowSpec(
        _coupling_builder(spline=False), {**_NETWORK, "num_layers": 4, "output_affine": True}, "affine coupling"
    ),
    "nsf": FlowSpec(_coupling_builder(spline=True), _SPLINE, "rational-quadratic spline coupling"),
    "nsf_ar": FlowSpec(
        _autoregressive_builder(IAF, spline=True),
        {**_NETWORK, "output_affine": True, "num_bins": 8, "bound": 5.0},
        "inverse-autoregressive rational-quadratic spline flow",
    ),
    "affine_diag": FlowSpec(_build_affine_diag, {}, "diagonal affine (mean-field Gaussian)"),
    "affine_tril": FlowSpec(_build_affine_tril, {}, "full-rank lower-triangular affine"),
    "identity": FlowSpec(_build_identity, {}, "identity (plain HMC/NUTS)"),
    **_MORE_FLOWS,
}

FLOW_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def _describe(spec: FlowSpec) -> str:
    if not spec.defaults:
        return "none"
    parts = []
    for key, value in spec.defaults.items():
        shown = "[max(event_size, 32)] * 2" if key == "hidden_units" and value is None else repr(value)
        parts.append(f"{key}={shown}")
    return ", ".join(parts)


def _resolve_options(name: str, spec: FlowSpec, event_size: int, given: Mapping[str, Any]) -> dict:
    unknown = sorted(set(given) - set(spec.defaults))
    if unknown:
        raise ValueError(f"make_flow({name!r}): unknown option(s) {unknown}; allowed: {_describe(spec)}")
    resolved = {}
    for key, default in spec.defaults.items():
        check = spec.checks.get(key) or _OPTION_CHECKS.get(key)
        value = given.get(key, default)
        try:
            resolved[key] = check(value, event_size) if check is not None else value
        except ValueError as err:
            raise ValueError(f"make_flow({name!r}): {err}") from None
    return resolved


def make_flow(
    name: str,
    event_size: int,
    *,
    dtype: Any = tf.float32,
    options: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> Flow:
    """Builds a flow by name; untrained, it is the identity map.

    Args:
      name: one of `FLOW_NAMES`: ``"iaf"``, ``"maf"``, ``"realnvp"``, ``"nsf"``
        (spline coupling), ``"nsf_ar"`` (inverse-autoregressive spline),
        ``"affine_diag"``, ``"affine_tril"``, ``"identity"``; and (issue 6,
        options in docs/more_flows.md) ``"naf"``, ``"bnaf"``, ``"sylvester"``,
        ``"lu_linear"``, ``"residual"``.
      event_size: ``d >= 1``, the size of the vectors the flow maps.
      dtype: float32 or float64 (a `tf.DType`, NumPy dtype or name).
      options: options as a mapping (as stored in ``flow.flow_config``), merged
        with ``**kwargs``; a key given both ways is an error.
      **kwargs: the flow's options. Network flows (iaf, maf, realnvp, nsf,
        nsf_ar) take ``num_layers`` (3; 4 for the coupling flows),
        ``hidden_units`` (default ``[max(d, 32)] * 2``), ``activation``
        (``"elu"``), ``permutation`` between layers (``"reverse"`` or
        ``"random"``) and ``seed`` (0; drives the random permutations and the
        hidden-layer initialisation); the spline flows also ``num_bins`` (8)
        and ``bound`` (5.0, the spline acts on ``[-bound, bound]``, identity
        outside). ``output_affine`` adds a learned elementwise scale and shift
        after the stack (default on for realnvp, nsf, nsf_ar, bnaf, sylvester
        and residual, whose layers cannot set the target's scale alone; off
        for iaf, maf and naf). The affine flows and identity take none.

    Returns:
      A `neutra_flows.bijectors.Flow` mapping ``[..., d] -> [..., d]`` with
      ``flow.flow_config`` (JSON-able; ``make_flow(**flow_config)`` rebuilds it
      untrained) and ``flow.exact_log_det``. Its variables exist already.

    Raises:
      ValueError: unknown name, bad event size, dtype or option; the message
        lists what is allowed.

    Example:

    >>> flow = make_flow("iaf", 3, hidden_units=[8, 8])
    >>> u = tf.random.stateless_normal([5, 3], seed=[1, 2])
    >>> flow.forward(u).shape
    TensorShape([5, 3])
    >>> float(tf.reduce_max(tf.abs(flow.forward(u) - u)))  # untrained: identity
    0.0
    >>> flow.flow_config["options"]["num_layers"]
    3
    >>> len(flow.trainable_variables) > 0
    True
    """
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"unknown flow {name!r}; choose one of {list(FLOW_NAMES)}")
    spec = _REGISTRY[name]
    event_size = check_positive_int(event_size, "event_size")
    dtype = canonical_dtype(dtype)
    given = dict(options or {})
    both = sorted(set(given) & set(kwargs))
    if both:
        raise ValueError(f"make_flow({name!r}): option(s) {both} given in options and as keywords")
    given.update(kwargs)
    resolved = _resolve_options(name, spec, event_size, given)
    build_options = {k: v for k, v in resolved.items() if k not in ("output_affine", "whitening")}
    layers = list(spec.build(event_size, dtype, **build_options))
    if resolved.get("output_affine"):
        # A learned elementwise scale and shift on the output side: the stack
        # works in a standardised space and this layer sets the target's
        # location and scale. Spline layers (identity outside [-bound, bound]),
        # contractive residual layers and Sylvester layers cannot widen
        # N(0, 1) much on their own, and the coupling flows train less
        # reliably without it (docs/more_flows.md, "Output affine layer").
        layers += _build_affine_diag(event_size, dtype)
    # Last, so that it maps the flow's standardised output onto the target's
    # scales and correlations (set by `fit` from a Gaussian fit, see whitening.py).
    layers += _build_whitening(event_size, dtype, resolved.get("whitening", "none"))
    config = {"name": name, "event_size": event_size, "dtype": dtype.name, "options": resolved}
    # A stack is exact only if every layer is (a layer may opt out, e.g. the
    # residual flow's stochastic log-det estimator).
    exact = spec.exact_log_det and all(getattr(la, "exact_log_det", True) for la in layers)
    return Flow(layers, flow_config=config, exact_log_det=exact, name=f"{name}_flow")
