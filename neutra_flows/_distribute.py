"""``tf.distribute`` support for :func:`~neutra_flows.sample` and :func:`~neutra_flows.fit`.

Chains (for ``sample``) and the training batch (for ``fit``) are split into equal
contiguous shards, replica ``r`` of ``R`` holding rows ``r n/R ... (r+1) n/R - 1``.

Draws do not depend on the sharding. Every random draw whose leading axis is the
chain axis (HMC's momentum, the Metropolis-Hastings uniform, NUTS's direction,
slice and acceptance draws) is made, on every replica, for the *whole* batch of
``n`` chains from the step's seed, and the replica keeps its rows. Chain ``c``
therefore sees exactly the numbers it sees in one batch of ``n`` chains without a
strategy: one replica reproduces the single-device draws bit for bit, and 2 or 4
replicas reproduce them up to rounding (batch-size-dependent matrix kernels,
all-reduced ChEES sums), which MCMC amplifies over long runs. The price is
drawing ``n x d`` normals per replica per leapfrog trajectory, small next to
the ``n / R`` flow and target gradients per leapfrog step. ``fit`` does the same
for its base draws ``u``: the whole batch from the step's seed, sliced per replica.

TFP's kernels take one seed per batch and call
``tensorflow_probability.python.internal.samplers``; :func:`chain_shard`
intercepts those calls while a replica's graph is traced (and only then, in the
tracing thread), which is the one place where the whole-batch draw can be made.

Cross-chain statistics cover all replicas: ChEES's through TFP's
``experimental_reduce_chain_axis_names`` (outside JAX, ``ReplicaContext.all_reduce``),
the step size's through all-gathered per-chain acceptance probabilities
(``neutra_flows.mcmc._all_gathered_log_mean_exp``). TensorFlow cannot all-reduce inside a
``tf.while_loop`` on CPUs (``merge_call`` is refused in control flow), so the
warm-up runs one dispatched transition per step; once the warm-up ends, step
size and trajectory length are frozen, the chains no longer talk to each other,
and sampling runs in compiled chunks (XLA when ``jit_compile``) without any
communication. ``fit`` likewise dispatches one data-parallel Adam step at a
time: gradients all-reduced (summed), the step skipped on every replica alike
when the summed loss or gradient is not finite.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp
from tensorflow_probability.python.internal import samplers

tfd = tfp.distributions

# Any non-None name makes TFP's kernels all-reduce their chain means through the
# replica context (tensorflow_probability/python/internal/distribute_lib.py).
_CHAIN_AXIS = "chains"

_PATCH_LOCK = threading.Lock()
_PATCH_USERS = 0
_ORIGINALS: dict[str, Any] = {}
_LOCAL = threading.local()


def check_strategy(strategy: Any, count: int, what: str, variables: list[tf.Variable]) -> int:
    """Validates ``strategy`` for ``count`` items (chains, batch rows); returns the replica count."""
    if not isinstance(strategy, tf.distribute.Strategy):
        raise ValueError(
            f"strategy must be a tf.distribute.Strategy (e.g. tf.distribute.MirroredStrategy()), "
            f"got {type(strategy).__name__}"
        )
    replicas = int(strategy.num_replicas_in_sync)
    if count % replicas:
        raise ValueError(
            f"{what} = {count} is not divisible by the strategy's {replicas} replicas; every replica "
            f"runs the same number, so use a multiple of {replicas} "
            f"(e.g. {replicas * max(1, count // replicas)} or {replicas * (count // replicas + 1)})"
        )
    outside = [v.name for v in variables if not strategy.extended.variable_created_in_scope(v)]
    if outside:
        raise ValueError(
            f"{len(outside)} of the flow's {len(variables)} variables (first: {outside[0]!r}) were "
            "created outside this strategy's scope, so they live on one device and cannot be "
            "mirrored to the replicas. Build the strategy first and create (or load) the flow inside "
            "its scope:\n    strategy = tf.distribute.MirroredStrategy()\n    with strategy.scope():\n"
            "        flow = neutra_flows.make_flow('iaf', d)\n"
            "(to reuse trained weights: build the flow in the scope, then "
            "new_var.assign(old_var) for each variable, or neutra_flows.load_flow inside the scope)"
        )
    return replicas


def scope(strategy: Any):
    """``strategy.scope()``, or a no-op without a strategy."""
    return contextlib.nullcontext() if strategy is None else strategy.scope()


# -- whole-batch draws, sliced per replica ------------------------------------------


def _static_dims(shape: Any) -> list[int] | None:
    value = tf.get_static_value(shape) if tf.is_tensor(shape) else shape
    if value is None:
        return None
    dims = np.asarray(value).reshape(-1)
    return [int(x) for x in dims] if dims.dtype.kind in "iu" else None


def _sliced(original):
    def draw(shape, *args, **kwargs):
        shard = getattr(_LOCAL, "shard", None)
        dims = None if shard is None else _static_dims(shape)
        if shard is None or not dims or dims[0] != shard[0]:
            return original(shape, *args, **kwargs)
        local, total, offset = shard
        full = original([total] + dims[1:], *args, **kwargs)
        begin = tf.concat([tf.reshape(tf.cast(offset, tf.int32), [1]), tf.zeros([len(dims) - 1], tf.int32)], 0)
        out = tf.slice(full, begin, dims)
        out.set_shape(dims)
        return out

    return draw


@contextlib.contextmanager
def chain_shard(local: int, total: int, offset: Any):
    """While tracing in this thread, chain-shaped draws ``[local, ...]`` become rows
    ``offset ... offset + local - 1`` of the same draw for ``[total, ...]``."""
    global _PATCH_USERS
    with _PATCH_LOCK:
        if _PATCH_USERS == 0:
            _ORIGINALS.update(normal=samplers.normal, uniform=samplers.uniform)
            samplers.normal = _sliced(_ORIGINALS["normal"])
            samplers.uniform = _sliced(_ORIGINALS["uniform"])
        _PATCH_USERS += 1
    previous = getattr(_LOCAL, "shard", None)
    _LOCAL.shard = (int(local), int(total), offset)
    try:
        yield
    finally:
        _LOCAL.shard = previous
        with _PATCH_LOCK:
            _PATCH_USERS -= 1
            if _PATCH_USERS == 0:
                samplers.normal = _ORIGINALS["normal"]
                samplers.uniform = _ORIGINALS["uniform"]


def _offsets(strategy, local: int):
    return strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.constant(ctx.replica_id_in_sync_group * local, tf.int32)
    )


def _per_replica(strategy, tree):
    """Every leaf as a per-replica value.

    ``strategy.run`` returns a leaf that all replicas share (a captured constant)
    as a plain tensor, and the same leaf as a per-replica value once it was
    computed; without one form the compiled steps would be retraced.
    """
    def wrap(x):
        if isinstance(x, tf.distribute.DistributedValues):
            return x
        return strategy.experimental_distribute_values_from_function(lambda ctx: tf.identity(x))

    return tf.nest.map_structure(wrap, tree)


def _first(strategy, value):
    return tf.nest.map_structure(lambda x: strategy.experimental_local_results(x)[0], value)


def _gather(strategy, values: dict, axis: int) -> dict:
    """All-gathers per-replica buffers along the chain axis (bools travel as int32)."""
    out = {}
    for k, v in values.items():
        dtype = strategy.experimental_local_results(v)[0].dtype
        if dtype == tf.bool:
            v = strategy.run(lambda x: tf.cast(x, tf.int32), args=(v,))
        g = strategy.gather(v, axis=axis)
        out[k] = tf.cast(g, tf.bool) if dtype == tf.bool else g
    return out


# -- sample -----------------------------------------------------------------------------


class ShardedChains:
    """Runs a :class:`~neutra_flows.mcmc.NeuTraKernel` with its chains sharded across replicas.

    Called like ``sample``'s compiled ``advance(state, results, seed, n, thin)``;
    ``state`` and ``results`` are per-replica values and the returned buffers hold
    all chains (all-gathered), so the caller's loop is the same as without a strategy.
    """

    def __init__(self, strategy, kernel, make_advance, draw_stats, latent_state, *, num_chains: int,
                 num_warmup: int, buffer_size: int, jit_compile: bool):
        # mcmc's helpers come in as arguments: this module sits below mcmc and vi.
        self.draw_stats, self.latent_state = draw_stats, latent_state
        self.strategy, self.kernel = strategy, kernel
        self.num_warmup = num_warmup
        self.local = num_chains // strategy.num_replicas_in_sync
        self.total = num_chains
        self.offsets = _offsets(strategy, self.local)
        self.adapting = kernel._kernel_stack(_CHAIN_AXIS)
        self.chunk = make_advance(kernel, buffer_size, jit_compile, shard=(self.local, num_chains))
        self.step = tf.function(self._step, autograph=False)
        self.sampling = tf.function(self._sampling, autograph=False)
        self.done = 0

    def _split(self, x):
        x = tf.convert_to_tensor(x)
        n = self.local
        return self.strategy.experimental_distribute_values_from_function(
            lambda ctx: x[ctx.replica_id_in_sync_group * n:(ctx.replica_id_in_sync_group + 1) * n]
        )

    def start(self, z0, u0=None):
        """Per-replica ``(state, results)`` for the starts ``z0`` (latent ``u0`` when given)."""
        self.done = 0
        kernel = self.kernel
        if u0 is not None:
            results = self.strategy.run(
                lambda u: kernel.bootstrap_results(transformed_init_state=u), args=(self._split(u0),))
        else:
            results = self.strategy.run(
                lambda z: kernel.bootstrap_results(init_state=z), args=(self._split(z0),))
        return self._split(z0), _per_replica(self.strategy, results)

    def _step(self, state, results, seed, offsets):
        """One adapting transition on every replica, its cross-chain means all-reduced."""
        def replica(state, results, seed, offset):
            step_seed, seed = tf.unstack(tfp.random.split_seed(seed, n=2))
            with chain_shard(self.local, self.total, offset):
                state, results = self.adapting.one_step(state, results, seed=step_seed)
            stats = self.draw_stats(results)
            grads = tf.reduce_sum(tf.cast(stats["n_steps"], tf.int64))
            divs = tf.reduce_sum(tf.cast(stats["diverging"], tf.int64))
            return state, results, seed, grads, divs, self.latent_state(results)

        state, results, seed, grads, divs, v = self.strategy.run(replica, args=(state, results, seed, offsets))
        s = self.strategy
        return (state, results, _first(s, seed), s.reduce("SUM", grads, axis=None),
                s.reduce("SUM", divs, axis=None), s.gather(v, axis=0))

    def _sampling(self, state, results, seed, num_steps, thin, offsets):
        """``num_steps`` transitions in one compiled loop per replica, no communication inside."""
        s = self.strategy
        state, results, seed, grads, divs, buffers = s.run(
            self.chunk, args=(state, results, seed, num_steps, thin, offsets))
        return (state, results, _first(s, seed), s.reduce("SUM", grads, axis=None),
                s.reduce("SUM", divs, axis=None), _gather(s, buffers, axis=1))

    def __call__(self, state, results, seed, num_steps, thin):
        n = int(num_steps)
        if n == 0:
            # Compiles both loops now, so compile time stays out of the phases' times.
            # TensorFlow also prepares a function anew for each placement of its
            # inputs (seconds per function): the first calls, on the starts and
            # then on a call's own outputs, are made here and their results dropped.
            warm = (state, results, seed)
            for _ in range(3 if self.num_warmup else 0):
                out = self.step(*warm, self.offsets)
                warm = (out[0], _per_replica(self.strategy, out[1]), out[2])
            for _ in range(2):
                out = self.sampling(*warm, num_steps, thin, self.offsets)
                warm = (out[0], _per_replica(self.strategy, out[1]), out[2])
            return state, results, seed, tf.zeros([], tf.int64), tf.zeros([], tf.int64), {}
        if self.done < self.num_warmup:
            grads = divs = 0
            vs = []
            for _ in range(n):
                state, results, seed, g, v, latent = self.step(state, results, seed, self.offsets)
                results = _per_replica(self.strategy, results)
                grads += int(g)
                divs += int(v)
                vs.append(latent)
            self.done += n
            return state, results, seed, grads, divs, {"v": tf.stack(vs)}
        state, results, seed, grads, divs, buffers = self.sampling(
            state, results, seed, num_steps, thin, self.offsets)
        self.done += n
        return state, _per_replica(self.strategy, results), seed, grads, divs, buffers

    def local_results(self, results):
        """The first local replica's results (adapted quantities are equal on all replicas)."""
        return _first(self.strategy, results)

    def rescale_latent(self, results, new_scale):
        """:meth:`NeuTraKernel.rescale_latent` on every replica's chains."""
        var = self.kernel.latent_scale
        old = tf.convert_to_tensor(var)
        new = tf.convert_to_tensor(new_scale, old.dtype)
        var.assign(new)
        ratio = old / new
        return _per_replica(self.strategy,
                            self.strategy.run(lambda r: self.kernel._rebootstrap(r, ratio), args=(results,)))


# -- fit ------------------------------------------------------------------------------------


def fit_chunk(strategy, target, flow, variables, optimizer, *, batch_size: int, train_seed,
              steps_per_chunk: int):
    """A data-parallel stand-in for ``fit``'s compiled chunk ``(first_step, count, attempt)``.

    Returns ``(losses [steps_per_chunk], skipped, first_bad, code)`` as ``fit``'s
    chunk does; each step draws the whole batch's ``u`` from the step's seed,
    each replica evaluates its rows, and loss and gradients are summed.
    """
    d, dtype = int(target.event_size), target.dtype
    local = batch_size // strategy.num_replicas_in_sync
    offsets = _offsets(strategy, local)
    base = tfd.MultivariateNormalDiag(tf.zeros([d], dtype), tf.ones([d], dtype))

    def replica(step, attempt, offset):
        attempt_seed = tf.random.experimental.stateless_fold_in(train_seed, attempt)
        step_seed = tf.random.experimental.stateless_fold_in(attempt_seed, step)
        u = tf.random.stateless_normal([batch_size, d], step_seed, dtype=dtype)
        u = tf.slice(u, tf.stack([offset, 0]), [local, d])
        with tf.GradientTape() as tape:
            log_q = base.log_prob(u) - flow.forward_log_det_jacobian(u, event_ndims=1)
            log_p = target.unnormalized_log_prob(flow.forward(u))
            # A share of the global mean: the replicas' sum is the whole batch's mean.
            loss = tf.reduce_sum(log_q - log_p) / batch_size
        grads = tape.gradient(loss, variables)
        grads = [tf.zeros_like(v) if g is None else g for g, v in zip(grads, variables, strict=True)]
        flags = tf.cast(tf.stack([
            tf.reduce_any(tf.math.is_nan(log_p)),
            tf.reduce_any(tf.equal(log_p, -np.inf)),
            tf.reduce_any(tf.equal(log_p, np.inf)),
            tf.reduce_any(~tf.math.is_finite(log_q)),
        ]), tf.float32)
        ctx = tf.distribute.get_replica_context()
        loss, flags, *grads = ctx.all_reduce("SUM", [loss, flags, *grads])
        finite = tf.math.is_finite(loss)
        for g in grads:
            finite = finite & tf.reduce_all(tf.math.is_finite(g))
        return loss, finite, flags, grads

    @tf.function(autograph=False)
    def gradients(step, attempt):
        loss, finite, flags, grads = strategy.run(replica, args=(step, attempt, offsets))
        return _first(strategy, loss), _first(strategy, finite), _first(strategy, flags), grads

    @tf.function(autograph=False)
    def apply(grads):
        # Already summed across replicas: no second aggregation.
        def replica_apply(*g):
            optimizer.apply_gradients(zip(g, variables, strict=True), skip_gradients_aggregation=True)

        strategy.run(replica_apply, args=tuple(grads))

    def chunk(first_step, count, attempt):
        losses = np.zeros([steps_per_chunk])
        skipped, first_bad, code = 0, -1, 0
        for i in range(int(count)):
            step = int(first_step) + i
            loss, finite, flags, grads = gradients(tf.constant(step), attempt)
            if bool(finite):
                apply(grads)
            else:
                skipped += 1
                first_bad = step if first_bad < 0 else first_bad
            losses[i] = float(loss)
            code |= sum(1 << b for b, f in enumerate(flags.numpy()) if f > 0)
        return tf.constant(losses), tf.constant(skipped), tf.constant(first_bad), tf.constant(code)

    return chunk
