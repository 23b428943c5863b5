"""Train state as plain pytrees, born sharded, and the jitted train / eval steps.

``TrainState``: ``params`` (the model's ``nnx.Param`` state), ``opt_state`` (optax), ``step``
(int32). A train step whose loss or gradient norm is not finite leaves params and optimizer state
unchanged and reports ``metrics['nonfinite'] = 1`` (the trainer stops after a run of them).
The model's non-param state (RNG streams for dropout / jitter / random routing) is the init-time
state with every key folded with the step, so a run is a pure function of (seed, step):
resuming from a checkpoint replays exactly the same randomness.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import NamedSharding, PartitionSpec

from moejax.models.build import build_model
from moejax.models.forward import forward
from moejax.sharding import DEFAULT_RULES, state_shardings
from moejax.training.balance import bias_paths, sign_update, with_balance_labels
from moejax.training.config import LossConfig
from moejax.training.loss import loss_fn
from moejax.training.roles import freeze_labels
from moejax.tree import path_key


@struct.dataclass
class TrainState:
    params: Any
    opt_state: Any
    step: jax.Array


def _is_key(x) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _fold(keys, step):
    """``fold_in(key, step)`` for a key array of any shape (stacked layers hold one key each)."""
    flat = keys.reshape(-1)
    return jax.vmap(lambda k: jax.random.fold_in(k, step))(flat).reshape(keys.shape)


def fold_rngs(rest, step):
    """The model's non-param state with every RNG key folded with ``step`` (a train step's streams)."""
    return jax.tree.map(lambda x: _fold(x, step) if _is_key(x) else x, rest)


def opt_state_shardings(abstract_opt, abstract_params, param_shardings, mesh):
    """Shard each optimizer-state leaf like the param it mirrors (same path suffix): same shape ->
    same sharding; a factored moment missing one dim -> the param's spec without that dim; else
    replicated."""
    table = {}
    for (path, a), (_, s) in zip(jax.tree_util.tree_flatten_with_path(abstract_params)[0],
                                 jax.tree_util.tree_flatten_with_path(param_shardings)[0]):
        table[path_key(path)] = (a.shape, s.spec)
    rep = NamedSharding(mesh, PartitionSpec())

    def one(path, leaf):
        key = path_key(path)
        for i in range(len(key)):
            if key[i:] in table:
                pshape, spec = table[key[i:]]
                spec = tuple(spec) + (None,) * (len(pshape) - len(spec))
                if leaf.shape == pshape:
                    return NamedSharding(mesh, PartitionSpec(*spec))
                if len(leaf.shape) == len(pshape) - 1:
                    for d in range(len(pshape)):
                        if pshape[:d] + pshape[d + 1:] == tuple(leaf.shape):
                            return NamedSharding(mesh, PartitionSpec(*(spec[:d] + spec[d + 1:])))
                return rep
        return rep

    return jax.tree_util.tree_map_with_path(one, abstract_opt)


@dataclasses.dataclass
class StepFns:
    """Built once per (model config, optimizer, mesh): shardings and the jitted functions."""

    model_cfg: Any
    tx: optax.GradientTransformation
    mesh: Any
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    microbatches: int = 1
    seed: int = 0
    freeze: tuple = ()
    rules: Any = DEFAULT_RULES
    teacher: Any = None              # a trained nnx model (distillation); its params enter the step as an argument
    distill_alpha: float = 0.75
    distill_temperature: float = 1.0
    bias_update_rate: float = 0.001  # gamma of the aux-loss-free balancing (moejax.training.balance)

    def __post_init__(self):
        cfg, seed = self.model_cfg, self.seed
        self.factory = lambda: build_model(cfg, nnx.Rngs(seed))
        abstract = nnx.eval_shape(self.factory)
        self.graphdef, self.abstract_params, _ = nnx.split(abstract, nnx.Param, ...)
        if not self.bias_update_rate >= 0:
            raise ValueError(f"bias_update_rate must be >= 0, got {self.bias_update_rate}")
        biases = bias_paths(abstract)
        if self.freeze or biases:
            flat = {}
            if self.freeze:
                for path, v in jax.tree_util.tree_flatten_with_path(freeze_labels(abstract, self.freeze))[0]:
                    flat[path_key(path)] = v
            label_tree = with_balance_labels(lambda key: flat.get(key, "train"), self.abstract_params, biases)
            self.tx = optax.multi_transform({"train": self.tx, "freeze": optax.set_to_zero(),
                                             "balance": sign_update(self.bias_update_rate)}, label_tree)
        self.param_shardings = state_shardings(self.abstract_params, self.mesh, self.rules)
        abstract_opt = jax.eval_shape(self.tx.init, self.abstract_params)
        self.opt_shardings = opt_state_shardings(abstract_opt, self.abstract_params, self.param_shardings, self.mesh)
        rep = NamedSharding(self.mesh, PartitionSpec())
        self.state_shardings = TrainState(params=self.param_shardings, opt_state=self.opt_shardings, step=rep)
        # the non-param state (RNG streams) at init; XLA drops the param initialisers it does not need
        with jax.set_mesh(self.mesh):
            self.rest0 = jax.jit(lambda: nnx.split(self.factory(), nnx.Param, ...)[2],
                                 out_shardings=rep)()
        if self.teacher is not None:
            if self.teacher.cfg.vocab_size != cfg.vocab_size:
                raise ValueError(f"cannot distill across vocabularies: teacher vocab_size={self.teacher.cfg.vocab_size}"
                                 f", student vocab_size={cfg.vocab_size}")
            if type(self.teacher.cfg) is not type(cfg):
                raise ValueError(f"teacher is a {type(self.teacher.cfg).__name__} but the student a "
                                 f"{type(cfg).__name__}; distill within one architecture family")
            self.teacher_graphdef, self.teacher_state = nnx.split(self.teacher)
        jitted = jax.jit(self._train_step, in_shardings=(self.state_shardings, None, None),
                         out_shardings=(self.state_shardings, None), donate_argnums=(0,))
        self.train_step_jit = jitted        # (state, batch, teacher_state) -> (state, metrics): for .lower()
        self.train_step = lambda state, batch: jitted(state, batch, getattr(self, "teacher_state", None))
        self.eval_step = jax.jit(self._eval_step, in_shardings=(self.param_shardings, None))

    def abstract_state(self) -> TrainState:
        """Shapes, dtypes and shardings of the train state (a restore target)."""
        abs_state = jax.eval_shape(self._init_from_params, self.abstract_params)
        leaves, treedef = jax.tree.flatten(abs_state)
        shards = jax.tree.leaves(self.state_shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
        assert len(leaves) == len(shards), (len(leaves), len(shards))
        return jax.tree.unflatten(treedef, [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)
                                            for a, s in zip(leaves, shards)])

    def _init_from_params(self, params):
        return TrainState(params=params, opt_state=self.tx.init(params), step=jnp.zeros((), jnp.int32))

    def init(self) -> TrainState:
        """A fresh train state, every array born in its sharding."""
        def make():
            params = nnx.split(self.factory(), nnx.Param, ...)[1]
            return self._init_from_params(params)

        with jax.set_mesh(self.mesh):
            return jax.jit(make, out_shardings=self.state_shardings)()

    def from_params(self, params) -> TrainState:
        """Fresh optimizer state and step 0 around given params (finetuning init)."""
        with jax.set_mesh(self.mesh):
            return jax.jit(self._init_from_params, in_shardings=(self.param_shardings,),
                           out_shardings=self.state_shardings)(params)

    def model(self, params, step=None):
        """The NNX model for ``params`` (RNG streams folded with ``step`` when given)."""
        rest = self.rest0 if step is None else fold_rngs(self.rest0, step)
        return nnx.merge(self.graphdef, params, rest)

    def _loss(self, params, batch, step, teacher_logits=None):
        return loss_fn(self.model(params, step), batch, self.loss, deterministic=False, teacher_logits=teacher_logits,
                       distill_alpha=self.distill_alpha, distill_temperature=self.distill_temperature)

    def _train_step(self, state: TrainState, batch, teacher_state=None):
        def loss(params, mb, step):
            teacher_logits = None
            if teacher_state is not None:   # distillation: the teacher's logits, no gradient
                teacher_logits = jax.lax.stop_gradient(
                    forward(nnx.merge(self.teacher_graphdef, teacher_state), mb, deterministic=True)[0])
            return self._loss(params, mb, step, teacher_logits)

        grad_fn = jax.value_and_grad(loss, has_aux=True)
        m = self.microbatches
        if m == 1:
            (_, metrics), grads = grad_fn(state.params, batch, state.step)
        else:
            b = next(iter(batch.values())).shape[0]
            if b % m:
                raise ValueError(f"batch size {b} is not divisible by microbatches={m}")
            micro = jax.tree.map(lambda x: x.reshape((m, b // m) + x.shape[1:]), batch)

            def grads_and_metrics(mb):
                (_, met), g = grad_fn(state.params, mb, state.step)
                return g, met

            def body(acc, mb):
                return jax.tree.map(jnp.add, acc, grads_and_metrics(mb)), None

            shapes = jax.eval_shape(grads_and_metrics, jax.tree.map(lambda x: x[0], micro))
            zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)
            (grads, metrics), _ = jax.lax.scan(body, zeros, micro)
            grads = jax.tree.map(lambda g: g / m, grads)
            metrics = jax.tree.map(lambda v: v / m, metrics)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics["grad_norm"] = optax.global_norm(grads)
        # a step whose loss or gradients are not finite is not applied (params and optimizer state
        # stay as they were); the step counter still advances, past the batch that caused it
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
        params, opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), (params, opt_state),
                                         (state.params, state.opt_state))
        metrics["nonfinite"] = jnp.logical_not(finite).astype(jnp.float32)
        return TrainState(params=params, opt_state=opt_state, step=state.step + 1), metrics

    def _eval_step(self, params, batch):
        _, metrics = loss_fn(self.model(params), batch, self.loss, deterministic=True)
        return metrics
