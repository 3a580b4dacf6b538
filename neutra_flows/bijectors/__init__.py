"""Flow bijectors: real TFP bijectors with trainable, injected conditioner networks.

Every class here has ``forward_min_event_ndims == 1``, accepts any batch shape
``[..., d]``, works in float32 and float64, and drops into
`tfd.TransformedDistribution`, `tfb.Chain` and TFP's transition kernels.
`neutra_flows.make_flow` builds ready-made stacks of them (`Flow`).

* `IAF`, `MAF`: autoregressive flows (any transformer; affine by default).
* `Coupling`, `RealNVP`: coupling flows.
* `RationalQuadraticTransformer`: the rational-quadratic spline; a spline flow
  is a `Coupling` or `IAF` layer with it as the transformer
  (`NeuralSplineFlow` builds one).
* `AffineDiagonal`, `AffineLowerTriangular`, `Identity`: baselines;
  `AffineTransformer`: the elementwise affine map of MAF/IAF/RealNVP.
* `Transformer`: base class of the elementwise maps that flow layers condition.
* `Flow`: the stack that `make_flow` returns.
* `NAF`, `BlockNeuralAutoregressive`, `HouseholderSylvester`, `LULinear`,
  `InvertibleResidual`: the further families of docs/more_flows.md.
* `IterativeInverse`: base class of the layers without a closed-form inverse
  (NAF, BNAF, Sylvester, residual); their inverses raise `ConvergenceError`
  (a `ValueError`) when they do not converge.
"""

from neutra_flows.bijectors._core import Transformer
from neutra_flows.bijectors._flow import Flow
from neutra_flows.bijectors._iterative import IterativeInverse
from neutra_flows.bijectors._root_finding import ConvergenceError
from neutra_flows.bijectors.affine import (
    AffineDiagonal,
    AffineLowerTriangular,
    AffineTransformer,
    Identity,
)
from neutra_flows.bijectors.autoregressive import IAF, MAF
from neutra_flows.bijectors.bnaf import BlockNeuralAutoregressive
from neutra_flows.bijectors.coupling import Coupling, RealNVP
from neutra_flows.bijectors.linear import LULinear
from neutra_flows.bijectors.naf import NAF
from neutra_flows.bijectors.residual import InvertibleResidual
from neutra_flows.bijectors.spline import NeuralSplineFlow, RationalQuadraticTransformer
from neutra_flows.bijectors.sylvester import HouseholderSylvester

__all__ = [
    "IAF",
    "NAF",
    "BlockNeuralAutoregressive",
    "ConvergenceError",
    "HouseholderSylvester",
    "InvertibleResidual",
    "IterativeInverse",
    "LULinear",
    "MAF",
    "AffineDiagonal",
    "AffineLowerTriangular",
    "AffineTransformer",
    "Coupling",
    "Flow",
    "Identity",
    "NeuralSplineFlow",
    "RationalQuadraticTransformer",
    "RealNVP",
    "Transformer",
]
