"""Seconds per phase: what ``fit``, ``fit_gaussian`` and ``sample`` report of their time.

A user with a stopwatch sees every second from the call to the last draw:
compilation, whitening, training, warm-up and sampling. Each phase is timed
where it runs and reported by name, so that ``bench`` and ``suite`` can show
where the time went (``neutra_flows.plots.plot_phase_times``).
"""

from __future__ import annotations

import time

__all__ = ["Laps"]


class Laps:
    """A stopwatch that charges the time since the last lap to a named phase.

    >>> laps = Laps()
    >>> laps.lap("setup")
    >>> sorted(laps.seconds)
    ['setup']
    """

    def __init__(self):
        self.started = self._last = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def lap(self, phase: str) -> None:
        """Adds the seconds since the last lap (or the start) to ``phase``."""
        now = time.perf_counter()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self._last
        self._last = now

    def skip(self) -> None:
        """Starts the next lap now: the time since the last one is charged to no phase."""
        self._last = time.perf_counter()

    def add(self, phase: str, seconds: float) -> None:
        """Charges ``seconds`` measured elsewhere to ``phase``."""
        self.seconds[phase] = self.seconds.get(phase, 0.0) + float(seconds)

    @property
    def total(self) -> float:
        """Seconds since the stopwatch started."""
        return time.perf_counter() - self.started
