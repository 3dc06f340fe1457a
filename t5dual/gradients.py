"""How a train step gets its gradients: the whole batch at once, GradCache, or accumulation.

Each strategy is a pure function of the model that returns

    loss_and_grad(params, batch, dropout_rng) -> ((loss, metrics), grads)

with the signature of `jax.value_and_grad(model.loss_fn, has_aux=True)`; the
trainer's one step builder (trainer.build_train_step) takes the strategy
named by `trainer.TrainerConfig.grad_strategy`:

  full        the gradient of the whole batch's loss in one pass: activations
              of the whole batch are held for the backward pass.
  grad_cache  GradCache (Gao et al. 2021) for `model_api.ContrastiveModel`s:
              (1) embed the batch in `num_microbatches` chunks without
              gradients; (2) the in-batch loss of all the embeddings and its
              gradient g with respect to them (the loss sees the whole batch:
              every in-batch negative, SamToNe block and duplicate mask);
              (3) run each chunk again and back-propagate its rows of g
              (a vjp), summing the parameter gradients. By the chain rule the
              sum is the full-batch gradient, while only one chunk's
              activations are alive at a time; the price is one more forward
              pass per step.
  accumulate  microbatch gradient accumulation for models whose loss is a mean
              over independent examples (rerankers: lists): the mean of the
              microbatches' losses, metrics and gradients. That is the
              full-batch value when every microbatch's mean runs over equally
              many terms: the listwise losses (one term per list; data/lists.py
              never yields an empty list), and the pointwise / pairwise ones on
              lists without padding. A contrastive loss is not such a mean (its
              negatives are the batch), so it takes grad_cache instead.

Microbatch k holds the rows k, k + M, k + 2M, ... of the batch (M =
num_microbatches), not a contiguous block: the batch is split over the
'data' mesh axis in contiguous blocks, so strided microbatches keep every
data-parallel device busy with B / (M * data_parallel) rows of each one
(contiguous ones would leave a microbatch on M-th of the devices and move it).

Dropout: microbatch k draws from `jax.random.split(dropout_rng, M)[k]`, in both
of GradCache's passes, so the second pass rebuilds exactly the activations of
the first and the gradient is exactly that of the loss of the embeddings the
first pass computed. (Against 'full', the masks differ as any two draws do.)

The microbatches are a `jax.lax.scan`, not a Python loop: the model is traced
and compiled once per pass whatever M is, so compile time and program size do
not grow with M (an unrolled loop would repeat the whole encoder M times, which
for XXL is what makes ahead-of-time compiles run out of host memory), and XLA
cannot hoist one microbatch's work into another's and keep both alive.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from t5dual import model_api

Array = jax.Array
LossAndGrad = Callable[[Any, dict, Optional[Array]], tuple[tuple[Array, dict], Any]]

STRATEGIES = ('full', 'grad_cache', 'accumulate')


def _batch_constraint(x: Array, leading: tuple) -> Array:
  """`x` split over the logical 'batch' axis after `leading` axes (no-op without a mesh)."""
  return nn.with_logical_constraint(x, leading + ('batch',) + (None,) * (x.ndim - len(leading) - 1))


def split_microbatches(tree: Any, num_microbatches: int) -> Any:
  """Leaves [B, ...] -> [M, B / M, ...]; microbatch k holds rows k, k + M, k + 2M, ..."""
  def split(x):
    x = x.reshape(x.shape[0] // num_microbatches, num_microbatches, *x.shape[1:])
    return _batch_constraint(jnp.swapaxes(x, 0, 1), (None,))
  return jax.tree.map(split, tree)


def merge_microbatches(tree: Any) -> Any:
  """The inverse of `split_microbatches`: leaves [M, B / M, ...] -> [B, ...]."""
  def merge(x):
    x = jnp.swapaxes(x, 0, 1)
    return _batch_constraint(x.reshape(x.shape[0] * x.shape[1], *x.shape[2:]), ())
  return jax.tree.map(merge, tree)


def _microbatch_rngs(dropout_rng: Optional[Array], num_microbatches: int) -> Optional[Array]:
  return None if dropout_rng is None else jax.random.split(dropout_rng, num_microbatches)


def _like_params(model: model_api.Model) -> Callable[[Any], Any]:
  """Constrains a gradient pytree to the parameters' logical axes (their shardings)."""
  axes = model.logical_axes()
  return lambda grads: jax.tree.map(nn.with_logical_constraint, grads, axes,
                                    is_leaf=lambda x: isinstance(x, P))


def full_batch(model: model_api.Model) -> LossAndGrad:
  """The gradient of the whole batch's `model.loss_fn`."""
  return jax.value_and_grad(model.loss_fn, has_aux=True)


def grad_cache(model: model_api.ContrastiveModel, num_microbatches: int) -> LossAndGrad:
  """GradCache over `num_microbatches` chunks (see the module docstring)."""
  like_params = _like_params(model)

  def loss_and_grad(params, batch, dropout_rng):
    chunks = split_microbatches(batch, num_microbatches)
    rngs = _microbatch_rngs(dropout_rng, num_microbatches)

    def embed_chunk(_, chunk_and_rng):
      chunk, rng = chunk_and_rng
      return None, model.embed(params, chunk, rng)

    # Pass 1, outside any differentiation: no activation is kept for a backward pass.
    _, chunk_embeddings = jax.lax.scan(embed_chunk, None, (chunks, rngs))
    (loss, metrics), embedding_grads = jax.value_and_grad(
        model.loss_from_embeddings, has_aux=True)(merge_microbatches(chunk_embeddings), batch)

    def backprop_chunk(grads, chunk_rng_cotangent):
      chunk, rng, cotangent = chunk_rng_cotangent
      _, vjp = jax.vjp(lambda p: model.embed(p, chunk, rng), params)
      return like_params(jax.tree.map(jnp.add, grads, vjp(cotangent)[0])), None

    # Pass 2: each chunk again, with its rows of the cached embedding gradients.
    zeros = like_params(jax.tree.map(jnp.zeros_like, params))
    grads, _ = jax.lax.scan(backprop_chunk, zeros,
                            (chunks, rngs, split_microbatches(embedding_grads,
                                                              num_microbatches)))
    return (loss, metrics), grads

  return loss_and_grad


def accumulate(model: model_api.Model, num_microbatches: int) -> LossAndGrad:
  """The mean of `num_microbatches` microbatches' losses, metrics and gradients."""
  like_params = _like_params(model)
  value_and_grad = jax.value_and_grad(model.loss_fn, has_aux=True)

  def loss_and_grad(params, batch, dropout_rng):
    def microbatch(grads, chunk_and_rng):
      chunk, rng = chunk_and_rng
      (_, metrics), chunk_grads = value_and_grad(params, chunk, rng)
      return like_params(jax.tree.map(jnp.add, grads, chunk_grads)), metrics

    zeros = like_params(jax.tree.map(jnp.zeros_like, params))
    grads, metrics = jax.lax.scan(microbatch, zeros, (
        split_microbatches(batch, num_microbatches),
        _microbatch_rngs(dropout_rng, num_microbatches)))
    grads = jax.tree.map(lambda g: g / num_microbatches, grads)
    metrics = jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics)
    return (metrics['loss'], metrics), grads

  return loss_and_grad


def incompatibility(model: model_api.Model, strategy: str, num_microbatches: int,
                    batch_size: Optional[int] = None, data_parallel: int = 1) -> Optional[str]:
  """Why `strategy` cannot train `model` on this batch, or None when it can.

  Args:
    batch_size: the global batch size, when known; it must split into
      num_microbatches microbatches of equal size on every data-parallel device.
    data_parallel: the size of the 'data' mesh axis.
  """
  if strategy not in STRATEGIES:
    return f'must be one of {STRATEGIES}, got {strategy!r}'
  if strategy == 'full':
    if num_microbatches != 1:
      return (f"'full' takes the batch at once; num_microbatches {num_microbatches} needs "
              "'grad_cache' (contrastive models) or 'accumulate'")
    return None
  contrastive = isinstance(model, model_api.ContrastiveModel)
  if strategy == 'grad_cache' and not contrastive:
    return (f"'grad_cache' needs a model_api.ContrastiveModel (embed, loss_from_embeddings); "
            f"a {model.name} takes 'accumulate'")
  if strategy == 'accumulate' and contrastive:
    return (f"'accumulate' would shrink a {model.name}'s in-batch negatives to each "
            "microbatch and change its loss; 'grad_cache' gives the full-batch gradient")
  if batch_size is not None and batch_size % (num_microbatches * data_parallel):
    return (f'global batch size {batch_size} does not split into {num_microbatches} '
            f'microbatches on each of the {data_parallel} data-parallel devices (it must be a '
            f'multiple of {num_microbatches * data_parallel})')
  return None


def loss_and_grad_fn(model: model_api.Model, strategy: str = 'full',
                     num_microbatches: int = 1) -> LossAndGrad:
  """The `loss_and_grad` function of `strategy` (one of STRATEGIES).

  Raises:
    ValueError: `incompatibility` has a reason (batch size not checked here).
  """
  problem = incompatibility(model, strategy, num_microbatches)
  if problem:
    raise ValueError(f'grad_strategy {strategy!r}: {problem}')
  if strategy == 'full':
    return full_batch(model)
  if strategy == 'grad_cache':
    return grad_cache(model, num_microbatches)
  return accumulate(model, num_microbatches)
