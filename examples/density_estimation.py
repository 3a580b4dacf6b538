"""Density estimation: fit normalizing flows to two-moons data by maximum likelihood.

``nf.fit_to_data`` trains a flow ``f`` so that ``q = f_# N(0, I)`` maximises the
likelihood of samples, with minibatches, a held-out split and early stopping.
The log-likelihood of a point needs the flow's *inverse*,

    log q(x) = log N(f^{-1}(x); 0, I) + log|det d f^{-1} / dx (x)|,

so the flows that invert in one pass are the ones to use here: MAF, RealNVP
and the neural spline flow (NSF, spline coupling). IAF would need ``d``
sequential network passes per point.

The script draws two-moons data (a training set and a separate test set),
fits each flow, and reports the mean log-likelihood per point on the training
data, on ``fit_to_data``'s held-out split and on the test set, against a
Gaussian fitted by maximum likelihood. It saves density contours of each fit
over the data and draws from each flow.

What to expect (default settings, measured): mean test log-likelihoods per
point of about -0.89 (NSF), -0.92 (MAF, 5 layers), -0.97 (RealNVP, 8 layers),
against -1.90 for the Gaussian: about one nat per point better.

Run it from the repository root::

    python examples/density_estimation.py                    # about a minute per flow on 2 cores
    python examples/density_estimation.py --fast             # tiny settings: a smoke test
    python examples/density_estimation.py --flows maf nsf --out my_dir
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import matplotlib  # noqa: E402

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import neutra_flows as nf  # noqa: E402

FLOWS = ("maf", "nsf", "realnvp")
# Affine layers bend the plane little each, so MAF and RealNVP get more of them
# than their defaults (3 and 4); the spline flow is flexible enough with its 4.
LAYERS = {"maf": dict(num_layers=5), "nsf": {}, "realnvp": dict(num_layers=8)}


def two_moons(n: int, *, noise: float = 0.08, seed: int = 0) -> np.ndarray:
    """``[n, 2]`` points on two interleaved half circles with Gaussian noise."""
    rng = np.random.default_rng(seed)
    angle = rng.uniform(0.0, np.pi, n)
    upper = rng.integers(0, 2, n).astype(bool)
    x = np.where(upper, np.cos(angle), 1.0 - np.cos(angle))
    y = np.where(upper, np.sin(angle), 0.5 - np.sin(angle))
    points = np.stack([x, y], axis=-1) + noise * rng.standard_normal([n, 2])
    return points.astype(np.float32)


def gaussian_log_likelihood(train: np.ndarray, data: np.ndarray) -> float:
    """Mean log-density of ``data`` under the maximum-likelihood Gaussian of ``train``."""
    mean = train.mean(axis=0)
    cov = np.cov(train, rowvar=False, bias=True)
    diff = data - mean
    _, logdet = np.linalg.slogdet(cov)
    maha = np.einsum("ni,ij,nj->n", diff, np.linalg.inv(cov), diff)
    return float(np.mean(-0.5 * (maha + logdet + data.shape[1] * np.log(2 * np.pi))))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="examples_out", help="folder for the pictures")
    parser.add_argument("--fast", action="store_true",
                        help="tiny settings and no XLA compilation (a smoke test)")
    parser.add_argument("--flows", nargs="+", choices=FLOWS, default=list(FLOWS))
    parser.add_argument("--num-train", type=int, default=4000)
    parser.add_argument("--num-test", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.fast:
        args.num_train, args.num_test, args.epochs, args.batch_size = 500, 200, 3, 64
        if args.flows == list(FLOWS):
            args.flows = ["maf"]
    return args


def main() -> None:
    args = parse_args()
    os.makedirs(args.out, exist_ok=True)
    train = two_moons(args.num_train, seed=args.seed)
    test = two_moons(args.num_test, seed=args.seed + 1)
    print(f"two moons: {len(train)} training points (10 % of them held out for early stopping), "
          f"{len(test)} test points")

    rows = {"gaussian": (gaussian_log_likelihood(train, train), float("nan"),
                         gaussian_log_likelihood(train, test))}
    fits = {}
    for name in args.flows:
        options = dict(num_layers=2, hidden_units=[8, 8]) if args.fast else LAYERS[name]
        flow = nf.make_flow(name, 2, **options)
        result = nf.fit_to_data(flow, train, num_epochs=args.epochs, batch_size=args.batch_size,
                                learning_rate=args.learning_rate, patience=40, seed=args.seed,
                                progress=not args.fast, jit_compile=not args.fast)
        print(f"\n[{name}]")
        print(result.summary())
        test_ll = float(np.mean(result.distribution.log_prob(test)))
        rows[name] = (float(result.train_log_likelihood[result.best_epoch]),
                      result.best_validation_log_likelihood, test_ll)
        fits[name] = result

    print("\nmean log-likelihood per point (higher is better):")
    print(f"  {'model':10s} {'train':>9s} {'held-out':>9s} {'test':>9s}")
    for name, (tr, va, te) in rows.items():
        print(f"  {name:10s} {tr:9.4f} {va:9.4f} {te:9.4f}")
    best = max(fits, key=lambda k: rows[k][2])
    print(f"best flow on the test set: {best}, {rows[best][2] - rows['gaussian'][2]:+.3f} nats per "
          "point over the Gaussian")

    # --- pictures: density contours over the data, and draws from each flow ----------------------
    xs, ys = np.meshgrid(np.linspace(-1.5, 2.5, 120), np.linspace(-1.0, 1.5, 100))
    grid = np.stack([xs.ravel(), ys.ravel()], axis=-1).astype(np.float32)
    panels = ["gaussian", *fits]
    fig, axes = plt.subplots(2, len(panels), figsize=(4 * len(panels), 6.4), squeeze=False)
    mean, cov = train.mean(axis=0), np.cov(train, rowvar=False, bias=True)
    rng = np.random.default_rng(args.seed)
    for k, name in enumerate(panels):
        if name == "gaussian":
            diff = grid - mean
            maha = np.einsum("ni,ij,nj->n", diff, np.linalg.inv(cov), diff)
            density = np.exp(-0.5 * maha) / (2 * np.pi * np.sqrt(np.linalg.det(cov)))
            draws = rng.multivariate_normal(mean, cov, size=1000)
        else:
            density = np.exp(np.asarray(fits[name].distribution.log_prob(grid)))
            draws = np.asarray(fits[name].distribution.sample(1000, seed=[args.seed, k]))
        top, bottom = axes[0, k], axes[1, k]
        top.scatter(test[:, 0], test[:, 1], s=1, c="0.6")
        top.contour(xs, ys, density.reshape(xs.shape), levels=8, linewidths=0.9)
        top.set_title(f"{name}: test log-lik {rows[name][2]:.3f}")
        bottom.scatter(draws[:, 0], draws[:, 1], s=2, alpha=0.5, c=f"C{k}")
        bottom.set_xlim(-1.5, 2.5)
        bottom.set_ylim(-1.0, 1.5)
        bottom.set_title(f"{name}: 1000 draws")
    fig.tight_layout()
    path = os.path.join(args.out, "two_moons_density.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
