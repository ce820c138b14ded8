"""The Optax optimizer: warmup + linear decay schedule, clipping, AdamW or LAMB, decay mask.

Owns: turning `config.optimizer` (+ `config.learning_rate`) into an `optax.GradientTransformation`.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax

OPTIMIZERS = ("adamw", "lamb")


def learning_rate_schedule(peak: float, num_train_steps: int, warmup_fraction: float) -> optax.Schedule:
  """Linear warmup to `peak` over `warmup_fraction` of the updates, then linear decay to 0 (BERT)."""
  warmup_steps = int(round(warmup_fraction * num_train_steps))
  return optax.join_schedules(
      [optax.linear_schedule(0.0, peak, max(warmup_steps, 1)),
       optax.linear_schedule(peak, 0.0, max(num_train_steps - warmup_steps, 1))],
      boundaries=[warmup_steps])


def decay_mask(params: Any) -> Any:
  """True for weights that get weight decay: everything but biases and LayerNorm parameters."""
  def decays(path, _):
    # Only dict keys name parameters; boxed (logically partitioned) leaves add an attribute key.
    names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    return not (names[-1] == "bias" or names[-2].endswith("LayerNorm"))
  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(config_optimizer: ml_collections.ConfigDict, learning_rate: float,
                   num_train_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  schedule = learning_rate_schedule(learning_rate, num_train_steps, config_optimizer.warmup_fraction)
  if config_optimizer.name == "adamw":
    update = optax.adamw(schedule, b1=config_optimizer.b1, b2=config_optimizer.b2, eps=config_optimizer.eps,
                         weight_decay=config_optimizer.weight_decay, mask=decay_mask)
  elif config_optimizer.name == "lamb":
    update = optax.lamb(schedule, b1=config_optimizer.b1, b2=config_optimizer.b2, eps=config_optimizer.eps,
                        weight_decay=config_optimizer.weight_decay, mask=decay_mask)
  else:
    raise ValueError(f"config.optimizer.name={config_optimizer.name!r}; use one of {OPTIMIZERS}.")
  return optax.chain(optax.clip_by_global_norm(config_optimizer.max_grad_norm), update), schedule
