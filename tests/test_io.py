"""save_flow / load_flow: identical flows back, clear errors for bad folders."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
import tensorflow as tf
from flow_training import FLOWS

from neutra_flows import bijectors as nfb
from neutra_flows import load_flow, make_flow, save_flow
from neutra_flows.io import FORMAT_VERSION, _content_sha256


def trained_like(name, event_size=3, dtype=tf.float32):
    """A flow whose variables all hold non-trivial values (as after training)."""
    flow = FLOWS[name](event_size, dtype=dtype)
    rng = np.random.default_rng(7)
    for var in flow.variables:
        var.assign(rng.normal(scale=0.3, size=var.shape).astype(var.dtype.as_numpy_dtype))
    return flow


def outputs(flow, x):
    return [
        flow.forward(x).numpy(),
        flow.forward_log_det_jacobian(tf.identity(x), event_ndims=1).numpy(),
        flow.inverse(tf.identity(x)).numpy(),
    ]


@pytest.fixture(scope="module")
def saved_iaf(tmp_path_factory):
    flow = trained_like("iaf")
    path = save_flow(flow, tmp_path_factory.mktemp("io") / "iaf")
    return flow, path


def fresh_copy(saved, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(saved, target)
    return target


@pytest.mark.parametrize(
    "name,dtype",
    [(name, tf.float32) for name in FLOWS] + [("iaf", tf.float64), ("nsf", tf.float64), ("naf", tf.float64)],
    ids=lambda v: getattr(v, "name", v),
)
def test_save_then_load_gives_identical_outputs(name, dtype, tmp_path):
    flow = trained_like(name, dtype=dtype)
    path = save_flow(flow, tmp_path / "flow")
    loaded = load_flow(path)
    assert loaded is not flow
    assert loaded.flow_config == flow.flow_config
    assert loaded.dtype == flow.dtype
    assert len(loaded.variables) == len(flow.variables)
    for a, b in zip(loaded.variables, flow.variables, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    x = tf.constant(np.random.default_rng(0).normal(size=(5, 3)), dtype)
    for got, want in zip(outputs(loaded, x), outputs(flow, x), strict=True):
        np.testing.assert_array_equal(got, want)


def test_folder_is_self_describing(saved_iaf):
    flow, path = saved_iaf
    header = json.loads((path / "flow.json").read_text())
    assert header["format"] == "neutra_flows.flow"
    assert header["version"] == FORMAT_VERSION
    assert header["flow_config"] == flow.flow_config
    assert [r["shape"] for r in header["variables"]] == [list(v.shape) for v in flow.variables]
    with np.load(path / "weights.npz", allow_pickle=False) as archive:
        assert len(archive.files) == len(flow.variables)


def test_missing_path_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_flow(tmp_path / "nothing here")


def test_a_plain_file_is_not_a_saved_flow(tmp_path):
    path = tmp_path / "flow.npz"
    path.write_bytes(b"not a flow")
    with pytest.raises(ValueError, match="folder"):
        load_flow(path)


@pytest.mark.parametrize("missing", ["flow.json", "weights.npz"])
def test_incomplete_folder_raises(missing, saved_iaf, tmp_path):
    path = fresh_copy(saved_iaf[1], tmp_path)
    (path / missing).unlink()
    with pytest.raises(ValueError, match=missing):
        load_flow(path)


def test_truncated_weights_raise(saved_iaf, tmp_path):
    path = fresh_copy(saved_iaf[1], tmp_path)
    data = (path / "weights.npz").read_bytes()
    (path / "weights.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="checksum"):
        load_flow(path)


def test_flipped_byte_in_weights_raises(saved_iaf, tmp_path):
    path = fresh_copy(saved_iaf[1], tmp_path)
    data = bytearray((path / "weights.npz").read_bytes())
    data[len(data) // 3] ^= 0xFF
    (path / "weights.npz").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        load_flow(path)


def test_truncated_archive_with_matching_checksum_raises(saved_iaf, tmp_path):
    # Someone rewrote both files consistently, but the archive is broken.
    path = fresh_copy(saved_iaf[1], tmp_path)
    data = (path / "weights.npz").read_bytes()[:100]
    (path / "weights.npz").write_bytes(data)
    header = json.loads((path / "flow.json").read_text())
    header["weights_sha256"] = hashlib.sha256(data).hexdigest()
    header["content_sha256"] = _content_sha256(header)
    (path / "flow.json").write_text(json.dumps(header))
    with pytest.raises(ValueError, match="not a readable weights archive"):
        load_flow(path)


def test_corrupted_header_raises(saved_iaf, tmp_path):
    path = fresh_copy(saved_iaf[1], tmp_path)
    text = (path / "flow.json").read_text()
    (path / "flow.json").write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match="header"):
        load_flow(path)


def _edit_header(path, edit):
    """Edits flow.json and stamps a matching checksum: a consistent folder with wrong content."""
    header = json.loads((path / "flow.json").read_text())
    edit(header)
    header["content_sha256"] = _content_sha256(header)
    (path / "flow.json").write_text(json.dumps(header))


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda h: h.update(version=FORMAT_VERSION + 1), "version"),
        (lambda h: h.update(format="something else"), "header"),
        (lambda h: h["flow_config"].update(name="no_such_flow"), "does not build"),
        (lambda h: h["flow_config"].update(event_size=4), "rebuilt flow"),
        (lambda h: h["flow_config"]["options"].update(hidden_units=[8, 9]), "rebuilt flow"),
        (lambda h: h["flow_config"]["options"].update(num_layers=3), "variables"),
        (lambda h: h["flow_config"].update(dtype="float64"), "rebuilt flow"),
        (lambda h: h["variables"].pop(), "arrays"),
        (lambda h: h["variables"][0].update(shape=[1, 2, 3]), "header says"),
    ],
    ids=[
        "version",
        "format",
        "name",
        "event_size",
        "hidden_units",
        "num_layers",
        "dtype",
        "variable_count",
        "variable_shape",
    ],
)
def test_mismatched_header_raises(edit, match, saved_iaf, tmp_path):
    path = fresh_copy(saved_iaf[1], tmp_path)
    _edit_header(path, edit)
    with pytest.raises(ValueError, match=match):
        load_flow(path)


def test_weights_of_the_wrong_shape_raise(saved_iaf, tmp_path):
    # A consistent folder (checksums and records match) for a different flow.
    other = save_flow(trained_like("iaf", event_size=4), tmp_path / "other")
    path = fresh_copy(saved_iaf[1], tmp_path)
    shutil.copy(other / "weights.npz", path / "weights.npz")
    _edit_header(
        path,
        lambda h: h.update(
            weights_sha256=json.loads((other / "flow.json").read_text())["weights_sha256"],
            variables=json.loads((other / "flow.json").read_text())["variables"],
        ),
    )
    with pytest.raises(ValueError, match="rebuilt flow"):
        load_flow(path)


def test_existing_folder_is_not_overwritten_by_default(saved_iaf, tmp_path):
    flow, saved = saved_iaf
    path = fresh_copy(saved, tmp_path)
    with pytest.raises(FileExistsError):
        save_flow(flow, path)
    other = trained_like("affine_diag")
    save_flow(other, path, overwrite=True)
    assert load_flow(path).flow_config["name"] == "affine_diag"


def test_overwrite_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a saved flow folder"):
        save_flow(make_flow("identity", 2), tmp_path / "mine", overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("text", ['{"name": "my app config"}', "[1, 2]", "{not json"],
                         ids=["foreign_json", "not_a_dict", "unparsable"])
def test_overwrite_refuses_a_foreign_flow_json(text, tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "flow.json").write_text(text)
    with pytest.raises(ValueError, match="flow.json is not a saved flow's header"):
        save_flow(make_flow("identity", 2), folder, overwrite=True)
    assert (folder / "flow.json").read_text() == text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


@pytest.mark.parametrize("fail_in", ["mkdtemp", "replace"])
def test_unwritable_path_is_named_in_the_error(fail_in, tmp_path, monkeypatch):
    # Tests run as root, where a read-only folder is still writable: make the OS refuse instead.
    import neutra_flows.io as io

    def refuse(*_args, **_kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(io.tempfile if fail_in == "mkdtemp" else io.os, fail_in, refuse)
    target = tmp_path / "flows" / "mine"
    with pytest.raises(PermissionError, match="save_flow could not write the flow to") as info:
        save_flow(make_flow("identity", 2), target)
    assert str(target) in str(info.value) and "Permission denied" in str(info.value)
    assert info.value.errno == 13 and isinstance(info.value.__cause__, PermissionError)
    monkeypatch.undo()
    # Nothing half-written is left behind: no hidden temporary folder, no flow.
    assert [p.name for p in (tmp_path / "flows").iterdir()] == []


def test_hand_built_flows_cannot_be_saved(tmp_path):
    flow = nfb.Flow([nfb.Identity()])
    with pytest.raises(ValueError, match="make_flow"):
        save_flow(flow, tmp_path / "flow")
    assert not (tmp_path / "flow").exists()
