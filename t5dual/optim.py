"""Adafactor with T5X's settings, and the learning-rate schedule."""

from __future__ import annotations

import optax


def learning_rate_schedule(peak: float = 1e-3, total_steps: int = 10_000,
                           warmup_steps: int = 0, decay: str = 'linear') -> optax.Schedule:
  """Linear warm-up from 0 to `peak`, then linear decay to 0 at `total_steps` (or constant)."""
  if decay not in ('linear', 'constant'):
    raise ValueError(f"decay must be 'linear' or 'constant', got {decay!r}")
  after = (optax.constant_schedule(peak) if decay == 'constant' else
           optax.linear_schedule(peak, 0.0, max(1, total_steps - warmup_steps)))
  if warmup_steps <= 0:
    return after
  warmup = optax.linear_schedule(0.0, peak, warmup_steps)
  return optax.join_schedules([warmup, after], [warmup_steps])


def adafactor(learning_rate: optax.ScalarOrSchedule = 1e-3,
              decay_rate: float = 0.8,
              clipping_threshold: float = 1.0,
              multiply_by_parameter_scale: bool = True,
              epsilon1: float = 1e-30,
              factored: bool = True,
              min_dim_size_to_factor: int = 128) -> optax.GradientTransformation:
  """Adafactor as T5X configures it.

  Factored second moments, beta2_t = 1 - t^-decay_rate (decay 0.8), update
  clipping at RMS 1.0, updates scaled by the parameter's RMS (floored at
  epsilon2 = 1e-3, optax's fixed value), no momentum, no weight decay.
  """
  return optax.adafactor(
      learning_rate=learning_rate, min_dim_size_to_factor=min_dim_size_to_factor,
      decay_rate=decay_rate, decay_offset=0,
      multiply_by_parameter_scale=multiply_by_parameter_scale,
      clipping_threshold=clipping_threshold, momentum=None, weight_decay_rate=None,
      eps=epsilon1, factored=factored)
