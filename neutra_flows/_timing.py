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


def seconds_per_gradient(target, num_chains: int, *, jit_compile: bool = True,
                         min_seconds: float = 0.05) -> float:
    """Seconds of one batched gradient of ``target`` at ``num_chains`` points, compiled as ``sample``'s loop.

    The yardstick for a sampler's cost per leapfrog step: a loop of gradient
    evaluations at fixed points inside one compiled function (so dispatch is paid
    once), repeated until it has run for ``min_seconds``. Compilation is excluded.
    """
    import tensorflow as tf
    import tensorflow_probability as tfp

    d, dtype = int(target.event_size), target.dtype
    # Near the origin of the unconstrained space: where a whitened sampler spends its time, roughly.
    z = 0.1 * tf.random.stateless_normal([num_chains, d], seed=[7, 11], dtype=dtype)

    def loop(z, n):
        def body(i, acc):
            lp, grad = tfp.math.value_and_gradient(target.unnormalized_log_prob, z + acc * 0)
            return i + 1, acc + tf.reduce_sum(grad) * 0 + tf.reduce_sum(lp) * 0
        return tf.while_loop(lambda i, _: i < n, body, (tf.constant(0), tf.zeros([], dtype)))[1]

    run = tf.function(loop, jit_compile=jit_compile, autograph=False)
    run(z, tf.constant(1)).numpy()  # compiles
    n = 1
    while True:
        start = time.perf_counter()
        run(z, tf.constant(n)).numpy()
        seconds = time.perf_counter() - start
        if seconds >= min_seconds or n >= 2**20:
            return seconds / n
        n *= 4
