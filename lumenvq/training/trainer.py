"""Train state and the jitted train / eval / predict steps, sharded by the logical rules.

Parameters are sharded per `partitioning.logical_shardings`, optimizer state
like the parameter it belongs to, batches over the `data` axis. One train
step may accumulate gradients over microbatches; it returns metric *sums*
(loss, z-loss, loss weight, correct tokens) so that the loss is normalised per
target token over the whole global batch, whatever the microbatching.
Dropout randomness is `fold_in(fold_in(PRNGKey(seed), step), microbatch)`, so
a resumed run draws the same masks as an uninterrupted one.

The model's *model state* (variable collections besides "params", e.g. LUMEN-VQ's
codebooks; see `models.EncoderDecoderModel`) is `TrainState.model_state`: sharded by its
logical axes, threaded through the microbatches of a step in order, replaced by what the
train step returns, read by eval and predict, never given to the optimizer. The model's
`frozen_param_patterns()` are added to the optimizer's frozen patterns.

*Step constants* (`step_constants`: a pytree of global arrays, e.g. a stored-memory table
and its codebooks, see `stored_memory`) are an argument of every jitted train, eval and
predict step, kept with the shardings they were placed with, and reach the model as
`batch[STEP_CONSTANTS]` (of each microbatch). Being arguments, they are neither embedded in
the compiled steps nor part of the train state: no checkpoint holds them.
"""

import functools
from typing import Any, Optional

import flax
import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from lumenvq.model.models import STEP_CONSTANTS
from lumenvq.training import partitioning
from lumenvq.training.optimizers import Optimizer


@flax.struct.dataclass
class TrainState:
  """Everything a train step reads and writes; eval and infer use it with opt_state None."""

  step: Any
  params: Any
  opt_state: Any
  model_state: Any = flax.struct.field(default_factory=dict)


def _dict_keys(path):
  return tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))


def opt_state_shardings(abstract_opt_state, abstract_params, param_shardings, mesh):
  """Each optimizer-state leaf sharded like its parameter (matched by name).

  Adafactor's factored moments drop one dimension of their parameter; they
  keep the parameter's sharding of the other dimensions (T5X does the same).
  Leaves that belong to no parameter (step counts) are replicated.
  """
  replicated = NamedSharding(mesh, P())
  params = {
      _dict_keys(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_params)
  }
  specs = {
      _dict_keys(path): s.spec for path, s in jax.tree_util.tree_leaves_with_path(param_shardings)
  }

  def pick(path, leaf):
    keys = _dict_keys(path)
    name = next((keys[i:] for i in range(len(keys)) if keys[i:] in params), None)
    if name is None:
      return replicated
    shape = tuple(params[name].shape)
    spec = tuple(specs[name]) + (None,) * (len(shape) - len(specs[name]))
    if tuple(leaf.shape) == shape:
      return NamedSharding(mesh, P(*spec))
    for d in range(len(shape)):
      if shape[:d] + shape[d + 1 :] == tuple(leaf.shape):
        return NamedSharding(mesh, P(*(spec[:d] + spec[d + 1 :])))
    return replicated

  return jax.tree_util.tree_map_with_path(pick, abstract_opt_state)


def _with_constants(batch, constants):
  """The batch a model sees: with the step constants under STEP_CONSTANTS, if any."""
  return batch if constants is None else {**batch, STEP_CONSTANTS: constants}


@gin.configurable(denylist=["model", "optimizer", "mesh", "rules", "step_constants"])
class Trainer:
  """Builds the sharded train state and runs jitted steps on `mesh`.

  `compiler_options` go to XLA for every jitted step: e.g.
  `{"xla_backend_optimization_level": 0}` halves CPU compile times of debug runs and tests.
  `step_constants` (see the module docstring) may also be set later, as the attribute: eval
  and infer open a memory store only once they know the restored checkpoint's step.
  """

  def __init__(
      self,
      model,
      optimizer: Optional[Optimizer],
      mesh,
      rules,
      num_microbatches: int = 1,
      seed: int = 0,
      compiler_options: Optional[dict] = None,
      step_constants: Any = None,
  ):
    if optimizer is not None:
      optimizer = optimizer.with_frozen(model.frozen_param_patterns())
    self.model, self.optimizer, self.mesh, self.rules = model, optimizer, mesh, rules
    self.num_microbatches, self.seed = num_microbatches, seed
    self.step_constants = step_constants
    boxed = model.abstract_variables()
    partitioning.check_divisible(boxed, mesh, rules)
    abstract = nn.meta.unbox(boxed)
    shardings = partitioning.logical_shardings(boxed, mesh, rules)
    collections = model.model_state_collections()
    self.abstract_params, self.param_shardings = abstract["params"], shardings["params"]
    self.abstract_model_state = {c: abstract[c] for c in collections}
    model_state_shardings = {c: shardings[c] for c in collections}
    self.replicated = NamedSharding(mesh, P())
    self.batch_sharding = partitioning.data_sharding(mesh)  # A prefix for any rank.
    # No optimizer: an inference-only trainer (eval, infer) without optimizer state.
    abstract_opt = (
        None if optimizer is None else jax.eval_shape(optimizer.tx.init, self.abstract_params)
    )
    self.state_shardings = TrainState(
        step=self.replicated,
        params=self.param_shardings,
        opt_state=opt_state_shardings(
            abstract_opt, self.abstract_params, self.param_shardings, mesh
        ),
        model_state=model_state_shardings,
    )
    self._abstract_opt = abstract_opt
    jit = functools.partial(jax.jit, compiler_options=compiler_options)
    # Step constants keep the shardings they were placed with (None: as given).
    self._train_step = jit(
        self._train_step_impl,
        in_shardings=(self.state_shardings, self.batch_sharding, None),
        out_shardings=(self.state_shardings, self.replicated),
        donate_argnums=(0,),
    )
    self._init_fresh = jit(
        lambda rng: self._create_state(rng, None), out_shardings=self.state_shardings
    )
    self._init_from = jit(
        self._create_state,
        in_shardings=(None, self.param_shardings),
        out_shardings=self.state_shardings,
    )
    read_only = (self.param_shardings, model_state_shardings, self.batch_sharding, None)
    self._eval_step = jit(
        lambda params, model_state, batch, constants: model.eval_fn(
            params, _with_constants(batch, constants), model_state
        ),
        in_shardings=read_only,
        out_shardings=self.replicated,
    )
    self._predict = jit(
        lambda params, model_state, batch, constants: model.predict_batch(
            params, _with_constants(batch, constants), model_state=model_state
        ),
        in_shardings=read_only,
        out_shardings=self.replicated,
    )

  def abstract_state(self) -> TrainState:
    """ShapeDtypeStructs carrying this mesh's shardings: what a restore lands on."""
    abstract = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32),
        params=self.abstract_params,
        opt_state=self._abstract_opt,
        model_state=self.abstract_model_state,
    )
    return jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        abstract,
        self.state_shardings,
    )

  def _run(self, fn, *args):
    with partitioning.axis_rules_and_mesh(self.mesh, self.rules):
      return fn(*args)

  def _create_state(self, rng, params):
    variables = nn.meta.unbox(self.model.get_initial_variables(rng))
    if params is None:
      params = variables["params"]
    model_state = {c: variables[c] for c in self.abstract_model_state}
    return TrainState(jnp.zeros((), jnp.int32), params, self.optimizer.tx.init(params), model_state)

  def init_state(self, params=None) -> TrainState:
    """Fresh parameters from `seed` (or the given ones), a fresh optimizer state and a
    fresh model state (LUMEN-VQ's codebooks seed themselves on the first train step)."""
    rng = jax.random.PRNGKey(self.seed)
    if params is None:
      return self._run(self._init_fresh, rng)
    return self._run(self._init_from, rng, params)

  def _microbatches(self, x):
    # Microbatch i takes rows i, i+M, ... so every microbatch spans all data shards.
    m = self.num_microbatches
    if x.shape[0] % m:
      raise partitioning.PartitioningError(
          f"batch of {x.shape[0]} does not divide into {m} microbatches (num_microbatches)"
      )
    x = jnp.swapaxes(x.reshape((x.shape[0] // m, m) + x.shape[1:]), 0, 1)
    return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, P(None, "data")))

  def _train_step_impl(self, state: TrainState, batch, constants):
    step_rng = jax.random.fold_in(jax.random.PRNGKey(self.seed), state.step)
    grad_fn = jax.grad(
        lambda params, mb, *args: self.model.loss_fn(params, _with_constants(mb, constants), *args),
        has_aux=True,
    )
    if self.num_microbatches == 1:
      grads, (sums, model_state) = grad_fn(
          state.params, batch, jax.random.fold_in(step_rng, 0), state.model_state
      )
    else:
      micro = jax.tree_util.tree_map(self._microbatches, batch)

      def body(carry, xs):  # Sums add up; the model state passes from one to the next.
        acc, model_state = carry
        i, mb = xs
        grads, (sums, model_state) = grad_fn(
            state.params, mb, jax.random.fold_in(step_rng, i), model_state
        )
        return (jax.tree_util.tree_map(jnp.add, acc, (grads, sums)), model_state), None

      first = jax.tree_util.tree_map(lambda x: x[0], micro)
      grads_shape, (sums_shape, _) = jax.eval_shape(
          grad_fn, state.params, first, step_rng, state.model_state
      )
      zeros = jax.tree_util.tree_map(
          lambda s: jnp.zeros(s.shape, s.dtype), (grads_shape, sums_shape)
      )
      ((grads, sums), model_state), _ = jax.lax.scan(
          body, (zeros, state.model_state), (jnp.arange(self.num_microbatches), micro)
      )
    grads = jax.tree_util.tree_map(lambda g: g / jnp.maximum(sums["weight"], 1.0), grads)
    updates, opt_state = self.optimizer.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(
        sums,
        grad_norm=optax.global_norm(grads),
        param_norm=optax.global_norm(params),
        learning_rate=jnp.asarray(self.optimizer.schedule(state.step), jnp.float32),
    )
    metrics["finite"] = (
        jnp.isfinite(sums["loss"])
        & jnp.isfinite(metrics["grad_norm"])
        & jnp.isfinite(metrics["param_norm"])
    )
    return TrainState(state.step + 1, params, opt_state, model_state), metrics

  def train_step(self, state: TrainState, batch) -> tuple:
    """(next state, metric sums and norms); `state` is donated."""
    return self._run(self._train_step, state, batch, self.step_constants)

  def eval_step(self, state: TrainState, batch) -> dict:
    """Teacher-forced metric sums with `state`'s params and model state (not changed)."""
    return self._run(self._eval_step, state.params, state.model_state, batch, self.step_constants)

  def predict_batch(self, state: TrainState, batch):
    """Decoded ids, replicated so every process can read all rows."""
    return self._run(self._predict, state.params, state.model_state, batch, self.step_constants)
