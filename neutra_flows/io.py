"""Saving and loading flows: a self-describing folder, no pickled code.

A saved flow is a folder with two files:

* ``flow.json``: the format name and version, the flow's ``flow_config`` (from
  which `make_flow` rebuilds the untrained flow), one ``{"shape", "dtype"}``
  record per variable in ``flow.variables`` order, the SHA-256 of
  ``weights.npz`` (``weights_sha256``) and, since format version 2, the
  SHA-256 of the canonical JSON (sorted keys, no spaces) of all those entries
  (``content_sha256``). The second checksum covers the whole saved flow: a
  hand edit of ``flow.json`` (``iaf`` to ``maf``, ``elu`` to ``tanh``,
  another permutation: all keep the weight shapes, so nothing else would
  notice) is refused.
* ``weights.npz``: the variable values as ``v0000, v0001, ...`` (plain NumPy
  arrays, loaded with ``allow_pickle=False``).

`load_flow` checks everything (format, checksums, variable count, shapes and
dtypes against both the file and the rebuilt flow) before it assigns a single
value, so a bad folder raises and never yields a half-loaded flow. Values are
stored in the flow's dtype and assigned as they are: a loaded flow gives the
same outputs to the last bit.

Version 1 folders (no ``content_sha256``) still load, with a warning that
their header is not protected, except coupling spline flows (``nsf`` with
``event_size > 1``), whose parameterisation changed with version 2 (the
``logit_scale`` of `neutra_flows.bijectors.RationalQuadraticTransformer`):
their weights would mean another flow, so loading them is an error. Loading and saving again upgrades a
folder to version 2.

`save_flow(..., overwrite=True)` replaces only the two files it writes; any
other file in the folder is left alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_probability as tfp

from neutra_flows.flows import make_flow

tfb = tfp.bijectors

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "load_flow", "save_flow"]

FORMAT_NAME = "neutra_flows.flow"
FORMAT_VERSION = 2
_READABLE_VERSIONS = (1, 2)
_CONFIG_FILE = "flow.json"
_WEIGHTS_FILE = "weights.npz"


def _key(i: int) -> str:
    return f"v{i:04d}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _content_sha256(header: dict[str, Any]) -> str:
    """SHA-256 of every header entry but the checksum itself (so of the weights too, via their hash)."""
    covered = {k: v for k, v in header.items() if k != "content_sha256"}
    return hashlib.sha256(_canonical_json(covered)).hexdigest()


def _check_target_folder(path: Path, overwrite: bool) -> None:
    if not path.exists():
        parent = path.absolute().parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir():
            raise ValueError(f"cannot create {path}: {parent} is a file, not a folder")
        return
    if not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    if not path.is_dir() or (any(path.iterdir()) and not (path / _CONFIG_FILE).exists()):
        raise ValueError(f"{path} is not a saved flow folder; refusing to replace it")
    for name in (_CONFIG_FILE, _WEIGHTS_FILE):
        if (path / name).is_dir():
            raise ValueError(f"{path / name} is a folder; refusing to replace it")
    if (path / _CONFIG_FILE).exists():
        _check_own_header(path / _CONFIG_FILE)


def _check_own_header(config: Path) -> None:
    """Refuses to overwrite a ``flow.json`` that save_flow did not write (a user's own file)."""
    try:
        with open(config, encoding="utf-8") as f:
            header = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(
            f"{config} is not a saved flow's header (unreadable: {err}); refusing to overwrite it. "
            "Save the flow to another folder, or remove that file yourself"
        ) from err
    if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
        raise ValueError(
            f"{config} is not a saved flow's header (its \"format\" is not {FORMAT_NAME!r}); refusing to "
            "overwrite it. Save the flow to another folder, or remove that file yourself"
        )


def _move_into_place(tmp: Path, path: Path) -> None:
    if not path.exists():
        os.replace(tmp, path)
        return
    # Replace only our own two files: anything else the user keeps in the folder
    # stays. The weights go first; a crash between the two renames leaves a pair
    # whose checksums disagree, which load_flow refuses.
    for name in (_WEIGHTS_FILE, _CONFIG_FILE):
        os.replace(tmp / name, path / name)
    tmp.rmdir()


def save_flow(flow: tfb.Bijector, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Saves a flow built by `make_flow` (trained or not) to the folder `path`.

    Args:
      flow: a flow with a ``flow_config`` (every flow from `make_flow` has one).
      path: the folder to create.
      overwrite: write into an existing folder at `path` (only one that holds a
        saved flow, or an empty one), replacing ``flow.json`` and
        ``weights.npz``; other files in it are left untouched.

    Returns:
      The folder as a `pathlib.Path`.

    Raises:
      ValueError: the flow has no ``flow_config``; `path` exists and is not a
        replaceable folder (a file, a folder with other files but no
        ``flow.json``, or one whose ``flow.json`` is not a saved flow's header).
      FileExistsError: `path` exists and ``overwrite`` is False.
      OSError: `path` cannot be written (e.g. ``PermissionError``); the message
        names `path`, the original error is its ``__cause__``.
    """
    config = getattr(flow, "flow_config", None)
    if not isinstance(config, dict):
        raise ValueError("save_flow needs a flow built by make_flow (it has no flow_config)")
    path = Path(path)
    _check_target_folder(path, overwrite)
    values = [np.asarray(v.numpy()) for v in flow.variables]
    try:
        _write(path, config, values)
    except OSError as err:
        # The error would name the hidden temporary folder, not the one the user gave.
        message = f"save_flow could not write the flow to {path}: {err.strerror or err}"
        try:
            renamed = type(err)(message) if err.errno is None else type(err)(err.errno, message)
        except TypeError:
            renamed = OSError(message)
        raise renamed from err
    return path


def _write(path: Path, config: dict[str, Any], values: list[np.ndarray]) -> None:
    """Writes the two files into a temporary sibling of ``path`` and moves them into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write into a sibling temporary folder and rename it into place, so a crash
    # never leaves a half-written flow at `path`.
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        with open(tmp / _WEIGHTS_FILE, "wb") as f:
            np.savez(f, **{_key(i): v for i, v in enumerate(values)})
        header = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "flow_config": config,
            "variables": [{"shape": list(v.shape), "dtype": v.dtype.name} for v in values],
            "weights_sha256": _sha256(tmp / _WEIGHTS_FILE),
        }
        header["content_sha256"] = _content_sha256(header)
        with open(tmp / _CONFIG_FILE, "w", encoding="utf-8") as f:
            json.dump(header, f, indent=2, sort_keys=True)
        _move_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _read_header(path: Path) -> dict[str, Any]:
    try:
        with open(path / _CONFIG_FILE, encoding="utf-8") as f:
            header = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path / _CONFIG_FILE} is not a readable saved-flow header: {err}") from err
    if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
        raise ValueError(f"{path / _CONFIG_FILE} is not a {FORMAT_NAME} header")
    version = header.get("version")
    if isinstance(version, bool) or version not in _READABLE_VERSIONS:
        raise ValueError(
            f"{path} has format version {version!r}; this neutra_flows reads versions "
            f"{list(_READABLE_VERSIONS)}"
        )
    for key, kind in (("flow_config", dict), ("variables", list), ("weights_sha256", str)):
        if not isinstance(header.get(key), kind):
            raise ValueError(f"{path / _CONFIG_FILE} lacks a valid {key!r} entry")
    if version == 1:
        _accept_version_1(path, header)
    elif header.get("content_sha256") != _content_sha256(header):
        raise ValueError(
            f"{path / _CONFIG_FILE} does not match its checksum (content_sha256): the header was "
            "edited or corrupted after save_flow wrote it. Re-save the flow with save_flow; "
            "never edit flow.json by hand (the weights only fit the flow they were trained in)"
        )
    return header


def _accept_version_1(path: Path, header: dict[str, Any]) -> None:
    config = header["flow_config"]
    if config.get("name") == "nsf" and config.get("event_size") != 1:
        raise ValueError(
            f"{path} is a coupling spline flow (nsf) saved in format version 1; the spline's "
            "parameterisation changed in version 2, so its weights would give a different flow. "
            "Retrain it (or load it with the neutra_flows that saved it)"
        )
    warnings.warn(
        f"{path} was saved in format version 1, whose checksum covers only the weights: an edit of "
        "flow.json cannot be detected. Save it again with save_flow to upgrade it to version "
        f"{FORMAT_VERSION}.",
        UserWarning,
        stacklevel=4,
    )


def _read_weights(path: Path, header: dict[str, Any]) -> list[np.ndarray]:
    weights_path = path / _WEIGHTS_FILE
    if _sha256(weights_path) != header["weights_sha256"]:
        raise ValueError(f"{weights_path} does not match its checksum: the file is corrupted or was changed")
    records = header["variables"]
    try:
        with np.load(weights_path, allow_pickle=False) as archive:
            keys = sorted(archive.files)
            expected = [_key(i) for i in range(len(records))]
            if keys != expected:
                raise ValueError(f"{weights_path} holds {len(keys)} arrays, the header lists {len(records)}")
            values = [archive[k] for k in expected]
    except (OSError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(f"{weights_path} is not a readable weights archive: {err}") from err
    for i, (value, record) in enumerate(zip(values, records, strict=True)):
        if (
            not isinstance(record, dict)
            or list(value.shape) != record.get("shape")
            or (value.dtype.name != record.get("dtype"))
        ):
            raise ValueError(
                f"{weights_path}: variable {i} is {value.dtype.name}{list(value.shape)}, "
                f"the header says {record!r}"
            )
    return values


def load_flow(path: str | os.PathLike) -> tfb.Bijector:
    """Loads a flow saved by `save_flow`: rebuilt by `make_flow`, weights restored.

    Args:
      path: the folder written by `save_flow`.

    Returns:
      A new flow, identical to the saved one (same outputs to the last bit).

    Raises:
      FileNotFoundError: `path` does not exist.
      ValueError: the folder is incomplete, corrupted, from another format
        version, or does not match the flow its configuration builds.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no saved flow at {path}")
    if not path.is_dir():
        raise ValueError(f"{path} is not a saved flow folder (expected a folder)")
    for name in (_CONFIG_FILE, _WEIGHTS_FILE):
        if not (path / name).is_file():
            raise ValueError(f"{path} is not a complete saved flow: {name} is missing")
    header = _read_header(path)
    values = _read_weights(path, header)
    config = header["flow_config"]
    try:
        flow = make_flow(
            config["name"],
            config["event_size"],
            dtype=config["dtype"],
            options=config.get("options") or {},
        )
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: the stored flow_config does not build a flow: {err}") from err
    variables = list(flow.variables)
    if len(variables) != len(values):
        raise ValueError(
            f"{path}: the configuration builds a flow with {len(variables)} variables, "
            f"the file holds {len(values)}"
        )
    for i, (var, value) in enumerate(zip(variables, values, strict=True)):
        if tuple(var.shape) != value.shape or var.dtype.as_numpy_dtype != value.dtype:
            raise ValueError(
                f"{path}: variable {i} ({var.name}) is {var.dtype.name}{list(var.shape)} in the "
                f"rebuilt flow but {value.dtype.name}{list(value.shape)} in the file"
            )
    # Everything checked: only now touch the variables.
    for var, value in zip(variables, values, strict=True):
        var.assign(value)
    return flow
