"""Tolerances for float32 results, derived in one place from float32 rounding.

Every numerical comparison in the suite checks what t5dual computes in float32 against an
independent reference. Wherever the reference can run in float64 (NumPy float64, a torch model in
`.double()`) it does, so that the only error left is the float32 rounding of the side under test
(Hugging Face's T5LayerNorm still takes its variance in float32 under `.double()`: a few u per
norm, well inside the bound). That error is bounded here from the computation (the size of its
values, how many stages deep, how long its sums) and not from what one machine produced: machines differ in the order in which
they add (threads, SIMD width, fused multiply-adds), and the bound holds for every order.

The rule. A float32 operation rounds with relative error at most u = eps / 2, eps = 2**-23 =
1.19e-7. A reduction of n terms (a dot product, a sum, a mean, a softmax denominator) accumulates
n such errors. They add up to n * u in the worst case, but they are independent with mean zero,
and Higham & Mary ("A new approach to probabilistic rounding error analysis", SIAM J. Sci. Comput.
41(5), 2019) show that the error of the sum stays below LAMBDA * sqrt(n) * u times the size of
its terms except with a probability of order n * exp(-LAMBDA**2 / 2).
A network chains such reductions through `depth` stages; their errors are added linearly (not in
quadrature), which also covers the modest amplification from one stage to the next of a
well-conditioned network (activations normalised, weights of variance 1/fan-in, as T5 initialises
them and as tests/helpers/tree_utils.random_params draws them). So a float32 result of size
`magnitude` is within

    LAMBDA * u * magnitude * depth * sqrt(width)  =  4 * eps * magnitude * depth * sqrt(width)

of the exact value, `width` being the longest reduction on the way. For orientation: hidden
states (size <= 6) of a 2-layer encoder (4 stages) attending over 30 tokens, 6.3e-5; its unit
embeddings after one more stage, 1.3e-5; a contrastive loss built from logits up to 1 / 0.01 =
100 through 10 stages 128 wide, compared between two float32 runs, 1.1e-2 (1e-4 of the logits).

The arguments, stated at each call site:
  magnitude: the size of the values compared, a bound from the computation where there is one
    (unit vectors: 1; the output of an RMS norm with scales <= s over d features: s * sqrt(d),
    since no entry exceeds sqrt(d) times the RMS of its vector; logits of unit vectors at
    temperature t: 1 / t), else the largest |value| of the float64 reference.
  depth: the number of stages: a pre-norm residual block (a T5 encoder layer has two, attention
    and MLP), the pooling and projection head, a loss, a training step, a chained operation.
  width: the longest reduction among them: the model width, the MLP width, the number of tokens
    attended over, the number of terms summed.
  both_sides: the reference is float32 too (two float32 programs compared, e.g. two partitionings
    of one computation): both err, so the tolerance doubles.
  dtype: the precision of the computation (float64 for comparisons of two float64 computations;
    bfloat16 for bfloat16 activations).

Results that are exact by construction (copies, round trips, integer counts, values with an exact
binary representation) are compared for equality, not with a tolerance.
"""

import math

import ml_dtypes
import numpy as np

# In units of u: a reduction of n terms exceeds its bound with probability ~ n * exp(-32).
LAMBDA = 8.0


def tolerance(magnitude: float, depth: int = 1, width: int = 1, *, dtype=np.float32,
              both_sides: bool = False) -> float:
  """The absolute error bound of the module docstring for results of size `magnitude`."""
  unit_roundoff = float(ml_dtypes.finfo(dtype).eps) / 2
  bound = LAMBDA * unit_roundoff * float(magnitude) * depth * math.sqrt(width)
  return 2 * bound if both_sides else bound


def rounding(magnitude: float, dtype) -> float:
  """The error of rounding values of size `magnitude` once to `dtype` (e.g. float16 storage)."""
  return float(ml_dtypes.finfo(dtype).eps) / 2 * float(magnitude)


def assert_close(actual, reference, *, magnitude: float, depth: int = 1, width: int = 1,
                 dtype=np.float32, both_sides: bool = False, err_msg: str = '') -> None:
  """Asserts |actual - reference| <= tolerance(magnitude, depth, width, ...) elementwise.

  Args:
    actual: the float32 (or `dtype`) result under test, any shape.
    reference: the same shape, ideally computed in float64.
    magnitude, depth, width, dtype, both_sides: see the module docstring.
    err_msg: prefixed to the failure message.
  """
  atol = tolerance(magnitude, depth, width, dtype=dtype, both_sides=both_sides)
  actual = np.asarray(actual, np.float64)
  reference = np.asarray(reference, np.float64)
  np.testing.assert_allclose(
      actual, reference, rtol=0, atol=atol,
      err_msg=f'{err_msg} ({np.dtype(dtype).name} bound for size {magnitude:.3g}, depth {depth}, '
              f'width {width}{", both sides" if both_sides else ""})'.strip())
