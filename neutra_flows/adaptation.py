"""Adapting a flow on the chains' own draws during NeuTra's warm-up.

A reverse-KL fit (:func:`neutra_flows.fit`) spends ``steps x batch`` target
gradients before the first transition and, being mode-seeking, tends to miss
the tails. Here the flow learns instead from the draws the warm-up produces
anyway, as nutpie's normalizing-flow adaptation does (Seyboldt et al.):

* a fresh flow starts from the whitening stage of :func:`neutra_flows.fit`
  (a Gaussian by MAP, Laplace and deterministic ADVI; the identity where none
  fits), or from the identity, and the warm-up runs NeuTra with it;
* at a few window ends (by default at 15 %, 30 %, 45 % and 60 % of the warm-up)
  the chains' points ``x`` gathered so far, with a few points of the current
  flow's widened tails (``x = f(s u)``, ``s`` 2 in a few dimensions and less in
  many: the draws alone leave the tails unconstrained), and the target's
  gradients there ``g = grad log p(x)``, are split at random into training and
  held-out parts;
* the flow is refitted from its current weights (from the identity start, the
  first refit sets its whitening layer from the draws' moments) by minimising
  the **Fisher divergence** in latent space, ``E || grad_u log p~(u) + u ||^2``
  with ``u = f^{-1}(x)`` and ``p~(u) = p(f(u)) |det f'(u)|`` the target pulled
  back through the flow (zero exactly when the pulled-back target is
  ``N(0, I)``), or by **maximum likelihood** on the draws (forward KL);
* the refit is kept only when its held-out loss is lower than the current
  flow's; a refit that produces NaN, or a flow that cannot pull a chain back,
  is rejected with a note and the previous flow kept;
* the chains carry on from the same points in the new latent space; after the
  last refit the flow is frozen, NeuTra's latent scale and step size settle,
  and the kept draws follow.

A refit uses the guarded Adam step of :mod:`neutra_flows._training` (a step
with a non-finite loss or gradient is skipped) but not its rollback loop: a
refit that goes wrong is rejected whole and the previous flow kept, which is
always a valid preconditioner.

The training costs no extra transitions and no target evaluation at the
draws: the sampler has already computed the gradient of the pulled-back
density at every draw, and ``grad log p(x) = J(u)^{-T} (grad_u log p~(u) -
grad_u log|det J(u)|)`` recovers the target's through the flow the draw was
made with (one vector-Jacobian product of ``f^{-1}``), as nutpie reuses its
sampler's gradients. What is counted in ``num_grad_evals_training`` is the
start (the whitening stage, lean here: DADVI only where the Laplace fit fails
PSIS, 256 draws per candidate's ELBO; or the short fit) and the tail points.
Both losses need ``f^{-1}``, so the flow must have a fast inverse (RealNVP,
spline coupling, MAF, the affine and LU flows); the default is RealNVP, which
is fast in both directions.

Use it through :func:`neutra_flows.sample`: ``sample(target, "adapt", seed=0)``
or, to refine a flow from :func:`neutra_flows.fit`, ``sample(target, result,
adapt_flow=True)``; ``adapt_flow=FlowAdaptation(...)`` changes the settings.

References
----------
* Hoffman, M., Sountsov, P., Dillon, J. V., Langmore, I., Tran, D. and
  Vasudevan, S. "NeuTra-lizing bad geometry in Hamiltonian Monte Carlo using
  neural transport." 2019, arXiv:1903.03704.
* Hyvarinen, A. "Estimation of non-normalized statistical models by score
  matching." JMLR 6, 2005 (the Fisher divergence as a training loss).
* Seyboldt, A., Carlson, E. and Carpenter, B. "Preconditioning Hamiltonian
  Monte Carlo by minimizing Fisher divergence." 2025, arXiv:2603.18845
  (nutpie's adaptation).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from neutra_flows._timing import Laps
from neutra_flows._training import all_finite, guarded_step, make_optimizer, restore, snapshot
from neutra_flows._utils import as_seed, check_positive_int, stan_regularised
from neutra_flows.flows import make_flow
from neutra_flows.whitening import GaussianFit, set_whitening, whiten_flow, whitening_layer

tfb = tfp.bijectors

__all__ = ["FAST_INVERSE_FLOWS", "OBJECTIVES", "STARTS", "FlowAdaptation", "FlowAdapter", "Refit",
           "default_fit_batch_size", "default_tail_scale"]

#: Flows whose inverse is as cheap as their forward: the losses need ``f^{-1}``.
FAST_INVERSE_FLOWS = ("realnvp", "nsf", "maf", "affine_diag", "affine_tril", "identity", "lu_linear")
#: ``"fisher"``: Fisher divergence in latent space; ``"forward_kl"``: maximum likelihood.
OBJECTIVES = ("fisher", "forward_kl")
#: How a fresh flow starts: ``"auto"`` is the whitening stage's Gaussian, plus a short
#: VI fit where no Gaussian fits (funnels), or ``fit`` instead above ``fit_above_dims``.
STARTS = ("auto", "whitening", "fit", "identity")
# Points per block when the target's gradients are computed (one compilation).
_GRADIENT_BLOCK = 512
# PSIS: below this k-hat a Gaussian already fits (as in fit's skip_training_if_gaussian).
_GOOD_KHAT = 0.5
# The fit that replaces the adaptation in many dimensions: the suite's VI protocol.
_FULL_FIT = {"flow": "iaf", "num_steps": 2000, "batch_size": 256}
# The short fit's ELBO and k-hat are not used: a few draws, not fit's 16384.
_FIT_DIAGNOSTIC_DRAWS = 256
# Warm-up steps per block of the held-out split.
_SPLIT_BLOCK = 10
# The whitening stage only has to start the chains in the typical set; the refits
# do the rest. fit's full stage (DADVI from two starts, 2048 ELBO draws per
# candidate) was 70-90 % of the adaptation's gradients on the regressions.
_LEAN_WHITENING = {"num_elbo_draws": 256, "dadvi": "when_needed"}


@dataclass(frozen=True)
class FlowAdaptation:
    """Settings of the flow adaptation on the warm-up draws.

    Attributes:
      objective: ``"fisher"`` (default) or ``"forward_kl"``.
      flow: the flow built for ``sample(target, "adapt")`` (one of
        :data:`FAST_INVERSE_FLOWS`).
      flow_options: keyword arguments for :func:`~neutra_flows.make_flow`
        when it builds that flow (``num_layers``, ``hidden_units``, ...).
      start: how the flow starts (a FitResult's trained flow starts as it is):
        ``"auto"`` (default) is ``"whitening"``, then ``"fit"`` too where no
        Gaussian beat the identity there (no MAP with a positive-definite
        Hessian, Laplace and ADVI worse) and the identity fails PSIS (k-hat >=
        0.5): on funnels the draws never reach the neck early enough
        to learn it, and 2-4 % of the kept transitions diverged, against 0-0.6 %
        after a short fit; above ``fit_above_dims`` dimensions, with no Gaussian
        passing PSIS, it trains an IAF with ``fit`` and does not refit (see
        there). ``"whitening"`` sets its whitening layer first from
        :func:`neutra_flows.whitening.fit_gaussian` (MAP, Laplace, and
        deterministic ADVI only where the Laplace fit fails PSIS; 256 draws per
        candidate's ELBO; the identity where none fits, as on funnels), whose
        gradients are counted; ``"fit"`` runs a short :func:`neutra_flows.fit` (whitening,
        then ``fit_steps`` reverse-KL steps of ``fit_batch_size``; all its gradients are
        counted) and refines that flow on the draws; ``"identity"`` starts from
        the identity and sets the whitening layer from the draws' mean and
        covariance at the first refit (no extra
        gradients, but on a badly scaled posterior the first window's chains may
        not reach the typical set: on kidiq 97 % of the kept transitions
        diverged).
      num_refits: refits, evenly spaced between ``first_refit`` and
        ``last_refit`` (fractions of the warm-up).
      train_steps: Adam steps per refit, all of them run (no early stop); the
        held-out loss is checked every 50 and the best check kept.
      batch_size: points per Adam step.
      learning_rate: Adam's initial rate (cosine decay to 1 % within a refit).
      validation_fraction: held-out share of the points, for the keep-or-reject test.
      max_points: at most this many points (the most recent) per refit.
      tail_points: per refit, points ``x = f(tail_scale * u)``, ``u ~ N(0, I)``,
        pushed through the current flow, join the chains' points (their
        gradients are counted). The draws only cover the bulk; without these
        the refitted flow is free to bend where the draws are sparse, and its
        walls there made 1-3 % of the transitions diverge. 0 disables them.
      tail_scale: how far out those points reach, as a multiple of ``u``;
        ``None`` (default) is :func:`default_tail_scale`, ``min(2, 1 + 3 /
        sqrt(d))``: about 3 latent units beyond the typical radius ``sqrt(d)``.
      fit_steps: the reverse-KL steps of the short fit (``start="fit"``, or
        ``"auto"`` where no Gaussian fits).
      fit_batch_size: their batch; ``None`` (default) is
        :func:`default_fit_batch_size`: 8 per 10 dimensions, at most 256. The
        fit's ELBO and k-hat are not used, so it draws 256 diagnostic points,
        not 16384.
      min_warmup: the smallest warm-up accepted (``ValueError`` below it).
      fit_above_dims: with ``start="auto"`` and a flow ``sample`` builds
        (``flow="adapt"``): above this many dimensions, where no Gaussian
        passes PSIS (k-hat >= 0.5, as for ``fit``'s Gaussian skip; funnels,
        German credit), the flow is an IAF
        trained by :func:`neutra_flows.fit` (2000 steps of 256, with its
        whitening stage) and is not refitted on the draws, and the run's
        ``flow_adaptation_start`` says so. Four chains' warm-up draws do not
        cover such a posterior: the adaptation converged on 3 of 6 seeds of
        the 100-D funnel, 1 of 2 at 50-D and 1 of 3 on German credit (51-D),
        where ``fit`` + NeuTra converged on 4 of 5, 2 of 2 and 3 of 3; at
        30-D the adaptation converged on 3 seeds of 4 at 8x-15x ``fit``'s
        whole-run ESS per gradient, at 20-D on both. ``None`` always adapts.
      gaussian_khat: with ``start="auto"`` and a flow ``sample`` builds
        (``flow="adapt"``): where the whitening stage's winner is the Laplace
        fit (it beat the identity, and DADVI where DADVI ran) and its PSIS
        k-hat is below this, NeuTra samples with that Gaussian (an affine
        flow: HMC with a dense metric, the latent scale still adapted) and
        plans no refit; the run's ``flow_adaptation_start`` says so. HMC only
        needs the geometry roughly right and stays exact whatever the metric,
        so a k-hat above PSIS's 0.7 costs speed, not correctness; the
        default 1.0 is the time it saves. On garch11 (Laplace k-hat
        0.6-0.8 on 1024-4096 draws, 0.35-0.89 on 256) the refitted RealNVP
        had 2.6x the ESS of the Gaussian, 5134 against 1994 (NUTS in the
        latent space), but took 28.5 s all-in against 12.0 s (plain NUTS:
        11.2-14.1 s for 2101; ``python benchmarks/time_to_ess.py``, fresh
        processes): the refits' compilation alone is about NUTS's whole run.
        k-hat on 256 draws alone does not separate the banana (0.32-1.19 over
        three seeds, where the Gaussian-metric run was wrong in 1000 draws:
        stds 10 % off) from gp_regr (0.43-0.69); on the banana DADVI always
        wins the stage, so the flow is refitted there. On the other nine posteriordb models the
        refits bought nothing the Gaussian had not: kidiq went from 36 s
        all-in to 6-9 s (NUTS: 24-32 s) at the same ESS, arma11 from 54 s to
        15.5 s with more ESS (2666 against 2444). ``None`` always builds and
        refits the flow.
    """

    objective: str = "fisher"
    flow: str = "realnvp"
    flow_options: Mapping[str, Any] | None = None
    start: str = "auto"
    num_refits: int = 4
    first_refit: float = 0.15
    last_refit: float = 0.6
    train_steps: int = 400
    batch_size: int = 128
    learning_rate: float = 1e-3
    validation_fraction: float = 0.2
    max_points: int = 4096
    min_warmup: int = 200
    tail_points: int = 512
    tail_scale: float | None = None
    fit_steps: int = 1000
    fit_batch_size: int | None = None
    fit_above_dims: int | None = 40
    gaussian_khat: float | None = 1.0

    def __post_init__(self):
        if self.start not in STARTS:
            raise ValueError(f"start must be one of {STARTS}, got {self.start!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.flow not in FAST_INVERSE_FLOWS:
            raise ValueError(f"flow must be one of {FAST_INVERSE_FLOWS} (a fast inverse), got {self.flow!r}")
        if self.flow_options is not None and not isinstance(self.flow_options, Mapping):
            raise ValueError(f"flow_options must be a dict of make_flow's options, got {self.flow_options!r}")
        for name in ("num_refits", "train_steps", "batch_size", "max_points", "min_warmup", "fit_steps"):
            check_positive_int(getattr(self, name), name)
        for name in ("fit_batch_size", "fit_above_dims"):
            if getattr(self, name) is not None:
                check_positive_int(getattr(self, name), name)
        if check_positive_int(self.tail_points, "tail_points", minimum=0) >= self.max_points:
            raise ValueError(f"tail_points must be an int in [0, max_points), got {self.tail_points!r}")
        khat = self.gaussian_khat
        if khat is not None and not (math.isfinite(khat) and khat > 0):
            raise ValueError(f"gaussian_khat must be positive or None, got {self.gaussian_khat}")
        if self.tail_scale is not None and not (math.isfinite(self.tail_scale) and self.tail_scale > 0):
            raise ValueError(f"tail_scale must be positive, got {self.tail_scale}")
        if not 0.0 < self.first_refit <= self.last_refit < 1.0:
            raise ValueError("need 0 < first_refit <= last_refit < 1 (fractions of the warm-up), got "
                             f"{self.first_refit} and {self.last_refit}")
        if not 0.05 <= self.validation_fraction <= 0.5:
            raise ValueError(f"validation_fraction must lie in [0.05, 0.5], got {self.validation_fraction}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")

    def boundaries(self, num_warmup: int) -> tuple[int, ...]:
        """The warm-up steps after which the flow is refitted."""
        if num_warmup < self.min_warmup:
            raise ValueError(
                f"adapting the flow on the warm-up draws needs num_warmup >= {self.min_warmup} (got "
                f"{num_warmup}): too few draws to refit it. Give a longer warm-up, or train the flow "
                "first with neutra_flows.fit and pass it without adaptation"
            )
        steps = np.linspace(self.first_refit, self.last_refit, self.num_refits) * num_warmup
        return tuple(sorted({max(2, int(round(s))) for s in steps}))


@dataclass
class Refit:
    """One refit: where, on how many points, the held-out losses and the verdict."""

    step: int
    num_train: int
    num_validation: int
    loss_before: float
    loss_after: float
    accepted: bool
    note: str = ""


class FlowAdapter:
    """The warm-up hook of :func:`neutra_flows.sample` that refits the flow on the draws.

    ``sample`` calls :meth:`observe` with every warm-up chunk's buffered draws
    and :meth:`act` at each of :attr:`boundaries`; :meth:`report` writes the
    refits into the run's attrs.
    """

    def __init__(self, target: Any, flow: tfb.Bijector | None, *, config: FlowAdaptation, num_warmup: int,
                 num_chains: int, seed: Any, trained: bool = False, jit_compile: bool = True):
        self.config = config
        # sample's jit_compile: the start's fit and the refits compile as the chains' loop does.
        self._jit_compile = bool(jit_compile)
        self.num_chains = int(num_chains)
        self.boundaries = config.boundaries(num_warmup)
        # The first half of the first window is the chains' transient from their starts.
        self.first_step = self.boundaries[0] // 2
        self.target = target
        self.flow = flow if flow is not None else make_flow(config.flow, int(target.event_size),
                                                             dtype=target.dtype, **(config.flow_options or {}))
        _check_fast_inverse(self.flow)
        self.refits: list[Refit] = []
        self.num_grad_evals = 0
        self.whitening = None
        self.start = "as given" if trained else config.start
        self.wall_time = 0.0
        self.start_times: dict[str, float] = {}
        self._points: list[np.ndarray] = []
        # Per observed chunk; None where its gradients are still to be computed.
        self._gradients: list[np.ndarray | None] = []
        self._seed = as_seed(seed)
        self._tail_scale = config.tail_scale or default_tail_scale(int(target.event_size))
        # The first refit starts the whitening layer from the draws only when nothing set it.
        self._moments_at_first_refit = not trained and config.start == "identity"
        started = time.perf_counter()
        # A flow from fit (trained) starts as it is; any other starts as config.start says.
        if not trained:
            self._start(target, seed, built_here=flow is None)
        # Reported with the training time: the run's seconds must include it.
        self.start_time = time.perf_counter() - started
        # Like fit, the whitening stage's Gaussian stays fixed: Adam steps sized for
        # the coupling layers would wreck a covariance with condition number 1e8.
        self._trainer = None
        if self.boundaries:
            frozen = [] if self.whitening is None else whitening_layer(self.flow).trainable_variables
            self._trainer = _FlowTrainer(target, self.flow, config, frozen=frozen,
                                         jit_compile=self._jit_compile)

    def _start(self, target: Any, seed: Any, built_here: bool) -> None:
        """Whitening; then a short VI fit where no Gaussian fits, or ``fit`` where the draws cannot do."""
        config, laps = self.config, Laps()
        # Seconds per phase of the start, for the run's phase_times (the dict fills as laps go).
        self.start_times = laps.seconds
        if config.start in ("auto", "whitening"):
            self.whitening = whiten_flow(target, self.flow, seed=seed, **_LEAN_WHITENING)
            self.num_grad_evals += 0 if self.whitening is None else self.whitening.num_grad_evals
            laps.lap("whitening")
        if built_here and config.start == "auto" and self._gaussian_suffices():
            self._gaussian_instead(target)
            return
        if built_here and config.start == "auto" and self._too_hard_for_the_draws():
            self._fit_instead(target, seed)
            laps.lap("training")
            return
        # No Gaussian beat the identity (no MAP, or Laplace and ADVI both worse) and
        # the identity itself fails PSIS: a funnel-like posterior.
        no_mode = self._no_gaussian_fits() and self.whitening.method.startswith("identity")
        if config.start == "fit" or (config.start == "auto" and no_mode):
            self._short_fit(target, seed, whiten=config.start == "fit")
            laps.lap("training")

    @property
    def last_boundary(self) -> int:
        """The warm-up step of the last refit; 0 when none is planned (the flow is frozen from the start)."""
        return self.boundaries[-1] if self.boundaries else 0

    def _no_gaussian_fits(self) -> bool:
        """The whitening stage ran and its best Gaussian (the identity included) fails PSIS."""
        return self.whitening is not None and not self.whitening.khat < _GOOD_KHAT

    def _too_hard_for_the_draws(self) -> bool:
        """Many dimensions and no Gaussian that passes PSIS (see ``FlowAdaptation.fit_above_dims``)."""
        limit = self.config.fit_above_dims
        return limit is not None and int(self.target.event_size) > limit and self._no_gaussian_fits()

    def _gaussian_suffices(self) -> bool:
        """The Laplace fit won the whitening stage with k-hat below ``FlowAdaptation.gaussian_khat``."""
        limit, gaussian = self.config.gaussian_khat, self.whitening
        # k-hat on 256 draws alone cannot tell a banana from a regression (0.32-1.19 on
        # the banana over three seeds, 0.43-0.69 on gp_regr), but where the Laplace fit
        # already failed PSIS the stage ran DADVI, and on the banana DADVI always won.
        return (limit is not None and gaussian is not None and gaussian.method == "laplace"
                and gaussian.khat < limit)

    def _gaussian_instead(self, target: Any) -> None:
        """Samples with the whitening stage's Gaussian as the flow (affine) and plans no refit."""
        d, gaussian = int(target.event_size), self.whitening
        full = bool(np.any(np.tril(gaussian.scale_tril, -1)))
        self.flow = make_flow("affine_tril" if full else "affine_diag", d, dtype=target.dtype)
        set_whitening(self.flow.layers[-1], gaussian)
        self.boundaries = ()
        self.start = (f"the whitening stage's Gaussian, not refitted on the draws (PSIS k-hat "
                      f"{gaussian.khat:.2f} < {self.config.gaussian_khat}: no flow needed)")

    def _fit_instead(self, target: Any, seed: Any) -> None:
        """Trains an IAF by reverse KL (fit's defaults) and plans no refit: sampling as after ``fit``."""
        d, khat = int(target.event_size), self.whitening.khat
        self.flow = make_flow(_FULL_FIT["flow"], d, dtype=target.dtype)
        result = _start_fit(target, self.flow, f"a {_FULL_FIT['num_steps']}-step VI fit of an IAF",
                            num_steps=_FULL_FIT["num_steps"], batch_size=_FULL_FIT["batch_size"], seed=seed,
                            jit_compile=self._jit_compile)
        self.num_grad_evals += result.num_grad_evals
        self.whitening = result.whitening
        self.boundaries = ()
        self.start = (f"a {result.num_steps}-step VI fit of an IAF, not refitted on the draws ({d} dimensions "
                      f"and the best Gaussian's PSIS k-hat {khat:.2f}: too few warm-up draws to learn from)")

    def _short_fit(self, target: Any, seed: Any, whiten: bool) -> None:
        """``fit_steps`` of reverse KL (after the whitening stage unless it already ran)."""
        batch_size = self.config.fit_batch_size or default_fit_batch_size(int(target.event_size))
        result = _start_fit(target, self.flow, f"a {self.config.fit_steps}-step VI fit",
                            num_steps=self.config.fit_steps, batch_size=batch_size, seed=seed,
                            early_stopping=False, whiten=whiten, num_diagnostic_draws=_FIT_DIAGNOSTIC_DRAWS,
                            jit_compile=self._jit_compile)
        self.whitening = result.whitening or self.whitening
        self.num_grad_evals += result.num_grad_evals
        self.start = f"a {result.num_steps}-step VI fit"

    def observe(self, done: int, n: int, buffers: dict) -> None:
        """Keeps the chains' points of warm-up steps ``done ... done + n - 1`` from ``first_step`` on,
        with the target's gradients there.

        The sampler has already computed the gradient of the pulled-back density
        at each point (``buffers["latent_grad"]``); it is turned into the target's
        gradient through the flow the chunk ran with, so the draws cost no target
        evaluation, as in nutpie. Buffers without it (another kernel) leave the
        gradients to be computed, and counted, at the next refit.
        """
        if done + n <= self.first_step or done >= self.last_boundary:
            return
        skip = max(0, self.first_step - done)
        d = int(self.target.event_size)
        z = buffers["z"].numpy()[skip:n].reshape(-1, d)
        self._points.append(z)
        if "latent_grad" in buffers and "v" in buffers:
            # The latent scale is 1 until the last refit (sample's schedule), so v is u.
            u = buffers["v"].numpy()[skip:n].reshape(-1, d)
            latent_grad = buffers["latent_grad"].numpy()[skip:n].reshape(-1, d)
            self._gradients.append(self._trainer.gradients_from_latent(u, latent_grad))
        else:
            self._gradients.append(None)

    def act(self, step: int, state: Any, results: Any, kernel: Any, rescale: Any) -> Any:
        """Refits the flow at warm-up step ``step``; returns the kernel results for ``state``."""
        start = time.perf_counter()
        seed = tf.random.experimental.stateless_fold_in(self._seed, step)
        x, g, groups = self._data(tf.random.experimental.stateless_fold_in(seed, 1))
        first = not self.refits and self._moments_at_first_refit
        refit, previous = self._trainer.refit(step, x, g, seed, from_moments=first, groups=groups)
        if refit.accepted:
            try:
                results = kernel.refresh(results, state)
            except ValueError:
                self._trainer.restore(previous)
                refit.accepted = False
                refit.note = ("the refitted flow cannot pull every chain back to a finite point: "
                              "kept the previous flow")
        self.refits.append(refit)
        self.wall_time += time.perf_counter() - start
        return results

    def _data(self, seed: tf.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The most recent draws and the tail points, the target's gradients there, and
        their groups for the held-out split.

        A draw's gradient is the sampler's, or where the buffers had none it is
        computed (and counted) once, when it is first used. Successive
        draws of a chain are nearly copies of each other, so the held-out split
        takes whole blocks of ``_SPLIT_BLOCK`` warm-up steps: a random split
        would hold out near-copies of training points and pass an overfitted flow.
        """
        d = int(self.target.event_size)
        for i, (p, g) in enumerate(zip(self._points, self._gradients, strict=True)):
            if g is None:
                self._gradients[i] = self._trainer.gradients(p)
                self.num_grad_evals += len(p)
        points = np.concatenate(self._points) if self._points else np.zeros([0, d])
        keep = self.config.max_points - self.config.tail_points
        x = points[-keep:]
        g = np.concatenate(self._gradients)[-keep:] if self._gradients else np.zeros([0, d])
        position = np.arange(len(points))[-keep:]
        groups = position // (self.num_chains * _SPLIT_BLOCK)
        if self.config.tail_points:
            u = tf.random.stateless_normal([self.config.tail_points, int(self.target.event_size)], seed,
                                           dtype=self.target.dtype) * self._tail_scale
            tail = self.flow.forward(u).numpy()
            x, g = np.concatenate([x, tail]), np.concatenate([g, self._trainer.gradients(tail)])
            groups = np.concatenate([groups, groups.max(initial=0) + 1 + np.arange(len(tail))])
            self.num_grad_evals += len(tail)
        return x, g, groups

    def report(self, attrs: dict) -> None:
        attrs["num_grad_evals_training"] = int(attrs.get("num_grad_evals_training", 0)) + self.num_grad_evals
        attrs["flow_adaptation_time"] = self.wall_time
        attrs["flow_start_times"] = json.dumps(self.start_times)
        attrs["flow_training_time"] = float(attrs.get("flow_training_time", 0.0)) + self.start_time
        attrs["flow_refits"] = json.dumps([asdict(r) for r in self.refits])
        attrs["flow_refits_accepted"] = sum(r.accepted for r in self.refits)
        attrs["flow_adaptation_start"] = self.start + (
            f" (whitening: {self.whitening.method})" if self.whitening is not None else "")


def _start_fit(target: Any, flow: tfb.Bijector, what: str, **fit_kwargs: Any) -> Any:
    """``fit`` for the adaptation's start; a fit that gives up raises ``sample``'s ``ValueError``."""
    from neutra_flows.vi import fit

    try:
        return fit(target, flow, progress=False, **fit_kwargs)
    except RuntimeError as err:
        # The caller called sample, not fit: say which step of sample failed and what to change.
        raise ValueError(
            f"sample(target, 'adapt'): the flow's start ({what}) failed: {err} For sample: where the log "
            "density is -inf outside a region (a positive or bounded parameter), give the Target a "
            "constraining_bijector onto it (tfb.Exp(), tfb.Sigmoid(), ...); where it is NaN only under XLA, "
            "pass jit_compile=False; or pass a flow trained with fit (its FitResult), or "
            "adapt_flow=FlowAdaptation(start='whitening')"
        ) from err


def default_fit_batch_size(event_size: int) -> int:
    """The short fit's batch: 8 per 10 dimensions, at most 256.

    The reverse-KL gradient's variance grows with the dimension, so the batch
    does too; the refits on the draws then decide the flow's quality (a short
    fit's seed spread is the refits', not the start's), so a cheap start wins
    over the whole run. Seeds 1-12 on eight schools (1-8 at batch 32), whole-run
    ESS per gradient median 0.037 at batch 8, 0.035 at 16, 0.023 at 32; 10-D
    funnel, seeds 1-4: 0.044-0.056 at 8, 0.017-0.031 at 32, one R-hat 1.021 at
    16; 100-D funnel, seeds 1-4: median 0.0045 at 80, 0.0023 at 160, 0.0025 at
    256, with R-hat at or above 1.01 in 2, 2 and 3 of them. At 3 per 10
    dimensions (1000 x 32 on the 100-D funnel) the neck went unexplored: 87
    divergences, R-hat 1.025.
    """
    return int(min(256, 8 * math.ceil(event_size / 10)))


def default_tail_scale(event_size: int) -> float:
    """``min(2, 1 + 3 / sqrt(d))``: where the refits' tail points ``f(s u)`` are drawn.

    ``s u`` lies about 3 units beyond the typical radius ``sqrt(d)`` of ``N(0, I)``
    in every dimension; a fixed ``s`` reaches ever further out as ``d`` grows.
    Single runs (seed 1): ``s = 2`` rather than 1.5 took the banana from 37
    divergences to 2 and 0.21 to 0.42 ESS per gradient, and eight schools with
    seed 4 from 82 to 4; on the 100-D funnel ``s = 2`` gave 102 divergences and
    R-hat 1.12, ``s = 1.3`` 22 and 1.005.
    """
    return float(min(2.0, 1.0 + 3.0 / math.sqrt(event_size)))


def _check_fast_inverse(flow: Any) -> None:
    config = getattr(flow, "flow_config", None)
    name = config.get("name") if isinstance(config, dict) else None
    if name not in FAST_INVERSE_FLOWS:
        raise ValueError(
            f"adapting a flow on the draws needs its inverse at every training step; flow "
            f"{name or type(flow).__name__!r} has none that is fast. Use one of {FAST_INVERSE_FLOWS} "
            "(make_flow('realnvp', d)), or sample with it without adaptation"
        )


@dataclass
class _Buffers:
    """Fixed-size training and held-out data, so that every refit reuses one compiled function."""

    x: tf.Variable
    g: tf.Variable
    num_train: tf.Variable
    val_x: tf.Variable
    val_g: tf.Variable
    val_mask: tf.Variable


class _FlowTrainer:
    """Refits a flow on ``(x, grad log p(x))`` by the configured loss, with a held-out check."""

    check_every = 50

    def __init__(self, target: Any, flow: tfb.Bijector, config: FlowAdaptation, frozen: Any = (),
                 jit_compile: bool = True):
        self.target, self.flow, self.config = target, flow, config
        d, dtype = int(target.event_size), target.dtype
        self.d, self.dtype = d, dtype
        skip = {id(v) for v in frozen}
        self.variables = [v for v in flow.trainable_variables if id(v) not in skip]
        cap = config.max_points
        val_cap = math.ceil(cap * config.validation_fraction)
        self.buffers = _Buffers(
            x=tf.Variable(tf.zeros([cap, d], dtype), trainable=False),
            g=tf.Variable(tf.zeros([cap, d], dtype), trainable=False),
            num_train=tf.Variable(1, dtype=tf.int32, trainable=False),
            val_x=tf.Variable(tf.zeros([val_cap, d], dtype), trainable=False),
            val_g=tf.Variable(tf.zeros([val_cap, d], dtype), trainable=False),
            val_mask=tf.Variable(tf.zeros([val_cap], tf.bool), trainable=False),
        )
        rate = config.learning_rate
        self.optimizer, _ = make_optimizer(None, config.train_steps, rate, None)
        self.optimizer.build(self.variables)
        self.base = tfp.distributions.MultivariateNormalDiag(tf.zeros([d], dtype), tf.ones([d], dtype))
        self._train = tf.function(self._train_chunk, jit_compile=jit_compile, autograph=False)
        # Graph mode for the functions a run calls a few dozen times: XLA took 1.5-2 s
        # to compile each (garch11, 4-D), against under 1 s to trace, and their
        # calls cost milliseconds either way.
        self._held_out_loss = tf.function(self._masked_loss, autograph=False)
        self._grad = tf.function(self._target_gradient, autograph=False)
        self._grad_from_latent = tf.function(self._target_gradient_from_latent, autograph=False)

    # -- the losses, per point -------------------------------------------------

    def point_loss(self, x: tf.Tensor, g: tf.Tensor) -> tf.Tensor:
        """``[n, d], [n, d] -> [n]``: the configured loss at each point."""
        if self.config.objective == "forward_kl":
            u = self.flow.inverse(x)
            return -(self.base.log_prob(u) + self.flow.inverse_log_det_jacobian(x, event_ndims=1))
        # tf.identity: a new tensor, so the bijector cache cannot hand back x for f(u).
        u = tf.identity(self.flow.inverse(x))
        with tf.GradientTape() as tape:
            tape.watch(u)
            # The points are independent, so the gradient of the sum is each point's score.
            pulled_back = tf.reduce_sum(g * self.flow.forward(u)) + tf.reduce_sum(
                self.flow.forward_log_det_jacobian(u, event_ndims=1))
        score = tape.gradient(pulled_back, u)
        # log1p keeps a few points in a funnel's neck (losses of 1e6) from drowning the
        # rest, and is still zero exactly where the pulled-back target is N(0, I).
        return tf.math.log1p(tf.reduce_sum(tf.square(score + u), axis=-1))

    def _masked_loss(self) -> tf.Tensor:
        b = self.buffers
        loss = self.point_loss(b.val_x, b.val_g)
        total = tf.reduce_sum(tf.where(b.val_mask, loss, tf.zeros_like(loss)))
        return total / tf.reduce_sum(tf.cast(b.val_mask, loss.dtype))

    def _train_chunk(self, seed: tf.Tensor, num_steps: tf.Tensor) -> tf.Tensor:
        b = self.buffers

        def body(i, seed, skipped):
            step_seed, seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
            pick = tf.random.stateless_uniform([self.config.batch_size], step_seed, minval=0,
                                               maxval=b.num_train, dtype=tf.int32)
            xb, gb = tf.gather(b.x, pick), tf.gather(b.g, pick)
            _, finite, _ = guarded_step(self.optimizer, self.variables,
                                         lambda: (tf.reduce_mean(self.point_loss(xb, gb)), ()))
            return i + 1, seed, skipped + tf.cast(~finite, tf.int32)

        _, _, skipped = tf.while_loop(lambda i, *_: i < num_steps, body,
                                      (tf.constant(0), seed, tf.constant(0)))
        return skipped

    def _target_gradient(self, x: tf.Tensor) -> tf.Tensor:
        with tf.GradientTape() as tape:
            tape.watch(x)
            lp = self.target.unnormalized_log_prob(x)
        return tape.gradient(lp, x)

    def _target_gradient_from_latent(self, u: tf.Tensor, latent_grad: tf.Tensor) -> tf.Tensor:
        # latent_grad = J(u)^T g + grad_u log|det J(u)| with g = grad log p(f(u)), so
        # g = J(u)^{-T} (latent_grad - grad_u log|det J(u)|): the vector-Jacobian
        # product of f^{-1} at x = f(u), since J_{f^{-1}}(x) = J(u)^{-1}.
        with tf.GradientTape() as tape:
            tape.watch(u)
            x = self.flow.forward(u)
            log_det = tf.reduce_sum(self.flow.forward_log_det_jacobian(u, event_ndims=1))
        # An affine flow's log-det does not depend on u.
        a = latent_grad - tape.gradient(log_det, u, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        # A new tensor, so the bijector cache cannot hand back u for f^{-1}(x).
        x = tf.identity(x)
        with tf.GradientTape() as tape:
            tape.watch(x)
            pulled = tf.reduce_sum(a * self.flow.inverse(x))
        return tape.gradient(pulled, x)

    # -- one refit ------------------------------------------------------------------

    def gradients(self, x: np.ndarray) -> np.ndarray:
        """``grad log p`` at ``x`` ``[n, d]`` (``n`` target evaluations)."""
        return self._blocks(self._grad, x)

    def gradients_from_latent(self, u: np.ndarray, latent_grad: np.ndarray) -> np.ndarray:
        """``grad log p`` at ``x = f(u)`` from the pulled-back density's gradient at ``u``
        (no target evaluation)."""
        return self._blocks(self._grad_from_latent, u, latent_grad)

    def _blocks(self, fn: Any, *arrays: np.ndarray) -> np.ndarray:
        """``fn`` over rows of ``arrays``, in padded blocks of one compiled shape."""
        out = []
        for lo in range(0, len(arrays[0]), _GRADIENT_BLOCK):
            blocks = [a[lo:lo + _GRADIENT_BLOCK] for a in arrays]
            padded = [tf.constant(np.concatenate([b, np.repeat(b[-1:], _GRADIENT_BLOCK - len(b), 0)]),
                                  self.dtype) for b in blocks]
            out.append(fn(*padded).numpy()[: len(blocks[0])])
        return np.concatenate(out) if out else np.zeros([0, self.d])

    def _load(self, x: np.ndarray, g: np.ndarray, groups: np.ndarray, seed: tf.Tensor) -> tuple[int, int]:
        """A seeded split of whole groups into the training and held-out buffers (zero-padded)."""
        n = len(x)
        b = self.buffers
        n_val = min(max(1, int(round(self.config.validation_fraction * n))), int(b.val_mask.shape[0]))
        names, sizes = np.unique(groups, return_counts=True)
        shuffled = np.argsort(tf.random.stateless_uniform([len(names)], seed, dtype=tf.float64).numpy(),
                              kind="stable")
        # Whole groups until the held-out share is reached (never all of them).
        taken = shuffled[: max(1, min(len(names) - 1, int(np.searchsorted(np.cumsum(sizes[shuffled]), n_val))))]
        held = np.isin(groups, names[taken])
        val, train = np.flatnonzero(held)[: int(b.val_mask.shape[0])], np.flatnonzero(~held)
        n_val = len(val)

        def padded(a, size):
            return tf.constant(np.concatenate([a, np.zeros([size - len(a), self.d])]), self.dtype)

        b.x.assign(padded(x[train], int(b.x.shape[0])))
        b.g.assign(padded(g[train], int(b.x.shape[0])))
        b.num_train.assign(len(train))
        b.val_x.assign(padded(x[val], int(b.val_x.shape[0])))
        b.val_g.assign(padded(g[val], int(b.val_x.shape[0])))
        b.val_mask.assign(np.arange(int(b.val_x.shape[0])) < n_val)
        return len(train), n_val

    def refit(self, step: int, x: np.ndarray, g: np.ndarray, seed: tf.Tensor, *,
              from_moments: bool, groups: np.ndarray | None = None) -> tuple[Refit, list[tf.Tensor]]:
        """Trains from the current weights; keeps the result only if the held-out loss drops.

        Returns the refit's record and the weights before it (to restore).
        """
        previous = snapshot(self.variables)
        finite = np.all(np.isfinite(x), axis=1) & np.all(np.isfinite(g), axis=1)
        groups = np.arange(len(x)) if groups is None else np.asarray(groups)
        x, g, groups = x[finite], g[finite], groups[finite]
        if len(x) < 20:
            return Refit(step, len(x), 0, math.nan, math.nan, False,
                         f"only {len(x)} finite points with finite gradients: refit skipped"), previous
        load_seed, train_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
        num_train, num_val = self._load(x, g, groups, load_seed)
        before = float(self._held_out_loss())
        if from_moments:
            _whiten_from_draws(self.flow, x)
        best, best_weights = self._train_with_checks(train_seed)
        record = Refit(step, num_train, num_val, before, best, False)
        if not math.isfinite(best):
            record.note = "the refit's held-out loss is not finite (NaN): kept the previous flow"
        elif math.isfinite(before) and best >= before:
            record.note = "no better than the current flow on the held-out draws: kept the previous flow"
        else:
            record.accepted = True
            restore(self.variables, best_weights)
            return record, previous
        restore(self.variables, previous)
        return record, previous

    def _train_with_checks(self, seed: tf.Tensor) -> tuple[float, list[tf.Tensor]]:
        """Adam from a fresh optimiser state; the weights of the best held-out check."""
        for v in self.optimizer.variables:
            v.assign(tf.zeros_like(v))
        best, best_weights = float(self._held_out_loss()), snapshot(self.variables)
        if not math.isfinite(best):
            best = math.inf
        # No early stop: a fresh Adam state's first steps often make a fitted flow
        # worse on the held-out points before they make it better.
        for i in range(0, self.config.train_steps, self.check_every):
            count = min(self.check_every, self.config.train_steps - i)
            self._train(tf.random.experimental.stateless_fold_in(seed, i), tf.constant(count))
            loss = float(self._held_out_loss())
            if not all_finite(self.variables):
                break
            if math.isfinite(loss) and loss < best:
                best, best_weights = loss, snapshot(self.variables)
        return (best if math.isfinite(best) else math.nan), best_weights

    def restore(self, weights: list[tf.Tensor]) -> None:
        restore(self.variables, weights)


def _whiten_from_draws(flow: Any, x: np.ndarray) -> None:
    """Starts the flow's whitening layer at the draws' mean and (regularised) covariance."""
    layer = whitening_layer(flow)
    if layer is None:
        return
    n, d = x.shape
    x = np.asarray(x, np.float64)
    full = hasattr(layer, "tril_params")
    # Stan's regularisation of a windowed mass-matrix estimate, towards 1e-3 I.
    if full:
        tril = np.linalg.cholesky(stan_regularised(np.cov(x, rowvar=False).reshape(d, d), n))
    else:
        tril = np.diag(np.sqrt(stan_regularised(x.var(axis=0), n)))
    set_whitening(layer, GaussianFit(loc=x.mean(axis=0), scale_tril=tril, method="draws", elbo=math.nan,
                                     elbo_se=math.nan, map_found=False, num_grad_evals=0))
