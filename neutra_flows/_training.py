"""The one resilient compiled training loop every fit uses.

A fit hands :class:`ResilientLoop` a factory for its *compiled chunk*, a function
``chunk(start, count, attempt) -> (values, skipped, first_bad, code)`` that runs
``count`` units of work (steps, epochs) from unit ``start`` inside one
``tf.function`` and reports what went wrong:

* ``values``: per-unit numbers (losses) with at least ``count`` entries, or an
  empty array when the fit keeps none;
* ``skipped``: how many optimiser steps were skipped (non-finite loss or
  gradient, see :func:`guarded_step`);
* ``first_bad``: the first skipped step, or ``-1`` when unknown;
* ``code``: the fit's own bit flags (what was non-finite), OR-ed over the chunk,
  turned into words by the fit's :class:`Wording`.

The loop knows nothing of ELBOs, epochs or data. Around every chunk it keeps a
snapshot of the parameters and the optimiser's state. When XLA cannot compile
the first chunk it recompiles in graph mode once, with a note
(:attr:`ResilientLoop.jit_compile` tells the fit, which may have other functions
to recompile). When more than :data:`MAX_SKIP_FRACTION` of a chunk's steps were
skipped, or a parameter is no longer finite, the chunk is rolled back, the
learning rate multiplied by :data:`LR_BACKOFF` and the chunk retried with fresh
draws (``attempt`` counts the rollbacks, for the fit's seeds); after
``max_recoveries`` rollbacks it raises ``RuntimeError``. A chunk that passes is
handed to the fit's ``on_chunk`` callback, which records it and says whether to
stop.

Also here: the optimiser (Adam under a learning-rate schedule whose scale the
loop lowers), :func:`chunk_of_steps` (the compiled chunk of a fit that takes
one guarded step per unit) and the plateau rule :class:`StoppingRule`.

References
----------
* Kingma, D. P. and Ba, J. "Adam: a method for stochastic optimization." 2014,
  arXiv:1412.6980.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tensorflow as tf
import tf_keras

from neutra_flows._utils import check_positive_int

__all__ = [
    "LR_BACKOFF",
    "MAX_SKIP_FRACTION",
    "ChunkReport",
    "ResilientLoop",
    "StoppingRule",
    "Wording",
    "all_finite",
    "chunk_of_steps",
    "default_learning_rate",
    "guarded_step",
    "make_optimizer",
    "progress_bar",
    "restore",
    "snapshot",
    "step_wording",
]

# A chunk in which more than this fraction of steps had to be skipped is rolled
# back and retried with a lower learning rate.
MAX_SKIP_FRACTION = 0.5
LR_BACKOFF = 0.25


# -- learning rates and optimiser ------------------------------------------------------


class _ScaledSchedule(tf_keras.optimizers.schedules.LearningRateSchedule):
    """``scale * base(step)``; ``scale`` is a variable lowered after failures.

    Not serialisable (no ``get_config``): ``scale`` is live training state that
    the loop lowers, and a config could only freeze a copy of it. The optimiser
    that holds this schedule lives and dies inside one fit.
    """

    def __init__(self, base: Any, scale: tf.Variable):
        self.base = base
        self.scale = scale

    def __call__(self, step):
        if callable(self.base):
            lr = self.base(step)
        else:
            lr = tf.constant(self.base, tf.float32)
        return tf.cast(lr, tf.float32) * tf.cast(self.scale, tf.float32)


def default_learning_rate(
    num_steps: int, initial: float = 1e-2, final_fraction: float = 1e-2
) -> tf_keras.optimizers.schedules.LearningRateSchedule:
    """The default of :func:`fit`: cosine decay from ``initial`` to ``initial * final_fraction``.

    A smooth variant of the NeuTra paper's piecewise schedule (x0.1 at 20 %,
    x0.01 at 80 %): it spends more steps at a high rate early, where most of the
    progress is made, and ends at the same small rate to settle the flow.
    """
    num_steps = check_positive_int(num_steps, "num_steps")
    return tf_keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=float(initial), decay_steps=num_steps, alpha=float(final_fraction)
    )


def make_optimizer(
    learning_rate: Any, num_steps: int, default_initial: float, clip: float | None
) -> tuple[tf_keras.optimizers.Adam, tf.Variable]:
    """``(Adam, lr_scale)``: Adam under ``lr_scale * schedule``, ``lr_scale`` a float32 variable at 1.

    ``learning_rate`` is a positive float, a ``tf_keras`` ``LearningRateSchedule``,
    or ``None`` for :func:`default_learning_rate` ``(num_steps, default_initial)``;
    ``clip`` is Adam's ``global_clipnorm``.
    """
    if learning_rate is None:
        base = default_learning_rate(num_steps, default_initial)
    elif isinstance(learning_rate, tf_keras.optimizers.schedules.LearningRateSchedule):
        base = learning_rate
    elif isinstance(learning_rate, (int, float, np.floating)) and not isinstance(learning_rate, bool):
        if not (math.isfinite(float(learning_rate)) and float(learning_rate) > 0):
            raise ValueError(f"learning_rate must be positive and finite, got {learning_rate}")
        base = float(learning_rate)
    else:
        raise ValueError(
            "learning_rate must be a float, a tf_keras LearningRateSchedule or None, got "
            f"{type(learning_rate).__name__} (Keras 3 schedules are not supported: use tf_keras)"
        )
    scale = tf.Variable(1.0, dtype=tf.float32, trainable=False, name="lr_scale")
    optimizer = tf_keras.optimizers.Adam(learning_rate=_ScaledSchedule(base, scale), global_clipnorm=clip)
    return optimizer, scale


# -- steps and state -------------------------------------------------------------------


def guarded_step(optimizer, variables, loss_fn):
    """One Adam step, skipped when the loss or a gradient is not finite: ``(loss, finite, aux)``.

    ``loss_fn() -> (loss, aux)``. A skipped step changes neither the parameters
    nor the optimiser's state, so one bad minibatch costs nothing but itself.
    """
    with tf.GradientTape() as tape:
        loss, aux = loss_fn()
    grads = tape.gradient(loss, variables)
    grads = [tf.zeros_like(v) if g is None else g for g, v in zip(grads, variables, strict=True)]
    finite = tf.math.is_finite(loss)
    for g in grads:
        finite = finite & tf.reduce_all(tf.math.is_finite(g))

    def apply():
        optimizer.apply_gradients(zip(grads, variables, strict=True))
        return tf.constant(0, tf.int32)

    tf.cond(finite, apply, lambda: tf.constant(0, tf.int32))
    return loss, finite, aux


def chunk_of_steps(one_step: Callable, steps_per_chunk: int) -> Callable:
    """The compiled chunk of a fit whose unit is one step, to wrap in ``tf.function``.

    ``one_step(step, attempt) -> (loss, finite, code)`` (``code``: int32 flags);
    the chunk runs steps ``first_step ... first_step + count - 1`` in a
    ``tf.while_loop`` and returns ``(losses [steps_per_chunk] float64, skipped,
    first_bad, code)`` as :class:`ResilientLoop` expects.
    """

    def run_chunk(first_step, count, attempt):
        def body(i, buf, skipped, first_bad, code_or):
            loss, finite, code = one_step(first_step + i, attempt)
            buf = tf.tensor_scatter_nd_update(buf, [[i]], tf.cast([loss], tf.float64))
            bad = tf.logical_not(finite)
            skipped += tf.cast(bad, tf.int32)
            first_bad = tf.where(bad & (first_bad < 0), first_step + i, first_bad)
            return i + 1, buf, skipped, first_bad, tf.bitwise.bitwise_or(code_or, code)

        init = (
            tf.constant(0),
            tf.zeros([steps_per_chunk], tf.float64),
            tf.constant(0),
            tf.constant(-1),
            tf.constant(0),
        )
        _, buf, skipped, first_bad, code = tf.while_loop(
            lambda i, *_: i < count, body, init, maximum_iterations=steps_per_chunk
        )
        return buf, skipped, first_bad, code

    return run_chunk


def snapshot(variables) -> list[tf.Tensor]:
    """Copies of the variables' values, for :func:`restore`."""
    return [tf.identity(v) for v in variables]


def restore(variables, values) -> None:
    """Assigns ``values`` (from :func:`snapshot`) back to ``variables``."""
    for v, x in zip(variables, values, strict=True):
        v.assign(x)


def all_finite(variables) -> bool:
    """Whether every floating-point variable holds only finite values."""
    return all(bool(tf.reduce_all(tf.math.is_finite(v))) for v in variables if v.dtype.is_floating)


def progress_bar(total: int, desc: str, enabled: bool, unit: str = "step"):
    """A tqdm bar (a context manager) that stays silent when ``enabled`` is false."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, leave=False)


# -- the loop --------------------------------------------------------------------------


@dataclass(frozen=True)
class ChunkReport:
    """What one compiled chunk did.

    Attributes:
      start, count: the chunk's first unit and its number of units.
      steps: optimiser steps in the chunk (``count * steps_per_unit``).
      values: ``[count]`` the chunk's per-unit values (empty when it keeps none).
      skipped: steps skipped for a non-finite loss or gradient.
      first_bad: the first skipped step (``start`` when the chunk did not say).
      code: the fit's flags for what was non-finite, OR-ed over the chunk.
    """

    start: int
    count: int
    steps: int
    values: np.ndarray
    skipped: int
    first_bad: int
    code: int


def _no_detail(code: int) -> str:
    return "non-finite loss or gradient"


@dataclass(frozen=True)
class Wording:
    """The loop's notes and error, as ``str.format`` templates.

    Fields: those of :class:`ChunkReport` (but ``values``), ``last`` (the
    chunk's last unit), ``why`` (``describe(code)``), ``recoveries`` (rollbacks
    before this one), ``lr_scale`` (the learning-rate multiplier, already
    lowered in ``rolled_back``) and every entry of ``context``.

    Attributes:
      skipped: note for a chunk kept although some steps were skipped.
      rolled_back: note for a chunk rolled back and retried.
      gave_up: the ``RuntimeError`` message once ``max_recoveries`` is spent.
      describe: ``code -> str``.
      context: extra fields (a name, advice).
    """

    skipped: str
    rolled_back: str
    gave_up: str
    describe: Callable[[int], str] = _no_detail
    context: Mapping[str, Any] = field(default_factory=dict)

    def format(self, which: str, report: ChunkReport, recoveries: int, lr_scale: float) -> str:
        """The ``which`` template (``"skipped"``, ``"rolled_back"`` or ``"gave_up"``) filled in."""
        fields = {name: getattr(report, name) for name in ("start", "count", "steps", "skipped", "first_bad",
                                                            "code")}
        fields.update(self.context, last=report.start + report.count - 1, why=self.describe(report.code),
                      recoveries=recoveries, lr_scale=lr_scale)
        return getattr(self, which).format(**fields)


def step_wording(what: str, describe: Callable[[int], str] = _no_detail, advice: str = "") -> Wording:
    """The wording of a fit whose unit is one step; ``what`` opens the error (``"fit(banana)"``)."""
    return Wording(
        skipped="steps {start}-{last}: {skipped} of {count} steps had a non-finite loss or gradient ({why}) "
                "and were skipped",
        rolled_back="step {first_bad}: non-finite loss or gradient ({why}) in {skipped} of {count} steps; "
                    "rolled back to step {start} and lowered the learning rate to x{lr_scale:.3g} of the "
                    "schedule",
        gave_up="{what}: non-finite loss or gradient at step {first_bad} ({why}) persisted after {recoveries} "
                "rollbacks with learning-rate reductions (now x{lr_scale:.3g}). The flow was left at its "
                "parameters before step {start}.{advice}",
        describe=describe,
        context={"what": what, "advice": f" {advice}" if advice else ""},
    )


class ResilientLoop:
    """Runs a fit's compiled chunks over its units, rolling back chunks that went non-finite.

    Args:
      make_chunk: ``jit_compile -> chunk``, the compiled chunk described in the
        module docstring (``tf.function(..., jit_compile=jit_compile)``); called
        again with ``False`` when XLA cannot compile the first chunk.
      variables: the trained variables (snapshotted and restored).
      optimizer: the built optimiser (its state is snapshotted and restored too).
      lr_scale: the learning-rate multiplier from :func:`make_optimizer`.
      max_recoveries: rollbacks allowed before ``RuntimeError``.
      jit_compile: whether to try XLA first.
      wording: the notes' and the error's words.

    Attributes:
      notes: what happened (skipped steps, rollbacks, XLA fallback), in order.
      recoveries: rollbacks so far.
      jit_compile: whether the chunk is (still) compiled with XLA.
    """

    def __init__(self, make_chunk: Callable[[bool], Callable], *, variables, optimizer, lr_scale: tf.Variable,
                 max_recoveries: int, jit_compile: bool, wording: Wording):
        self.variables = list(variables)
        self.opt_variables = list(optimizer.variables)
        self.lr_scale, self.max_recoveries, self.wording = lr_scale, max_recoveries, wording
        self.jit_compile = bool(jit_compile)
        self._make_chunk = make_chunk
        self._chunk = make_chunk(self.jit_compile)
        self.recoveries = 0
        self.notes: list[str] = []

    def run(self, total: int, *, on_chunk: Callable[[ChunkReport], bool], chunk_size: int = 1,
            steps_per_unit: int = 1) -> int:
        """Runs units ``0 ... total - 1`` in chunks of ``chunk_size``; returns the units done.

        ``on_chunk(report)`` sees every chunk that was kept, in order, and
        returns ``True`` to stop early. ``steps_per_unit`` is the number of
        optimiser steps in one unit (1 when a unit is a step).
        """
        done = 0
        while done < total:
            count = min(chunk_size, total - done)
            report = self._attempt(done, count, count * steps_per_unit)
            if report is None:
                continue  # rolled back, or recompiled without XLA: the same units again
            done += count
            if on_chunk(report):
                break
        return done

    def _attempt(self, start: int, count: int, steps: int) -> ChunkReport | None:
        params, opt_state = snapshot(self.variables), snapshot(self.opt_variables)
        try:
            values, skipped, first_bad, code = self._chunk(
                tf.constant(start), tf.constant(count), tf.constant(self.recoveries)
            )
        except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError) as err:
            if not self.jit_compile or start > 0 or "XLA" not in str(err).upper():
                raise
            self._fall_back_to_graph_mode(err)
            restore(self.variables, params)
            restore(self.opt_variables, opt_state)
            return None
        first_bad = int(first_bad)
        report = ChunkReport(start=start, count=count, steps=steps, values=np.asarray(values)[:count],
                             skipped=int(skipped), first_bad=first_bad if first_bad >= 0 else start,
                             code=int(code))
        if all_finite(self.variables) and report.skipped <= MAX_SKIP_FRACTION * steps:
            if report.skipped:
                self.notes.append(self.wording.format("skipped", report, self.recoveries, self._scale()))
            return report
        # Too many failures in this chunk: roll back and lower the learning rate.
        restore(self.variables, params)
        restore(self.opt_variables, opt_state)
        if self.recoveries >= self.max_recoveries:
            raise RuntimeError(self.wording.format("gave_up", report, self.recoveries, self._scale()))
        self.recoveries += 1
        self.lr_scale.assign(self.lr_scale * LR_BACKOFF)
        self.notes.append(self.wording.format("rolled_back", report, self.recoveries, self._scale()))
        return None

    def _fall_back_to_graph_mode(self, err: Exception) -> None:
        self.jit_compile = False
        self.notes.append(
            "XLA could not compile the training step; fell back to graph mode "
            f"(first line of the error: {str(err).splitlines()[0][:200]})"
        )
        self._chunk = self._make_chunk(False)

    def _scale(self) -> float:
        return float(self.lr_scale.numpy())


# -- stopping --------------------------------------------------------------------------


class StoppingRule:
    """Plateau rule on chunk means: lower the learning rate 10x twice, then stop.

    A chunk improves when its mean loss is below the best chunk mean by more
    than two standard errors of the difference (the steps' losses are
    independent Monte Carlo estimates). It starts judging after 20 % of the
    budget (at least 3 chunks), so the early, fast descent is never cut short.
    """

    patience = 3
    max_decays = 2

    def __init__(self, num_steps: int, lr_scale: tf.Variable, enabled: bool):
        self.num_steps, self.lr_scale, self.enabled = num_steps, lr_scale, enabled
        self.best, self.best_se, self.stale, self.decays = math.inf, 0.0, 0, 0
        self.last_gain = math.nan
        self.reason, self.notes = "", []
        self.seen = 0

    def update(self, step: int, chunk_losses: np.ndarray) -> bool:
        """Records a finished chunk (``step`` = steps done); True means stop now."""
        finite = chunk_losses[np.isfinite(chunk_losses)]
        self.seen += 1
        if finite.size < 10:
            return False
        mean, se = float(finite.mean()), float(finite.std() / math.sqrt(finite.size))
        threshold = 2.0 * math.sqrt(se**2 + self.best_se**2)
        self.last_gain = self.best - mean
        if self.last_gain > threshold or not math.isfinite(self.best):
            self.best, self.best_se, self.stale = mean, se, 0
            return False
        self.stale += 1
        if not self.enabled or step < max(0.2 * self.num_steps, 3) or self.stale < self.patience:
            return False
        if self.decays < self.max_decays:
            self.decays += 1
            self.stale = 0
            self.lr_scale.assign(self.lr_scale * 0.1)
            self.notes.append(f"step {step}: the loss stopped improving; learning rate lowered 10x")
            return False
        self.reason = (f"converged at step {step} of {self.num_steps}: no improvement beyond two "
                       f"standard errors (best chunk mean {self.best:.4g} +/- {self.best_se:.2g}) in "
                       f"{self.patience} chunks after {self.max_decays} learning-rate reductions")
        return True

    def budget_reason(self, step: int) -> str:
        """Why training stopped when the budget of steps ran out."""
        if self.stale == 0 and math.isfinite(self.last_gain) and self.seen > 1:
            return (f"budget of {self.num_steps} steps reached while the loss was still improving "
                    f"(last chunk {self.last_gain:.3g} below the best before): more steps may help")
        return f"budget of {self.num_steps} steps reached"
