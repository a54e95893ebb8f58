"""Optimizers and learning-rate schedules (optax), bound from gin, with parameter freezing.

Defaults are T5X's: Adafactor with factored second moments (decay_rate 0.8,
parameter-scaled updates, update clipping at RMS 1.0, no momentum) and the
rsqrt schedule `base / sqrt(max(step, warmup_steps))`; no global-norm
gradient clipping. AdamW is the alternative. Parameters whose '/'-joined
name matches a `frozen_patterns` regex get zero updates and no optimizer
state (LUMEN freezes the memory encoder this way: the trainer adds the model's
`frozen_param_patterns()` to these through `Optimizer.with_frozen`). `param_groups` gives
parameters matching a regex their own transformation (memory+'s value table: its own
learning rate, no weight decay, as Memory Layers at Scale trains it).
"""

import dataclasses
import re
from typing import Callable, Mapping, Optional, Sequence

import flax
import gin
import jax
import jax.numpy as jnp
import optax


@gin.configurable
def rsqrt_decay(base_learning_rate: float = 1.0, warmup_steps: int = 10_000) -> Callable:
  """T5X's rsqrt_decay: constant base/sqrt(warmup) for warmup steps, then 1/sqrt(step)."""

  def schedule(step):
    return base_learning_rate * jnp.reciprocal(
        jnp.sqrt(jnp.maximum(jnp.asarray(step, jnp.float32), warmup_steps))
    )

  return schedule


@gin.configurable
def constant_schedule(value: float = 1e-3) -> Callable:
  """T5X fine-tuning uses a constant 1e-3 with Adafactor."""
  return optax.constant_schedule(value)


@gin.configurable
def linear_warmup_cosine(
    peak: float = 1e-4, warmup_steps: int = 1000, decay_steps: int = 100_000, end: float = 0.0
) -> Callable:
  """The usual AdamW schedule."""
  return optax.warmup_cosine_decay_schedule(0.0, peak, warmup_steps, decay_steps, end)


@gin.configurable
def adafactor(
    learning_rate,
    decay_rate: float = 0.8,
    clipping_threshold: Optional[float] = 1.0,
    multiply_by_parameter_scale: bool = True,
    factored: bool = True,
    min_dim_size_to_factor: int = 128,
    momentum: Optional[float] = None,
    weight_decay_rate: Optional[float] = None,
) -> optax.GradientTransformation:
  return optax.adafactor(
      learning_rate,
      decay_rate=decay_rate,
      clipping_threshold=clipping_threshold,
      multiply_by_parameter_scale=multiply_by_parameter_scale,
      factored=factored,
      min_dim_size_to_factor=min_dim_size_to_factor,
      momentum=momentum,
      weight_decay_rate=weight_decay_rate,
  )


@gin.configurable
def adamw(
    learning_rate, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.01
) -> optax.GradientTransformation:
  return optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)


def freeze(
    tx: optax.GradientTransformation, frozen_patterns: Sequence[str]
) -> optax.GradientTransformation:
  """`tx` on the trainable parameters; zero updates and no state for the frozen ones."""
  patterns = tuple(frozen_patterns)
  return optax.multi_transform(
      {"trainable": tx, "frozen": optax.set_to_zero()},
      lambda params: freeze_labels(params, patterns),
  )


def group(
    tx: optax.GradientTransformation, param_groups: Mapping[str, optax.GradientTransformation]
) -> optax.GradientTransformation:
  """`param_groups[pattern]` on parameters whose name matches `pattern` (the first that
  does), `tx` on the rest."""
  if not param_groups:
    return tx
  patterns = tuple(param_groups)
  return optax.multi_transform(
      {"default": tx, **{p: param_groups[p] for p in patterns}},
      lambda params: _regex_labels(params, patterns, "default", "param_groups"),
  )


@dataclasses.dataclass(frozen=True)
class Optimizer:
  """The transformation and its schedule (kept to log the learning rate).

  `frozen_patterns` are already applied to `tx`; `unfrozen_tx` is `tx` before freezing, so
  `with_frozen` can add a model's own patterns (LUMEN's memory encoder) to the gin-set
  ones without nesting two multi_transforms.
  """

  tx: optax.GradientTransformation
  schedule: Callable
  frozen_patterns: tuple = ()
  unfrozen_tx: Optional[optax.GradientTransformation] = None

  def with_frozen(self, patterns: Sequence[str]) -> "Optimizer":
    """This optimizer with `patterns` frozen too (itself when they already are)."""
    extra = tuple(p for p in dict.fromkeys(patterns) if p not in self.frozen_patterns)
    if not extra:
      return self
    base = self.unfrozen_tx if self.frozen_patterns else self.tx
    if base is None:
      raise ValueError(
          f"cannot freeze {extra}: this Optimizer has frozen_patterns "
          f"{self.frozen_patterns} but no unfrozen_tx (use make_optimizer)"
      )
    patterns = self.frozen_patterns + extra
    return Optimizer(freeze(base, patterns), self.schedule, patterns, base)


def freeze_labels(params, frozen_patterns: Sequence[str]):
  """'frozen' / 'trainable' per parameter, by regex search on its '/'-joined name."""
  labels = _regex_labels(params, frozen_patterns, "trainable", "frozen pattern")
  return jax.tree_util.tree_map(lambda l: l if l == "trainable" else "frozen", labels)


def _regex_labels(params, patterns: Sequence[str], default: str, what: str):
  """Per parameter, the first of `patterns` its '/'-joined name matches, else `default`."""
  regexes = [re.compile(p) for p in patterns]
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep="/")
  labels = {name: next((r.pattern for r in regexes if r.search(name)), default) for name in flat}
  for regex in regexes:  # A pattern that matches nothing is a typo, not a choice.
    if not any(regex.search(name) for name in flat):
      raise ValueError(
          f"{what} {regex.pattern!r} matches no parameter (e.g. {next(iter(flat), '')!r})"
      )
  return flax.traverse_util.unflatten_dict(labels, sep="/")


@gin.configurable
def make_optimizer(
    optimizer_fn: Callable = adafactor,
    schedule: Optional[Callable] = None,
    frozen_patterns: Sequence[str] = (),
    max_grad_norm: Optional[float] = None,
    param_groups: Mapping[str, optax.GradientTransformation] = (),
) -> Optimizer:
  """`optimizer_fn(learning_rate=schedule)`, optionally with global-norm clipping,
  parameter groups of their own (`group`) and frozen parameters. `schedule` defaults to
  `rsqrt_decay()`."""
  schedule = schedule if schedule is not None else rsqrt_decay()
  tx = group(optimizer_fn(learning_rate=schedule), dict(param_groups))
  if max_grad_norm is not None:
    tx = optax.chain(optax.clip_by_global_norm(max_grad_norm), tx)
  return Optimizer(tx, schedule).with_frozen(frozen_patterns)
