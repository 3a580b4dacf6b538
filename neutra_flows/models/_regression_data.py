"""The posteriordb linear regressions' design matrices and responses (and arK's lags), in NumPy alone.

One definition for the package's targets (:mod:`neutra_flows.models.posteriordb`)
and for the peers benchmark (``benchmarks/peers/common.py``), whose virtual
environment has no TensorFlow: it loads this file by its path, so the file
imports nothing but NumPy.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np


def columns(*cols: Any) -> np.ndarray:
    """The columns side by side, as float64 ``[n, k]``."""
    return np.stack([np.asarray(c, np.float64) for c in cols], axis=1)


def _kidiq(d: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    hs, iq = np.asarray(d["mom_hs"], np.float64), np.asarray(d["mom_iq"], np.float64)
    return columns(np.ones_like(hs), hs, iq, hs * iq), np.asarray(d["kid_score"], np.float64)


def _earnings(d: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    height, male = np.asarray(d["height"], np.float64), np.asarray(d["male"], np.float64)
    return columns(np.ones_like(height), height, male, height * male), np.log(np.asarray(d["earn"], np.float64))


def _mesquite(d: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    v = {k: np.asarray(d[k], np.float64) for k in d if k != "N"}
    d1, d2 = v["diam1"], v["diam2"]
    design = columns(
        np.ones_like(d1),
        np.log(d1 * d2 * v["canopy_height"]),
        np.log(d1 * d2),
        np.log(d1 / d2),
        np.log(v["total_height"]),
        np.log(v["density"]),
        v["group"],
    )
    return design, np.log(v["weight"])


def _nes(d: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    v = {k: np.asarray(d[k], np.float64) for k in d if k != "N"}
    age = v["age_discrete"]
    design = columns(np.ones_like(age), v["real_ideo"], v["race_adj"], age == 2, age == 3, age == 4,
                     v["educ1"], v["gender"], v["income"])
    return design, v["partyid7"]


def ark_lags(d: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """arK's ``(lags [T - K, K], y[K:])``: ``lags[i, j] = y[K + i - (j + 1)]``, the modelled times' lags."""
    k, t = int(d["K"]), int(d["T"])
    y = np.asarray(d["y"], np.float64)
    return np.stack([y[k - j - 1 : t - j - 1] for j in range(k)], axis=1), y[k:]


def _sblrc(d: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(d["X"], np.float64), np.asarray(d["y"], np.float64)


# posteriordb name -> data.json's dict -> (X [n, k], y [n]) of y ~ normal(X beta, sigma).
REGRESSIONS: dict[str, Callable[[Mapping[str, Any]], tuple[np.ndarray, np.ndarray]]] = {
    "kidiq-kidscore_interaction": _kidiq,
    "earnings-logearn_interaction": _earnings,
    "mesquite-logmesquite_logvas": _mesquite,
    "nes2000-nes": _nes,
    "sblrc-blr": _sblrc,
}
