"""The badly scaled 3-D Gaussian of the reliability probe, with the README's defaults.

An uncentred regression's posterior in miniature: sds 30, 0.0075 and 0.1, with
correlation -0.99 between the first two. Prints the fit's summary and NeuTra's
comparison row against the exact truth. ``python benchmarks/badly_scaled_gaussian.py``
"""

import numpy as np
import tensorflow as tf

import neutra_flows as nf

sd = np.array([30, 0.0075, 0.1])
corr = np.eye(3)
corr[0, 1] = corr[1, 0] = -0.99
cov = corr * np.outer(sd, sd)
mean = np.array([10.0, 0.5, -1.0])
target = nf.models.GaussianTarget(mean, np.linalg.cholesky(cov), name="badly_scaled", dtype=tf.float32)
flow = nf.make_flow("iaf", 3)
result = nf.fit(target, flow, num_steps=2000, batch_size=256, seed=0, progress=False)
print(result.summary())
idata = nf.sample(target, result, kernel="hmc", seed=1, progress=False)
print(nf.compare({"NeuTra-IAF-HMC": idata}).T)
