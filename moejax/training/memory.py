"""Memory plan of a train step: per-device bytes of everything a step holds, from abstract shapes
(no devices, no allocation), and whether it fits a given HBM size.

``plan(cfg, {'fsdp': 32, 'expert': 8}, batch=256, lengths={'targets': 4096}, remat='full',
dtype='bfloat16', optimizer='adamw')`` returns a :class:`MemoryPlan` (``moejax layout --model``
prints it). Rows, per device:

- **params**, **optimizer state** (AdamW's two moments or T5X's factored Adafactor; with
  ``master_weights`` the float32 master copy too) and **gradients** (one per parameter, in the
  parameter dtype), each sharded like its parameter under the logical axis rules;
- **activations**: every residual the backward pass keeps, found by tracing ``jax.vjp`` of the real
  loss (the model with the chosen remat policy, the loss with its float32 logits) at the per-device
  batch: a residual of the traced step is the residual of one device, except dimensions the rules
  put on ``model`` (heads, kv heads, mlp, vocab), divided by the ``model`` axis, and residuals
  shaped like a parameter (a layer's weights or their compute-dtype copy), sharded like it except
  over ``fsdp`` (FSDP gathers a layer's weights where it uses them). What the remat policy saves
  is what is counted (``full``: each scanned period's input only); the MoE layers' dispatch
  buffers, expert hidden activations and combine weights are among the residuals, with the groups
  and capacity the layer computes. Broadcasts (masks, scalars) are not counted: XLA fuses them;
- **backward workspace**: what one scanned period's backward needs on top (its forward residuals,
  recomputed under remat, and their cotangents: twice the period's residuals), and the logits'
  cotangent ``[b, s, v]`` in float32;
- **batch**: the input features.

Checked against :func:`compiled_peak` (``jit(train_step).lower(...).compile().memory_analysis()``)
on the 8-device CPU mesh (tests/training/test_memory_plan.py): an MoE decoder within 15% with and
without remat and FSDP; encoder-decoders are over-predicted (XLA:CPU fuses away attention residuals
jax keeps: 1.5-2.3x on tiny Switch models), dense decoders by ~25%. Other backends assign buffers
their own way: the total estimates the same terms (leave ~10% for scratch and fragmentation).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.extend.core import Literal
from jax.sharding import AbstractMesh, NamedSharding

from moejax.models.build import build_model
from moejax.models.config import EncDecConfig, override, with_dtypes
from moejax.moe.capacity import num_groups
from moejax.sharding import DEFAULT_RULES, Rules, logical_to_spec, spec_divisor, state_shardings
from moejax.training.config import LossConfig
from moejax.training.loss import loss_fn
from moejax.training.optim import OPTIMIZERS, make_optimizer
from moejax.training.state import fold_rngs, opt_state_shardings

GiB = 2.0**30


@dataclasses.dataclass
class MemoryPlan:
    """Per-device bytes of one train step (see the module docstring) and the plan's warnings."""

    name: str
    mesh: dict
    batch: int
    lengths: dict
    remat: str
    dtype: str
    optimizer: str
    rows: dict
    flags: list = dataclasses.field(default_factory=list)

    @property
    def total(self) -> float:
        return sum(self.rows.values())

    def fits(self, hbm_bytes: float) -> bool:
        return self.total <= hbm_bytes

    def table(self, hbm_bytes: float | None = None) -> str:
        mesh = ",".join(f"{k}={v}" for k, v in self.mesh.items())
        lens = ",".join(f"{k}={v}" for k, v in self.lengths.items())
        lines = [f"# {self.name}: mesh {mesh} ({math.prod(self.mesh.values())} devices), batch {self.batch} x "
                 f"{lens}, remat {self.remat}, compute {self.dtype}, {self.optimizer}", "",
                 "| per device | GiB |", "|---|---|"]
        lines += [f"| {k} | {v / GiB:,.3f} |" for k, v in self.rows.items()]
        lines.append(f"| **total** | **{self.total / GiB:,.3f}** |")
        if hbm_bytes:
            verdict = "fits" if self.fits(hbm_bytes) else "does NOT fit"
            biggest = max(self.rows, key=self.rows.get)
            lines += ["", f"{verdict} in {hbm_bytes / GiB:g} GiB per device "
                          f"({100 * self.total / hbm_bytes:.0f}%; largest: {biggest})"]
        lines += [f"flag: {f}" for f in self.flags]
        return "\n".join(lines)


def parse_bytes(text: str) -> float:
    """``'95GiB'`` / ``'80GB'`` / ``'16g'`` / a number of bytes -> bytes."""
    t = str(text).strip()
    units = {"gib": 2**30, "gb": 1e9, "g": 2**30, "mib": 2**20, "mb": 1e6, "m": 2**20, "tib": 2**40, "tb": 1e12}
    for u in sorted(units, key=len, reverse=True):
        if t.lower().endswith(u):
            return float(t[: -len(u)]) * units[u]
    try:
        return float(t)
    except ValueError:
        raise ValueError(f"bad memory size {text!r}; expected e.g. 95GiB, 80GB or a number of bytes") from None


def abstract_batch(cfg, batch: int, lengths: dict) -> dict:
    """ShapeDtypeStructs of the seqio features a train step takes (``decoder_*`` ``[b, targets]``,
    plus ``encoder_input_tokens [b, inputs]`` for encoder-decoders)."""
    if "targets" not in lengths:
        raise ValueError(f"lengths {lengths} has no 'targets'; e.g. {{'inputs': 512, 'targets': 128}}")
    s = int(lengths["targets"])
    out = {k: jax.ShapeDtypeStruct((batch, s), jnp.int32)
           for k in ("decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights")}
    if isinstance(cfg, EncDecConfig):
        if "inputs" not in lengths:
            raise ValueError(f"an encoder-decoder needs lengths['inputs']; got {lengths}")
        out["encoder_input_tokens"] = jax.ShapeDtypeStruct((batch, int(lengths["inputs"])), jnp.int32)
    return out


def _nbytes(a) -> int:
    if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
        return math.prod(a.shape) * 8                  # a threefry / rbg key: 2 uint32
    return math.prod(a.shape) * np.dtype(a.dtype).itemsize


def residuals(cfg, batch: dict, loss: LossConfig | None = None) -> list[jax.ShapeDtypeStruct]:
    """The arrays ``jax.vjp`` of the train loss keeps for the backward pass (abstract: traced only),
    parameters and inputs passed through excluded."""
    loss = loss or LossConfig()
    factory = lambda: build_model(cfg, nnx.Rngs(0))
    graphdef, params, _ = nnx.split(nnx.eval_shape(factory), nnx.Param, ...)
    # the non-param state (RNG streams) concretely, as the train step has it; XLA drops the
    # param initialisers, so this allocates nothing of the model's size
    rest = jax.jit(lambda: nnx.split(factory(), nnx.Param, ...)[2])()

    def step_loss(p, b):          # as the train step: the RNG streams folded with the (traced) step
        model = nnx.merge(graphdef, p, fold_rngs(rest, jnp.zeros((), jnp.int32)))
        return loss_fn(model, b, loss, deterministic=False)[0]

    def f(p, b):
        return jax.vjp(lambda p: step_loss(p, b), p)

    closed = jax.make_jaxpr(f)(params, batch)
    jaxpr = closed.jaxpr
    producer = {o: e for e in jaxpr.eqns for o in e.outvars}
    inputs = set(jaxpr.invars)
    seen, out = set(), []
    for v in jaxpr.outvars[1:]:                  # the loss, then the residuals
        if isinstance(v, Literal) or v in inputs or v in seen:
            continue
        seen.add(v)
        if _fused_away(producer.get(v), v):
            continue
        out.append(jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype))
    return out


def _fused_away(eqn, var) -> bool:
    """:func:`_broadcast_like`, looking into a scan for the residuals it stacks over the layers (a
    mask broadcast in every layer is still a broadcast)."""
    if eqn is not None and eqn.primitive.name == "scan":
        body = eqn.params["jaxpr"].jaxpr
        inner = body.outvars[eqn.outvars.index(var)]
        if isinstance(inner, Literal):
            return True
        producer = {o: e for e in body.eqns for o in e.outvars}
        return _fused_away(producer.get(inner), inner)
    return _broadcast_like(eqn, var)


def _broadcast_like(eqn, var) -> bool:
    """A residual XLA never materialises: a broadcast (of a mask, a scalar), or any op whose inputs
    together are a small fraction of it, which XLA fuses into the consumer and recomputes there."""
    if eqn is None:
        return False
    if eqn.primitive.name in ("broadcast_in_dim", "iota"):
        return True
    arrays = [i for i in eqn.invars if not isinstance(i, Literal)]
    return 8 * sum(_nbytes(i.aval) for i in arrays) <= _nbytes(var.aval)


def _model_split_dims(cfg) -> set[int]:
    dims = {cfg.num_heads, cfg.d_ff, cfg.vocab_size}
    dims.add(getattr(cfg, "num_kv_heads", cfg.num_heads))
    if cfg.moe is not None:
        dims.add(cfg.moe.d_ff)
    return dims


def _local(a, model: int, split_dims: set[int]) -> float:
    """Per-device bytes of a residual traced at the per-device batch: divided by ``model`` when a
    dimension is one the rules put on ``model``."""
    n = _nbytes(a)
    if model > 1 and any(d in split_dims and d % model == 0 for d in a.shape):
        n /= model
    return n


def plan(cfg, mesh_shape: dict, batch: int, lengths: dict, *, remat: str | None = None, dtype=None,
         param_dtype=None, optimizer: str = "adamw", master_weights: bool = False, rules: Rules = DEFAULT_RULES,
         loss: LossConfig | None = None, name: str = "") -> MemoryPlan:
    """The :class:`MemoryPlan` of training ``cfg`` on ``mesh_shape`` (axis name -> size) with a
    global ``batch`` of sequences of ``lengths`` (``{'targets'}``, plus ``'inputs'`` for
    encoder-decoders). ``remat`` / ``dtype`` / ``param_dtype`` override the config's. Raises
    ValueError naming the value when the batch does not divide its shards or a name is unknown."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; valid: {', '.join(OPTIMIZERS)}")
    cfg = with_dtypes(cfg, dtype=dtype, param_dtype=param_dtype)
    if remat is not None:
        cfg = cfg.replace(remat=remat)
    cfg.validate()
    mesh = AbstractMesh(tuple(int(v) for v in mesh_shape.values()), tuple(mesh_shape))
    batch_shards = spec_divisor(logical_to_spec(("batch",), rules, mesh), mesh, 0)
    if batch % batch_shards:
        raise ValueError(f"batch {batch} does not divide the {batch_shards} batch shards of mesh {mesh_shape}")
    model_axis = int(mesh_shape.get("model", 1))

    # params, optimizer state, gradients: the real shardings of the abstract state
    abstract = nnx.eval_shape(lambda: build_model(cfg, nnx.Rngs(0)))
    params = nnx.state(abstract, nnx.Param)
    p_sh = state_shardings(params, mesh, rules)
    p_leaves = jax.tree.leaves(params)
    sh_leaves = jax.tree.leaves(p_sh, is_leaf=lambda x: isinstance(x, NamedSharding))
    pbytes = sum(math.prod(s.shard_shape(a.shape)) * np.dtype(a.dtype).itemsize for a, s in zip(p_leaves, sh_leaves))
    tx = make_optimizer(optimizer, master_weights=master_weights).tx
    abs_opt = jax.eval_shape(tx.init, params)
    o_sh = opt_state_shardings(abs_opt, params, p_sh, mesh)
    o_leaves = jax.tree.leaves(o_sh, is_leaf=lambda x: isinstance(x, NamedSharding))
    obytes = sum(math.prod(s.shard_shape(a.shape)) * np.dtype(a.dtype).itemsize
                 for a, s in zip(jax.tree.leaves(abs_opt), o_leaves))

    # activations: residuals of the per-device step (MoE groups formed from the local tokens)
    flags = []
    local_cfg = cfg
    if cfg.moe is not None:
        local_cfg = override(cfg, {"moe.group_multiple": 1})
        for length in {int(v) for v in lengths.values()}:
            try:
                g = num_groups(batch * length, cfg.moe.max_group_size, cfg.moe.group_multiple)
            except ValueError:
                g = 0
            if g % batch_shards:
                flags.append(f"{batch * length} tokens form {g} MoE groups, which do not split over the {batch_shards} "
                             f"batch shards (every device would compute them all): set moe.group_multiple="
                             f"{batch_shards}; planned as if set")
                break
    local_batch = abstract_batch(cfg, batch // batch_shards, lengths)
    split = _model_split_dims(cfg)
    res = residuals(local_cfg, local_batch, loss)
    # a residual shaped like a parameter (a layer's weights, its compute-dtype copy) is sharded like
    # that parameter except over fsdp: FSDP gathers each layer's weights where they are used
    param_like = {}
    for a, sh in zip(p_leaves, sh_leaves):
        frac = 1.0 / math.prod(spec_divisor(sh.spec, mesh, d, skip=("fsdp",)) for d in range(len(a.shape)))
        param_like[tuple(a.shape)] = min(frac, param_like.get(tuple(a.shape), 1.0))

    def local(a) -> float:
        frac = param_like.get(tuple(a.shape))
        return _nbytes(a) * frac if frac is not None else _local(a, model_axis, split)

    acts = sum(local(a) for a in res)
    # one layer's backward on top: its residuals (recomputed under remat) and their cotangents
    if local_cfg.remat != "none":
        res = residuals(local_cfg.replace(remat="none"), local_batch, loss)
    period = _one_layer_bytes(_stacked(local_cfg, res), local)
    b, s = batch // batch_shards, int(lengths["targets"])
    logits_cot = b * s * cfg.vocab_size * 4 / (model_axis if cfg.vocab_size % model_axis == 0 else 1)
    work = 2 * period + logits_cot
    rows = {"params": pbytes, "optimizer state": obytes, "gradients": pbytes, "activations": acts,
            "backward workspace": work,
            "batch": sum(_nbytes(a) for a in local_batch.values())}
    dt = jnp.dtype(cfg.dtype).name
    return MemoryPlan(name or type(cfg).__name__, dict(mesh_shape), batch, dict(lengths), cfg.remat, dt,
                      optimizer + (" + f32 master" if master_weights else ""), rows, flags)


def _stacked(cfg, res) -> list:
    """Residuals stacked over the scanned layers (leading dim = a stack's number of periods)."""
    if isinstance(cfg, EncDecConfig):
        periods = {cfg.num_encoder_layers // cfg.period(False), cfg.num_decoder_layers // cfg.period(True)}
    else:
        periods = {cfg.num_layers // cfg.period}
    return [a for a in res if a.shape and a.shape[0] in periods]


def _one_layer_bytes(stacked: list, local) -> float:
    """Per-device bytes of one period of the largest layer stack, ``local(a)`` the bytes of ``a``."""
    return max((sum(local(a) / a.shape[0] for a in stacked if a.shape[0] == n)
                for n in {a.shape[0] for a in stacked}), default=0.0)


def compiled_peak(cfg, mesh, batch: int, lengths: dict, *, optimizer: str = "adamw", master_weights: bool = False,
                  rules: Rules = DEFAULT_RULES) -> float:
    """Per-device peak bytes XLA assigns to the real train step on ``mesh`` (a device mesh):
    ``arguments + outputs - donated aliases + temporaries`` of
    ``jit(train_step).lower(...).compile().memory_analysis()``. Compiles only; allocates nothing."""
    from moejax.training.state import StepFns

    fns = StepFns(cfg, make_optimizer(optimizer, master_weights=master_weights).tx, mesh, rules=rules)
    spec = logical_to_spec(("batch", None), rules, mesh)
    feats = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=NamedSharding(mesh, spec))
             for k, v in abstract_batch(cfg, batch, lengths).items()}
    with jax.set_mesh(mesh):
        m = fns.train_step_jit.lower(fns.abstract_state(), feats, None).compile().memory_analysis()
    return m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes

