"""Checkpoint interop: Hugging Face / sentence-transformers and T5X formats.

  t5x                    T5X checkpoints read (msgpack or orbax) and written
  hf                     Hugging Face T5 state dicts and folders
  sentence_transformers  GTR / sentence-T5 folders
  mapping                T5X-named trees into t5dual models, t5dual towers out
  dual_encoders, rerankers  each model family's formats, behind the same functions
                         (`family`)
  trees, lazy_arrays     nested parameter dicts; checkpoint arrays read on demand
  storage, msgpack_io    local / gs:// files; flax's msgpack encoding
"""

from __future__ import annotations

import importlib
import logging
import os


def load_initial_params(path: str, model, shardings=None):
  """Params for `model` from a T5X, Hugging Face, sentence-transformers or t5dual checkpoint.

  What the checkpoint lacks (e.g. the projection of a pretrained T5, the decoder
  of a reranker started from a t5dual dual encoder) is freshly initialised; the
  conversion report is logged parameter by parameter.

  Args:
    shardings: where the params go, a tree of jax.sharding.Sharding like them
      (trainer.StateLayout.param_shardings, Partitioner.param_shardings). The
      params then come back as jax.Arrays already in it, and no device ever
      holds more of a parameter than its shard: T5X TensorStore arrays,
      safetensors files (Hugging Face, sentence-transformers) and t5dual (orbax)
      checkpoints are read slice by slice, each device reading its own; fresh
      parameters are created sharded; layers of a scanned model are read into
      their slice of the stack. A t5dual checkpoint of another kind or layout is
      read in its own layout on the same mesh (the standard logical axis rules and
      the source model's own)
      and grafted. Without, host numpy arrays (a t5dual checkpoint: on this
      process's devices).
  Raises:
    mapping.MappingError: parameters of another shape (one line each, in
      `.problems`), or that have no place in the model.
  """
  from t5dual import checkpoints
  if os.path.exists(os.path.join(path, checkpoints.MODEL_JSON)):
    return _from_t5dual_dir(path, model, shardings)
  return _scanned_or_not(model, shardings, lambda m, sh: _load_initial(path, m, sh))


def family(model):
  """The interop module of `model`'s family (its `interop_module`, e.g.
  interop/dual_encoders.py): `load_initial` and `write_hf` for that family."""
  return importlib.import_module(model.interop_module)


def _scanned_or_not(model, shardings, load):
  """load(unrolled model, its shardings) for `model`, stacked into scanned layers if it scans.

  Checkpoints name layers layers_{i}: a scanned model is loaded into its unrolled
  twin, each layer into its slice of the stack's layout, then stacked on device.
  """
  import jax
  from t5dual import layer_layout
  unrolled = layer_layout.unscanned_model(model)
  if unrolled is model:
    return load(model, shardings)
  if shardings is None:
    return layer_layout.unrolled_to_scan(load(unrolled, None))
  shapes = jax.eval_shape(model.init_params, jax.random.PRNGKey(0))
  placed = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        shapes, shardings)
  layers = jax.tree.map(lambda x: x.sharding, layer_layout.scan_to_unrolled(placed))
  stack = jax.jit(layer_layout.unrolled_to_scan, out_shardings=shardings, donate_argnums=0)
  return stack(load(unrolled, layers))


def _from_t5dual_dir(path: str, model, shardings):
  """A t5dual model directory's params for `model`: restored as they are for the same
  kind and config, else restored in their own layout and grafted (mapping.graft)."""
  import jax
  from t5dual import checkpoints, layer_layout, partitioning
  from t5dual.interop import mapping
  desc = checkpoints.read_model_json(path)
  source = checkpoints.model_from_description(desc, os.path.join(path, checkpoints.MODEL_JSON))
  if type(source) is type(model) and source.describe()['config'] == model.describe()['config']:
    return checkpoints.restore_params(path, shardings=shardings)[1]
  source_shardings = None
  if shardings is not None:  # the source's own layout on the target's mesh
    mesh = jax.tree.leaves(shardings)[0].mesh
    source_shardings = partitioning.param_shardings(source.logical_axes(), mesh, source)
  params = checkpoints.restore_params(path, shardings=source_shardings)[1]
  params = layer_layout.scan_to_unrolled(params)  # a scanned source: T5X's names

  def load(unrolled, unrolled_shardings):
    grafted, report = mapping.graft(params, unrolled, shardings=unrolled_shardings)
    _log(path, report)
    return grafted
  return _scanned_or_not(model, shardings, load)


def _load_initial(path: str, model, shardings):
  """load_initial_params of a T5X / HF / ST checkpoint for an unrolled `model`."""
  params, report = family(model).load_initial(path, model, shardings)
  _log(path, report)
  return params


def _log(path: str, report) -> None:
  for line in report.lines():
    logging.info('initial checkpoint %s: %s', path, line)
