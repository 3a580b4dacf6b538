"""make_flow: names, options, errors and flow_config (construction only; cheap)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

from neutra_flows import FLOW_NAMES, make_flow
from neutra_flows.bijectors import AffineDiagonal

tfb = tfp.bijectors

NETWORK = ("iaf", "maf", "realnvp", "nsf", "nsf_ar")


def test_names_are_unique():
    assert len(set(FLOW_NAMES)) == len(FLOW_NAMES)


def test_unknown_name_lists_the_choices():
    with pytest.raises(ValueError, match="choose one of") as info:
        make_flow("glow", 3)
    for name in FLOW_NAMES:
        assert repr(name) in str(info.value)
    with pytest.raises(ValueError, match="unknown flow"):
        make_flow(3, 3)


@pytest.mark.parametrize("event_size", [0, -1, 2.5, True, "3", None])
def test_bad_event_size(event_size):
    with pytest.raises(ValueError, match="event_size"):
        make_flow("iaf", event_size)


@pytest.mark.parametrize("dtype", [tf.int32, "float16", "banana", np.complex64])
def test_bad_dtype(dtype):
    with pytest.raises(ValueError, match="float32 or float64"):
        make_flow("affine_diag", 2, dtype=dtype)


@pytest.mark.parametrize(
    "name,options,match",
    [
        ("iaf", {"hidden_units": []}, "hidden_units"),
        ("iaf", {"hidden_units": [8, 0]}, "hidden_units"),
        ("iaf", {"hidden_units": "8"}, "hidden_units"),
        ("maf", {"num_layers": 0}, "num_layers"),
        ("maf", {"num_layers": 2.0}, "num_layers"),
        ("realnvp", {"permutation": "sideways"}, "reverse"),
        ("realnvp", {"activation": "no_such_activation"}, "activation"),
        ("realnvp", {"activation": 3}, "activation"),
        ("nsf", {"num_bins": 1}, "num_bins"),
        ("nsf", {"bound": 0.0}, "bound"),
        ("nsf_ar", {"bound": float("inf")}, "bound"),
        ("nsf_ar", {"seed": -1}, "seed"),
        ("iaf", {"width": 8}, "unknown option"),
        ("affine_diag", {"hidden_units": [8]}, "allowed: none"),
        ("identity", {"num_layers": 2}, "unknown option"),
        ("nsf", {"output_affine": "yes"}, "output_affine must be True or False"),
        ("affine_tril", {"output_affine": True}, "unknown option"),
        ("naf", {"num_components": 0}, "num_components"),
        ("naf", {"min_slope": 1.5}, "min_slope"),
        ("bnaf", {"hidden_factor": 0}, "hidden_factor"),
        ("sylvester", {"tol": -1.0}, "tol"),
        ("sylvester", {"max_iterations": 0}, "max_iterations"),
        ("sylvester", {"num_householder": 0}, "num_householder"),
        ("lu_linear", {"permutation": "sideways"}, "identity"),
        ("residual", {"lipschitz": 1.0}, "lipschitz"),
        ("residual", {"log_det": "approximate"}, "log_det"),
        ("residual", {"activation": "relu6"}, "lipswish"),
        ("residual", {"unknown": 1}, "allowed"),
    ],
)
def test_bad_options_raise_and_name_what_is_allowed(name, options, match):
    with pytest.raises(ValueError, match=match):
        make_flow(name, 3, **options)


def test_unknown_option_message_lists_the_allowed_ones():
    with pytest.raises(ValueError) as info:
        make_flow("nsf", 3, widths=[4])
    for key in ("num_layers", "hidden_units", "activation", "permutation", "seed", "num_bins", "bound"):
        assert key in str(info.value)


def test_option_given_twice_raises():
    with pytest.raises(ValueError, match="given in options and as keywords"):
        make_flow("iaf", 3, options={"num_layers": 2}, num_layers=3)


def test_default_hidden_units_follow_the_event_size():
    assert make_flow("iaf", 3).flow_config["options"]["hidden_units"] == [32, 32]
    assert make_flow("iaf", 40, num_layers=1).flow_config["options"]["hidden_units"] == [40, 40]


@pytest.mark.parametrize("name", FLOW_NAMES)
def test_flow_config_is_json_and_rebuilds_the_same_structure(name):
    flow = make_flow(name, 4, dtype=tf.float64)
    config = flow.flow_config
    assert config["name"] == name and config["event_size"] == 4 and config["dtype"] == "float64"
    again = make_flow(**json.loads(json.dumps(config)))
    assert again.flow_config == config
    assert [v.shape for v in again.variables] == [v.shape for v in flow.variables]
    assert all(v.dtype == tf.float64 for v in flow.trainable_variables)
    assert flow.exact_log_det is True
    assert flow.forward_min_event_ndims == 1 and isinstance(flow, tfb.Bijector)
    if name != "identity":
        assert len(flow.trainable_variables) > 0
    # The config is a copy: editing it does not change the flow.
    config["options"]["edited"] = True
    assert "edited" not in flow.flow_config["options"]


def test_stochastic_log_det_makes_the_flow_inexact():
    flow = make_flow("residual", 3, log_det="stochastic", hidden_units=[8])
    assert flow.exact_log_det is False
    assert flow.flow_config["options"]["log_det"] == "stochastic"


def _permutations(flow):
    return [layer.permutation.numpy().tolist() for layer in flow.layers if isinstance(layer, tfb.Permute)]


@pytest.mark.parametrize("name", NETWORK)
def test_random_permutations_are_seeded_and_undone(name):
    a = make_flow(name, 6, num_layers=3, hidden_units=[4], permutation="random", seed=1)
    b = make_flow(name, 6, num_layers=3, hidden_units=[4], permutation="random", seed=1)
    c = make_flow(name, 6, num_layers=3, hidden_units=[4], permutation="random", seed=2)
    assert _permutations(a) == _permutations(b)
    assert _permutations(a) != _permutations(c)
    # Layers, permutations and the final undo compose to the identity order.
    total = np.arange(6)
    for perm in _permutations(a):
        total = total[perm]
    np.testing.assert_array_equal(total, np.arange(6))


@pytest.mark.parametrize("num_layers,expected", [(1, 0), (2, 2), (3, 2), (4, 4)])
def test_reverse_stacks_end_in_input_order(num_layers, expected):
    flow = make_flow("iaf", 5, num_layers=num_layers, hidden_units=[4])
    assert len(_permutations(flow)) == expected


def test_event_size_one_has_no_permutations_and_learnable_layers():
    for name in NETWORK:
        flow = make_flow(name, 1, hidden_units=[4])
        assert _permutations(flow) == []
        assert len(flow.trainable_variables) > 0


@pytest.mark.parametrize(
    "name,default",
    [
        ("iaf", False),
        ("maf", False),
        ("naf", False),
        ("realnvp", True),
        ("nsf", True),
        ("nsf_ar", True),
        ("bnaf", True),
        ("sylvester", True),
        ("residual", True),
    ],
)
def test_output_affine_adds_one_trainable_scale_and_shift_last(name, default):
    small = {"hidden_units": [4]} if "hidden_units" in make_flow(name, 3).flow_config["options"] else {}
    small["whitening"] = "none"  # the output affine is then the last layer
    on = make_flow(name, 3, output_affine=True, **small)
    off = make_flow(name, 3, output_affine=False, **small)
    assert make_flow(name, 3, **small).flow_config["options"]["output_affine"] is default
    assert len(on.layers) == len(off.layers) + 1
    last = on.layers[-1]
    assert isinstance(last, AffineDiagonal)
    assert len(on.trainable_variables) == len(off.trainable_variables) + 2
    # It acts on the output side: a shift moves the flow's output by exactly that shift.
    u = tf.random.stateless_normal([4, 3], seed=[3, 4])
    shift = [v for v in last.trainable_variables if "shift" in v.name][0]
    shift.assign([1.0, -2.0, 0.5])
    np.testing.assert_allclose(on.forward(u).numpy() - [1.0, -2.0, 0.5], u.numpy(), atol=1e-5)


WHITENED = ["iaf", "maf", "naf", "realnvp", "nsf", "nsf_ar", "bnaf", "sylvester", "residual"]


@pytest.mark.parametrize("name", WHITENED)
def test_whitening_layer_is_last_identity_at_init_and_resolved(name):
    from neutra_flows.bijectors import AffineLowerTriangular

    small = {"hidden_units": [4]} if "hidden_units" in make_flow(name, 3).flow_config["options"] else {}
    flow = make_flow(name, 3, **small)
    # "auto" is resolved when the flow is built, so a saved config rebuilds the same layer.
    assert flow.flow_config["options"]["whitening"] == "full"
    assert isinstance(flow.layers[-1], AffineLowerTriangular) and flow.layers[-1].name == "whitening"
    assert make_flow(name, 3, whitening="diag", **small).layers[-1].name == "whitening"
    none = make_flow(name, 3, whitening="none", **small)
    assert none.layers[-1].name != "whitening"
    assert len(flow.trainable_variables) == len(none.trainable_variables) + 2
    u = tf.random.stateless_normal([4, 3], seed=[3, 4])
    np.testing.assert_allclose(flow.forward(u).numpy(), u.numpy(), atol=1e-6)


def test_whitening_auto_is_diagonal_above_the_full_rank_limit():
    from neutra_flows.whitening import FULL_RANK_MAX_DIM

    flow = make_flow("iaf", FULL_RANK_MAX_DIM + 1, hidden_units=[2])
    assert flow.flow_config["options"]["whitening"] == "diag"
    assert make_flow("iaf", FULL_RANK_MAX_DIM, hidden_units=[2]).flow_config["options"]["whitening"] == "full"


@pytest.mark.parametrize("bad", ["yes", True, None, "Full"])
def test_whitening_bad_value_names_the_choices(bad):
    with pytest.raises(ValueError, match="whitening must be one of"):
        make_flow("iaf", 3, whitening=bad)


def test_a_flow_too_big_for_the_memory_is_refused_before_its_weights_exist():
    from neutra_flows.flows import _approx_num_weights, _resolve_options

    # 4.8e11 weights: building them would exhaust the machine long before an error.
    with pytest.raises(ValueError, match=r"GiB.*more than this machine's .*hidden_units"):
        make_flow("iaf", 200_000)
    # The estimate is the flow's true size to a few per cent (biases and masks aside).
    for name, d in (("iaf", 60), ("realnvp", 60), ("nsf", 40)):
        flow = make_flow(name, d, dtype=tf.float64)
        actual = sum(int(tf.size(v)) for v in flow.trainable_variables)
        estimate = _approx_num_weights(name, d, _resolve_options(name, d, None, {}))
        assert 0.7 * actual <= estimate <= 1.3 * actual, (name, estimate, actual)
    # Flows without a network are never refused.
    assert make_flow("affine_diag", 200_000).flow_config["name"] == "affine_diag"
