"""Float32 tolerances shared by tests (no torch needed)."""

import numpy as np


def float32_tolerance(ref):
  """Allowed float32 error of values `ref`: 25 float32 ulps of their largest magnitude.

  Five residual blocks and a head, each a few float32 roundings of sums of up to
  40 terms: t5dual and HF's own float32 run both land 4 to 9 ulps of max|logit|
  from the float64 reference. Two float32 runs of the same maths in another
  order (rematerialised, scanned) differ by no more than that.
  """
  return 25 * np.finfo(np.float32).eps * np.abs(ref).max()
