"""Parameter trees as nested dicts, and their flat form {'a/b/c': leaf}.

T5X-named trees (checkpoints, Hugging Face models converted by `hf`, t5dual
params) all go through these; the '/'-joined paths are the parameter names that
conversion reports and errors print.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import numpy as np

from t5dual.interop.lazy_arrays import materialize


def flatten(tree: Mapping, prefix: str = '') -> dict[str, Any]:
  """{'a/b/c': leaf} of a nested dict."""
  out = {}
  for k, v in tree.items():
    path = f'{prefix}{k}'
    if isinstance(v, Mapping):
      out.update(flatten(v, path + '/'))
    else:
      out[path] = v
  return out


def unflatten(flat: Mapping[str, Any]) -> dict:
  out: dict = {}
  for path, v in flat.items():
    node = out
    *parents, last = path.split('/')
    for p in parents:
      node = node.setdefault(p, {})
    node[last] = v
  return out


def to_numpy(tree: Mapping, dtype: Optional[np.dtype] = None) -> dict:
  """Reads every LazyArray of a tree into host memory."""
  return unflatten({k: materialize(v, None, dtype) for k, v in flatten(tree).items()})
