"""Pictures a user wants after a NeuTra run.

* :func:`plot_draws_2d`: each run's draws of two coordinates over the target's
  density (for the funnel, x0 against x1 shows whether a sampler reaches the
  neck);
* :func:`plot_trace`: trace plots of chosen coordinates, one line per chain;
* :func:`plot_ess_per_gradient`: min bulk-ESS per gradient evaluation as bars,
  on a log scale, from the table :func:`neutra_flows.compare` returns;
* :func:`plot_loss`: a VI loss curve (negative ELBO per step).

Every function takes an optional ``ax`` (or returns a new figure) and never
calls ``plt.show``, so it works headless and inside notebooks alike.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["plot_draws_2d", "plot_trace", "plot_ess_per_gradient", "plot_phase_times", "plot_loss",
           "flat_draws"]


def _plt():
    # Imported lazily so that importing neutra_flows never picks a GUI backend.
    import matplotlib

    if matplotlib.get_backend().lower() not in ("agg", "pdf", "svg", "ps", "cairo") and not _has_display():
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _has_display() -> bool:
    import os

    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def flat_draws(idata: Any) -> tuple[np.ndarray, list[str]]:
    """All posterior variables of ``idata`` as one ``[chain, draw, k]`` array, with labels.

    Scalars give one column; a vector ``x`` of size ``d`` gives ``x[0] .. x[d-1]``.
    """
    columns, labels = [], []
    for name, var in idata.posterior.data_vars.items():
        values = np.asarray(var.values)
        chain, draw = values.shape[:2]
        flat = values.reshape(chain, draw, -1)
        event_shape = values.shape[2:]
        for j in range(flat.shape[-1]):
            columns.append(flat[..., j])
            if event_shape:
                index = np.unravel_index(j, event_shape)
                labels.append(f"{name}[{','.join(str(int(i)) for i in index)}]")
            else:
                labels.append(str(name))
    return np.stack(columns, axis=-1), labels


def _column(labels: Sequence[str], wanted: int | str) -> int:
    if isinstance(wanted, (int, np.integer)):
        if not 0 <= int(wanted) < len(labels):
            raise ValueError(f"coordinate {wanted} is out of range; there are {len(labels)}")
        return int(wanted)
    if wanted not in labels:
        raise ValueError(f"unknown coordinate {wanted!r}; choose from {list(labels)[:20]}")
    return list(labels).index(wanted)


def plot_draws_2d(
    idatas: Mapping[str, Any],
    *,
    target: Any = None,
    coords: tuple[int | str, int | str] = (0, 1),
    reference_draws: np.ndarray | None = None,
    max_points: int = 2000,
    seed: int = 0,
    axes: Sequence[Any] | None = None,
):
    """Scatter each run's draws of two coordinates over the target's density.

    Args:
      idatas: ``{label: InferenceData}``; one panel per run.
      target: optional :class:`neutra_flows.Target`. When it has an exact
        sampler, its draws (in the user's constrained space) are drawn in grey
        behind each panel; that is the density the chains should cover.
      coords: two coordinates, as flat indices or labels such as ``"x[0]"``.
      reference_draws: ``[n, k]`` draws to use as background instead.
      max_points: at most this many draws per panel (thinned evenly).
      axes: existing axes, one per run.

    Returns:
      The matplotlib figure.
    """
    plt = _plt()
    if not idatas:
        raise ValueError("plot_draws_2d needs at least one run")
    if axes is None:
        fig, axes = plt.subplots(1, len(idatas), figsize=(4.2 * len(idatas), 4), squeeze=False)
        axes = list(axes[0])
    else:
        fig = axes[0].figure
    background = reference_draws
    if background is None and target is not None and getattr(target, "has_exact_sampler", False):
        z = np.asarray(target.sample(max_points, seed=seed))
        named = target.named_draws(z)
        background = np.concatenate([np.asarray(v).reshape(z.shape[0], -1) for v in named.values()], -1)
    for ax, (label, idata) in zip(axes, idatas.items(), strict=True):
        draws, labels = flat_draws(idata)
        i, j = _column(labels, coords[0]), _column(labels, coords[1])
        flat = draws.reshape(-1, draws.shape[-1])
        step = max(1, flat.shape[0] // max_points)
        if background is not None:
            ax.scatter(background[:, i], background[:, j], s=3, c="0.75", label="exact", rasterized=True)
        ax.scatter(flat[::step, i], flat[::step, j], s=3, alpha=0.6, label=label, rasterized=True)
        diverging = _divergent_draws(idata)
        if diverging is not None and diverging.any():
            bad = draws[diverging]
            ax.scatter(bad[:, i], bad[:, j], s=12, c="red", marker="x", label="divergent")
        ax.set_xlabel(labels[i])
        ax.set_ylabel(labels[j])
        ax.set_title(label)
        ax.legend(loc="best", fontsize="small", markerscale=3)
    fig.tight_layout()
    return fig


def _divergent_draws(idata: Any) -> np.ndarray | None:
    stats = getattr(idata, "sample_stats", None)
    if stats is None or "diverging" not in stats:
        return None
    return np.asarray(stats["diverging"].values, dtype=bool)


def plot_trace(idata: Any, *, coords: Sequence[int | str] = (0,), max_draws: int = 5000):
    """Trace plots: one panel per coordinate, one line per chain.

    Returns:
      The matplotlib figure.
    """
    plt = _plt()
    draws, labels = flat_draws(idata)
    columns = [_column(labels, c) for c in coords]
    fig, axes = plt.subplots(len(columns), 1, figsize=(8, 1.8 * len(columns) + 0.6), squeeze=False)
    for ax, col in zip(axes[:, 0], columns, strict=True):
        for chain in range(draws.shape[0]):
            ax.plot(draws[chain, :max_draws, col], lw=0.6, alpha=0.8)
        ax.set_ylabel(labels[col])
    axes[-1, 0].set_xlabel("draw")
    fig.tight_layout()
    return fig


def plot_ess_per_gradient(table: Any, *, column: str = "ess_per_grad", ax: Any = None):
    """Bars of ESS per gradient evaluation (log scale), one per run of ``compare``'s table."""
    plt = _plt()
    if column not in table.columns:
        raise ValueError(f"the table has no column {column!r}; it has {list(table.columns)}")
    if ax is None:
        fig, ax = plt.subplots(figsize=(1.6 * len(table) + 2.5, 3.5))
    else:
        fig = ax.figure
    values = np.asarray(table[column], dtype=float)
    positive = np.where(values > 0, values, np.nan)
    ax.bar([str(i) for i in table.index], positive, color="C0")
    ax.set_yscale("log")
    ax.set_ylabel(column.replace("_", " "))
    for k, v in enumerate(values):
        ax.annotate(f"{v:.3g}", (k, v if v > 0 else 1e-6), ha="center", va="bottom", fontsize="small")
    fig.tight_layout()
    return fig


# One colour per phase, the same in every figure.
_PHASE_COLOURS = {"whitening": "C4", "training": "C1", "diagnostics": "C5", "set-up": "C7", "compilation": "C3",
                  "warm-up": "C0", "refits": "C6", "sampling": "C2", "assembly": "C8", "other": "C9"}


def plot_phase_times(runs: Any, *, ax: Any = None):
    """Where each run's seconds went: one horizontal stacked bar per run.

    Args:
      runs: ``{label: arviz.InferenceData}`` from :func:`neutra_flows.sample`
        (each bar's segments are its ``attrs["phase_times"]``, see
        :func:`neutra_flows.diagnostics.phase_times`), or ``{label: {phase:
        seconds}}``.
      ax: a matplotlib axis to draw on.
    """
    from neutra_flows.diagnostics import phase_times

    plt = _plt()
    # An InferenceData has items() too: its groups.
    if not hasattr(runs, "items") or hasattr(runs, "posterior"):
        raise ValueError(f"runs must be a mapping {{label: InferenceData}}, got {type(runs).__name__}")
    labels = list(runs)
    phases = {label: dict(runs[label]) if isinstance(runs[label], dict) else phase_times(runs[label])
              for label in labels}
    if ax is None:
        fig, ax = plt.subplots(figsize=(7.5, 0.6 * len(labels) + 1.6))
    else:
        fig = ax.figure
    seen: list[str] = []
    for row, label in enumerate(labels):
        left = 0.0
        for phase, seconds in phases[label].items():
            colour = _PHASE_COLOURS.get(phase, "0.5")
            ax.barh(row, seconds, left=left, color=colour, label=None if phase in seen else phase)
            seen.append(phase)
            left += seconds
        ax.annotate(f"{left:.1f} s", (left, row), xytext=(3, 0), textcoords="offset points", va="center",
                    fontsize="small")
    ax.set_yticks(range(len(labels)), labels)
    ax.invert_yaxis()
    ax.set_xlabel("seconds (all-in: from the call to the last draw)")
    ax.legend(fontsize="small", ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.25 - 0.05 * len(labels)))
    fig.tight_layout()
    return fig


def plot_loss(losses: Sequence[float] | np.ndarray, *, ax: Any = None, smooth: int = 50):
    """The VI loss (negative ELBO) per step, raw and smoothed by a running mean."""
    plt = _plt()
    values = np.asarray(losses, dtype=float)
    if values.ndim != 1:
        raise ValueError(f"losses must be a 1-D sequence, got shape {values.shape}")
    if ax is None:
        fig, ax = plt.subplots(figsize=(6, 3.5))
    else:
        fig = ax.figure
    if values.size == 0:
        # fit skips training when the whitening Gaussian already fits: say so, do not fail.
        ax.text(0.5, 0.5, "no training steps\n(see the fit's stop_reason)", ha="center", va="center",
                transform=ax.transAxes)
        ax.set_xlabel("step")
        fig.tight_layout()
        return fig
    ax.plot(values, lw=0.5, alpha=0.4, label="loss")
    window = max(1, min(smooth, values.size // 5 or 1))
    if window > 1:
        kernel = np.ones(window) / window
        ax.plot(np.arange(window - 1, values.size), np.convolve(values, kernel, "valid"), label="running mean")
    finite = values[np.isfinite(values)]
    if finite.size:
        lo, hi = np.percentile(finite, [1, 99])
        pad = 0.1 * (hi - lo + 1e-12)
        ax.set_ylim(lo - pad, hi + pad)
    ax.set_xlabel("step")
    ax.set_ylabel("negative ELBO")
    ax.legend()
    fig.tight_layout()
    return fig
