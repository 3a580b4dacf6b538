"""Imports that a run needs only at its end, started in a background thread at its beginning.

``import arviz`` takes 1-1.7 s on a cold CPU (it loads matplotlib and
scipy.stats), and every ``sample`` ends with ``arviz.from_dict``; ``fit`` and the
whitening stage need ArviZ's PSIS and SciPy's L-BFGS. Started when a run starts,
the import overlaps the run's XLA compilation, which releases the GIL, instead
of adding to the user's wall-clock. A module imported in the thread is the same
module object the main thread gets (Python's import lock sees to it); a failed
import is left for the main thread to raise with its own traceback.
"""

from __future__ import annotations

import threading

_MODULES = ("scipy.optimize", "arviz")
_started = threading.Event()


def prefetch() -> None:
    """Starts importing :data:`_MODULES` in a daemon thread (once per process)."""
    if _started.is_set():
        return
    _started.set()
    threading.Thread(target=_load, name="neutra_flows-prefetch", daemon=True).start()


def _load() -> None:
    import importlib

    for name in _MODULES:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - the main thread's own import reports it
            return
