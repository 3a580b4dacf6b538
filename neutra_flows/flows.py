"""The flow registry: `make_flow(name, event_size, **options)` and `FLOW_NAMES`.

Each entry of `_REGISTRY` is a `FlowSpec`: a builder
``(event_size, dtype, **options) -> list of layers`` (in forward order) and the
options it accepts with their defaults. `make_flow` checks the options (one
check per option name in `_OPTION_CHECKS`; a spec overrides one whose meaning
differs for it), builds the layers, appends the output affine and whitening
layers, and wraps them in a `neutra_flows.bijectors.Flow` carrying
``flow_config`` (the resolved options, JSON-able) and ``exact_log_det``.

The network flows share one builder, `_network_flow`: a stack of layers, each
a conditioner network (a MADE for autoregressive layers, an MLP for coupling
layers) feeding an elementwise transformer (affine, rational-quadratic spline
or deep sigmoidal). A spline flow is thus an autoregressive or coupling flow
whose transformer is a spline, as zuko's NSF is a MAF with a spline.

Adding a flow costs one entry::

    "sylvester": FlowSpec(_layer_stack(HouseholderSylvester, "sylvester"), {...}, "..."),

plus, for an option name not seen before, a check in `_OPTION_CHECKS`.
`FLOW_NAMES` follows the registry.
"""

from __future__ import annotations

import dataclasses
import math
import os
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
    NAF,
    AffineDiagonal,
    AffineLowerTriangular,
    AffineTransformer,
    BlockNeuralAutoregressive,
    Coupling,
    Flow,
    HouseholderSylvester,
    Identity,
    InvertibleResidual,
    LULinear,
    RationalQuadraticTransformer,
    RealNVP,
    Transformer,
)
from neutra_flows.bijectors.naf import DeepSigmoidalTransformer
from neutra_flows.bijectors.residual import RESIDUAL_ACTIVATIONS
from neutra_flows.nn import MADE, MLP

tfb = tfp.bijectors

__all__ = ["FLOW_NAMES", "FlowSpec", "make_flow"]

Builder = Callable[..., Sequence[tfb.Bijector]]
# check(key, value, event_size) -> the normalised value; raises ValueError.
Check = Callable[[str, Any, int], Any]


@dataclasses.dataclass(frozen=True)
class FlowSpec:
    """One registry entry.

    Attributes:
      build: ``build(event_size, dtype, **options) -> layers`` in forward order.
      defaults: the options the flow accepts, with their defaults.
      summary: one line for error messages and docs.
      checks: option checks ``(key, value, event_size) -> value`` that replace
        the shared ones of `_OPTION_CHECKS` for this flow.
    """

    build: Builder
    defaults: Mapping[str, Any]
    summary: str
    checks: Mapping[str, Check] = dataclasses.field(default_factory=dict)


# ---------------------------------------------------------------- option checks


def _integer(minimum: int = 1) -> Check:
    return lambda key, value, event_size: check_positive_int(value, key, minimum=minimum)


def _choice(*choices: str) -> Check:
    def check(key: str, value: Any, event_size: int) -> str:
        if value not in choices:
            raise ValueError(f"{key} must be one of {choices}, got {value!r}")
        return value

    return check


def _optional(check: Check) -> Check:
    return lambda key, value, event_size: None if value is None else check(key, value, event_size)


def _real(value: Any) -> float | None:
    """`float(value)` for a real number (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return None
    return float(value)


def _in_open_unit(key: str, value: Any, event_size: int) -> float:
    number = _real(value)
    if number is None or not 0.0 < number < 1.0:
        raise ValueError(f"{key} must be a number in (0, 1), got {value!r}")
    return number


def _positive(key: str, value: Any, event_size: int) -> float:
    number = _real(value)
    if number is None or not (math.isfinite(number) and number > 0):
        raise ValueError(f"{key} must be a finite number > 0, got {value!r}")
    return number


def _boolean(key: str, value: Any, event_size: int) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{key} must be True or False, got {value!r}")
    return bool(value)


def _hidden_units(key: str, value: Any, event_size: int) -> list[int]:
    if value is None:
        # The NeuTra paper uses [d, d]; small d gets a floor of 32 units.
        return [max(event_size, 32)] * 2
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) == 0:
        raise ValueError(f"{key} must be a non-empty list of ints >= 1, got {value!r}")
    return [check_positive_int(v, f"each {key} entry") for v in value]


def _keras_activation(key: str, value: Any, event_size: int) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{key} must be a tf_keras activation name such as 'elu', got {value!r}")
    try:
        tf_keras.activations.get(value)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{key} {value!r} is not a tf_keras activation name") from err
    return value


_WHITENING_KINDS = _choice("auto", "full", "diag", "none")


def _whitening(key: str, value: Any, event_size: int) -> str:
    """``"auto"`` resolves here, so a saved config rebuilds the same layer."""
    if _WHITENING_KINDS(key, value, event_size) == "auto":
        from neutra_flows.whitening import FULL_RANK_MAX_DIM

        return "full" if event_size <= FULL_RANK_MAX_DIM else "diag"
    return value


_OPTION_CHECKS: dict[str, Check] = {
    "num_layers": _integer(),
    "output_affine": _boolean,
    "whitening": _whitening,
    "hidden_units": _hidden_units,
    "activation": _keras_activation,
    "permutation": _choice("reverse", "random"),
    "seed": _integer(minimum=0),
    "num_bins": _integer(minimum=2),
    "bound": _positive,
    "num_components": _integer(),
    "min_slope": _in_open_unit,
    "hidden_factor": _integer(),
    "num_hidden_layers": _integer(),
    "num_householder": _optional(_integer()),
    "lipschitz": _in_open_unit,
    "log_det": _choice("exact", "stochastic"),
    "tol": _optional(_in_open_unit),
    "max_iterations": _integer(),
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


# ---------------------------------------------------------------- network flows

# make_transformer(event_size, hidden_units, **transformer options) -> Transformer
TransformerFactory = Callable[..., Transformer]
# make_layer(event_size, transformer, network options, name) -> layer
LayerFactory = Callable[[int, Transformer, dict[str, Any], str], tfb.Bijector]


def _network_flow(make_layer: LayerFactory, make_transformer: TransformerFactory, prefix: str) -> Builder:
    """Builder of `_stack`ed layers, each a fresh conditioner feeding one shared transformer."""

    def build(
        event_size: int,
        dtype: tf.DType,
        *,
        num_layers: int,
        hidden_units: list[int],
        activation: str,
        permutation: str,
        seed: int,
        **transformer_options: Any,
    ) -> list[tfb.Bijector]:
        transformer = make_transformer(event_size, hidden_units, **transformer_options)

        def layer(i: int, layer_seed: int) -> tfb.Bijector:
            network = {
                "hidden_units": hidden_units,
                "activation": activation,
                "seed": layer_seed,
                "dtype": dtype,
            }
            return make_layer(event_size, transformer, network, f"{prefix}_{i}")

        return _stack(layer, event_size, num_layers=num_layers, permutation=permutation, seed=seed)

    return build


def _autoregressive(layer_cls: type) -> LayerFactory:
    """``layer_cls(MADE, transformer=...)``: `IAF`, `MAF` or `NAF`."""

    def make(event_size: int, transformer: Transformer, network: dict[str, Any], name: str) -> tfb.Bijector:
        made = MADE(event_size, transformer.num_params, **network)
        return layer_cls(made, transformer=transformer, name=name)

    return make


def _coupling(layer_cls: type) -> LayerFactory:
    """``layer_cls(MLP, num_masked=d // 2, transformer=...)``: `Coupling` or `RealNVP`."""

    def make(event_size: int, transformer: Transformer, network: dict[str, Any], name: str) -> tfb.Bijector:
        num_masked = event_size // 2
        mlp = MLP(num_masked, (event_size - num_masked, transformer.num_params), **network)
        return layer_cls(mlp, num_masked=num_masked, transformer=transformer, name=name)

    return make


def _affine(event_size: int, hidden_units: list[int]) -> Transformer:
    return AffineTransformer()


def _spline(event_size: int, hidden_units: list[int], *, num_bins: int, bound: float) -> Transformer:
    return RationalQuadraticTransformer(num_bins, bound)


def _coupling_spline(event_size: int, hidden_units: list[int], *, num_bins: int, bound: float) -> Transformer:
    # The MLP's every output sums all its last hidden units, so Adam grows the
    # spline logits fast (MADE's masks cut most of those paths); 10 steps at
    # rate 0.05 gave bins whose slopes fall to ~1e-8, not invertible in
    # float32. Scaling the width and height logits by 1/sqrt(width) keeps
    # the spline well conditioned (Durkan et al.'s reference code does the same).
    logit_scale = 1.0 / math.sqrt(hidden_units[-1]) if event_size > 1 else 1.0
    return RationalQuadraticTransformer(num_bins, bound, logit_scale=logit_scale)


def _deep_sigmoidal(
    event_size: int,
    hidden_units: list[int],
    *,
    num_components: int,
    min_slope: float,
    tol: float | None,
    max_iterations: int,
) -> Transformer:
    return DeepSigmoidalTransformer(num_components, min_slope=min_slope, tol=tol, max_iterations=max_iterations)


# ---------------------------------------------------------------- other flows


def _layer_stack(layer_cls: type, prefix: str) -> Builder:
    """Layers that hold their own parameters: ``layer_cls(event_size, seed=, dtype=, name=, **options)``.

    With a ``permutation`` option they are stacked as `_stack` does (BNAF);
    without one they follow each other directly (Sylvester and residual
    layers mix all coordinates themselves).
    """

    def build(
        event_size: int,
        dtype: tf.DType,
        *,
        num_layers: int,
        seed: int,
        permutation: str | None = None,
        **options: Any,
    ) -> list[tfb.Bijector]:
        def layer(i: int, layer_seed: int) -> tfb.Bijector:
            return layer_cls(event_size, seed=layer_seed, dtype=dtype, name=f"{prefix}_{i}", **options)

        if permutation is not None:
            return _stack(layer, event_size, num_layers=num_layers, permutation=permutation, seed=seed)
        return [layer(i, layer_seed) for i, layer_seed in enumerate(_layer_seeds(seed, num_layers))]

    return build


def _affine_layer(
    kind: str, event_size: int, dtype: tf.DType, *, prefix: str = "", **name: str
) -> tfb.Bijector:
    """An `AffineDiagonal` (``kind="diag"``) or `AffineLowerTriangular` (``"full"``), the identity at init."""
    shift = tf.Variable(tf.zeros([event_size], dtype), name=f"{prefix}shift")
    if kind == "diag":
        log_scale = tf.Variable(tf.zeros([event_size], dtype), name=f"{prefix}log_scale")
        return AffineDiagonal(shift, log_scale, **name)
    tril = tf.Variable(tf.zeros([event_size * (event_size + 1) // 2], dtype), name=f"{prefix}tril_params")
    return AffineLowerTriangular(shift, tril, **name)


def _build_lu_linear(event_size: int, dtype: tf.DType, *, permutation: str, seed: int) -> list[tfb.Bijector]:
    return [LULinear(event_size, permutation=permutation, seed=seed, dtype=dtype)]


# ---------------------------------------------------------------- the registry

# ``output_affine`` (a learned elementwise scale and shift after the stack) is
# on where the layers cannot set the target's scale themselves: coupling flows
# train less reliably without it, spline layers are the identity outside
# [-bound, bound], and residual, Sylvester and BNAF layers widen N(0, 1) little
# (docs/more_flows.md). The autoregressive affine flows and NAF scale every
# coordinate already.
_NETWORK: dict[str, Any] = {
    "num_layers": 3,
    "output_affine": False,
    "whitening": "auto",
    "hidden_units": None,
    "activation": "elu",
    "permutation": "reverse",
    "seed": 0,
}
_SPLINE: dict[str, Any] = {"output_affine": True, "num_bins": 8, "bound": 5.0}
_ITERATIVE: dict[str, Any] = {"tol": None, "max_iterations": 100}
_STANDALONE: dict[str, Any] = {"output_affine": True, "whitening": "auto", "seed": 0, **_ITERATIVE}

_REGISTRY: dict[str, FlowSpec] = {
    "iaf": FlowSpec(
        _network_flow(_autoregressive(IAF), _affine, "iaf"),
        _NETWORK,
        "inverse autoregressive flow (parallel forward)",
    ),
    "maf": FlowSpec(
        _network_flow(_autoregressive(MAF), _affine, "maf"),
        _NETWORK,
        "masked autoregressive flow (parallel inverse)",
    ),
    "realnvp": FlowSpec(
        _network_flow(_coupling(RealNVP), _affine, "real_nvp"),
        {**_NETWORK, "num_layers": 4, "output_affine": True},
        "affine coupling",
    ),
    "nsf": FlowSpec(
        _network_flow(_coupling(Coupling), _coupling_spline, "nsf"),
        {**_NETWORK, "num_layers": 4, **_SPLINE},
        "rational-quadratic spline coupling",
    ),
    "nsf_ar": FlowSpec(
        _network_flow(_autoregressive(IAF), _spline, "nsf_ar"),
        {**_NETWORK, **_SPLINE},
        "inverse-autoregressive rational-quadratic spline flow",
    ),
    "affine_diag": FlowSpec(
        lambda event_size, dtype: [_affine_layer("diag", event_size, dtype)],
        {},
        "diagonal affine (mean-field Gaussian)",
    ),
    "affine_tril": FlowSpec(
        lambda event_size, dtype: [_affine_layer("full", event_size, dtype)],
        {},
        "full-rank lower-triangular affine",
    ),
    "identity": FlowSpec(
        lambda event_size, dtype: [Identity(dtype=dtype)],
        {},
        "identity (plain HMC/NUTS)",
    ),
    "naf": FlowSpec(
        _network_flow(_autoregressive(NAF), _deep_sigmoidal, "naf"),
        {**_NETWORK, "num_components": 8, "min_slope": 0.01, **_ITERATIVE},
        "neural autoregressive flow, deep sigmoidal transformer (iterative inverse)",
    ),
    "bnaf": FlowSpec(
        _layer_stack(BlockNeuralAutoregressive, "bnaf"),
        {"num_layers": 2, "hidden_factor": 8, "num_hidden_layers": 1, "permutation": "reverse", **_STANDALONE},
        "block neural autoregressive flow with linear tails (iterative inverse)",
    ),
    "sylvester": FlowSpec(
        _layer_stack(HouseholderSylvester, "sylvester"),
        {"num_layers": 4, "num_householder": None, **_STANDALONE},
        "Householder Sylvester flow (iterative inverse)",
    ),
    "lu_linear": FlowSpec(
        _build_lu_linear,
        {"permutation": "identity", "seed": 0},
        "invertible dense layer W = P L U (learned linear mixing)",
        checks={"permutation": _choice("identity", "reverse", "random")},
    ),
    "residual": FlowSpec(
        _layer_stack(InvertibleResidual, "residual"),
        {
            "num_layers": 4,
            "hidden_units": None,
            "activation": "lipswish",
            "lipschitz": 0.9,
            "log_det": "exact",
            **_STANDALONE,
            "max_iterations": 500,
        },
        "invertible residual flow, exact log-det (fixed-point inverse)",
        checks={"activation": _choice(*RESIDUAL_ACTIVATIONS)},
    ),
}

FLOW_NAMES: tuple[str, ...] = tuple(_REGISTRY)


# ---------------------------------------------------------------- make_flow


def _describe(spec: FlowSpec) -> str:
    if not spec.defaults:
        return "none"
    parts = []
    for key, value in spec.defaults.items():
        shown = "[max(event_size, 32)] * 2" if key == "hidden_units" and value is None else repr(value)
        parts.append(f"{key}={shown}")
    return ", ".join(parts)


def _resolve_options(
    name: str, event_size: int, options: Mapping[str, Any] | None, kwargs: Mapping[str, Any]
) -> dict[str, Any]:
    """The flow's every option, checked and normalised (defaults filled in)."""
    spec = _REGISTRY[name]
    both = sorted(set(options or {}) & set(kwargs))
    if both:
        raise ValueError(f"make_flow({name!r}): option(s) {both} given in options and as keywords")
    given = {**(options or {}), **kwargs}
    unknown = sorted(set(given) - set(spec.defaults))
    if unknown:
        raise ValueError(f"make_flow({name!r}): unknown option(s) {unknown}; allowed: {_describe(spec)}")
    resolved = {}
    for key, default in spec.defaults.items():
        check = spec.checks[key] if key in spec.checks else _OPTION_CHECKS[key]
        try:
            resolved[key] = check(key, given.get(key, default), event_size)
        except ValueError as err:
            raise ValueError(f"make_flow({name!r}): {err}") from None
    return resolved


def _build_layers(
    name: str, event_size: int, dtype: tf.DType, options: Mapping[str, Any]
) -> list[tfb.Bijector]:
    """The registered layers, then the output affine and the whitening layer."""
    stack_options = {k: v for k, v in options.items() if k not in ("output_affine", "whitening")}
    layers = list(_REGISTRY[name].build(event_size, dtype, **stack_options))
    if options.get("output_affine"):
        # A learned elementwise scale and shift on the output side: the stack
        # works in a standardised space and this layer sets the target's
        # location and scale (docs/more_flows.md, "Output affine layer").
        layers.append(_affine_layer("diag", event_size, dtype))
    whitening = options.get("whitening", "none")
    if whitening != "none":
        # Last, so that it maps the flow's standardised output onto the target's
        # scales and correlations (set by `fit` from a Gaussian fit, see whitening.py).
        layers.append(_affine_layer(whitening, event_size, dtype, prefix="whitening_", name="whitening"))
    return layers


# Coupling flows: each layer's network reads one half and writes the other's parameters.
_COUPLING_FLOWS = ("realnvp", "nsf")


def _approx_num_weights(name: str, event_size: int, options: Mapping[str, Any]) -> int:
    """About how many weights a network flow with ``options`` has (0 where it has no ``hidden_units``).

    Each layer's network maps ``d`` inputs through ``hidden_units`` to ``k d``
    outputs (half of each for a coupling flow): ``k`` is 2 for an affine
    transformer (shift, log-scale), ``3 K + 1`` for a ``K``-bin spline, 3 per
    component for NAF's sigmoids. Biases and masks are left out.
    """
    hidden = options.get("hidden_units")
    if not hidden:
        return 0
    if "num_bins" in options:
        per_output = 3 * int(options["num_bins"]) + 1
    elif "num_components" in options:
        per_output = 3 * int(options["num_components"])
    else:
        per_output = 2
    half = event_size / 2 if name in _COUPLING_FLOWS else event_size
    widths = [half, *hidden, per_output * half]
    per_layer = sum(a * b for a, b in zip(widths[:-1], widths[1:], strict=True))
    full_whitening = event_size * (event_size + 1) // 2 if options.get("whitening") == "full" else 0
    return int(int(options.get("num_layers", 1)) * per_layer + full_whitening)


def _physical_memory_bytes() -> int | None:
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return None


# The weights, their gradients and Adam's two moments: four copies during training.
_TRAINING_COPIES = 4


def _check_flow_fits_in_memory(name: str, event_size: int, dtype: tf.DType, options: Mapping[str, Any]) -> None:
    """Refuses, before any weight exists, a network flow whose training would not fit in memory."""
    weights = _approx_num_weights(name, event_size, options)
    need = weights * _TRAINING_COPIES * dtype.size
    have = _physical_memory_bytes()
    if have is not None and need > have:
        raise ValueError(
            f"make_flow({name!r}, {event_size}): about {weights:.3g} weights; training them (weights, "
            f"gradients and Adam's two moments in {dtype.name}) needs about {need / 2**30:.3g} GiB, more than "
            f"this machine's {have / 2**30:.3g} GiB of memory. Give narrower hidden_units (the default is "
            f"[max(d, 32)] * 2), fewer num_layers, or a flow without a network (affine_diag, affine_tril)")


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
        ``"affine_diag"``, ``"affine_tril"``, ``"identity"`` (docs/flows.md),
        ``"naf"``, ``"bnaf"``, ``"sylvester"``, ``"lu_linear"``,
        ``"residual"`` (docs/more_flows.md, where their options are listed).
      event_size: ``d >= 1``, the size of the vectors the flow maps.
      dtype: float32 or float64 (a `tf.DType`, NumPy dtype or name).
      options: options as a mapping (as stored in ``flow.flow_config``), merged
        with ``**kwargs``; a key given both ways is an error.
      **kwargs: the flow's options. Network flows (iaf, maf, realnvp, nsf,
        nsf_ar, naf) take ``num_layers`` (3; 4 for the coupling flows),
        ``hidden_units`` (default ``[max(d, 32)] * 2``), ``activation``
        (``"elu"``), ``permutation`` between layers (``"reverse"`` or
        ``"random"``) and ``seed`` (0; drives the random permutations and the
        hidden-layer initialisation); the spline flows also ``num_bins`` (8)
        and ``bound`` (5.0, the spline acts on ``[-bound, bound]``, identity
        outside). ``output_affine`` adds a learned elementwise scale and shift
        after the stack (default on for realnvp, nsf, nsf_ar, bnaf, sylvester
        and residual, whose layers cannot set the target's scale alone; off
        for iaf, maf and naf); ``whitening`` (``"auto"``, ``"full"``,
        ``"diag"`` or ``"none"``) adds the affine layer that `fit` sets to a
        Gaussian fit, last. The affine flows and identity take no options.

    Returns:
      A `neutra_flows.bijectors.Flow` mapping ``[..., d] -> [..., d]`` with
      ``flow.flow_config`` (JSON-able; ``make_flow(**flow_config)`` rebuilds it
      untrained) and ``flow.exact_log_det``. Its variables exist already.

    Raises:
      ValueError: unknown name, bad event size, dtype or option (the message
        lists what is allowed); a network flow whose training would need more
        than this machine's memory (weights, gradients and Adam's moments,
        estimated from ``hidden_units``: the message gives the estimate).

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
    event_size = check_positive_int(event_size, "event_size")
    dtype = canonical_dtype(dtype)
    resolved = _resolve_options(name, event_size, options, kwargs)
    _check_flow_fits_in_memory(name, event_size, dtype, resolved)
    layers = _build_layers(name, event_size, dtype, resolved)
    config = {"name": name, "event_size": event_size, "dtype": dtype.name, "options": resolved}
    # A stack is exact only if every layer is (a layer may opt out, e.g. the
    # residual flow's stochastic log-det estimator).
    exact = all(getattr(layer, "exact_log_det", True) for layer in layers)
    return Flow(layers, flow_config=config, exact_log_det=exact, name=f"{name}_flow")
