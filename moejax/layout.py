"""Pod-scale memory layout from abstract shapes: per-device bytes of the params, the optimizer state
and the MoE dispatch buffers of any registered config on any mesh (an ``AbstractMesh``: no devices
are needed), and the parameters the sharding rules leave replicated.

``layout(cfg, {'data': 16, 'expert': 64, 'model': 2}, batch=2048, lengths={'inputs': 512,
'targets': 128})`` returns a :class:`Layout`; ``moejax layout --devices 2048`` prints the table for
every config (README "Pod-scale layouts").

What is computed, per device:
- params: each parameter's shard under the rules (``moejax.sharding.state_shardings``);
- optimizer state: ``tx.init`` traced abstractly for T5X's factored Adafactor and for AdamW, each
  leaf sharded like its parameter (``moejax.training.state.opt_state_shardings``);
- MoE buffers of one layer in a train step: the dispatched tokens ``[g, e, c, d]`` on both sides of
  the all-to-all (groups over the batch axes before, experts over ``expert`` after), and the experts'
  hidden activations ``[e, g, c, f']`` (``f'`` = every d_ff-wide tensor: 2 f for SwiGLU); ``g``
  and ``c`` exactly as ``MoeLayer`` computes them (for the dropless ``bucket`` backend ``c`` is its
  largest bucket, and what a layer keeps for the backward pass is its per-assignment rows
  ``[g, t*k, d + f']``; one layer's buffers are live at a time), with ``MoeConfig.group_multiple`` set to the batch
  shards. A dimension that does not divide its shards stays whole, as ``moejax.sharding.constrain``
  leaves it;
- flags: a parameter of >= 2**20 elements that no mesh axis splits although the mesh has a ``model``
  axis (routers excepted: every device routes its own tokens; on a mesh without ``model``, dense
  weights are data-parallel replicas by design), expert weights whose expert axis is not split over
  ``expert``, and groups that would not divide the batch shards with the config's own
  ``group_multiple`` (a dropless layer whose losses are not per group picks a multiple of the batch
  shards itself: :func:`moejax.moe.capacity.group_multiple`).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
from flax import nnx
from jax.sharding import AbstractMesh, NamedSharding

from moejax.models.build import abstract_model
from moejax.models.config import EncDecConfig
from moejax.models.registry import get_config
from moejax.moe import MoeLayer, Router
from moejax.moe.capacity import layer_groups, num_groups
from moejax.moe.experts import ffn_matrices
from moejax.moe.factory import backend_class, resolve_backend
from moejax.sharding import DEFAULT_RULES, Rules, logical_to_spec, spec_divisor, state_shardings, variable_logical_axes
from moejax.training.optim import make_optimizer
from moejax.training.state import opt_state_shardings
from moejax.tree import var_value

#: Global batch assumed by the README table: the Switch / T5 pretraining batch (2**20 input tokens,
#: span-corruption targets) for encoder-decoders, 1024 x 4096 tokens for decoder-only models.
ENC_DEC_BATCH = (2048, {"inputs": 512, "targets": 128})
DECODER_BATCH = (1024, {"targets": 4096})


@dataclasses.dataclass
class Layout:
    """Per-device bytes of one config on one mesh (see the module docstring)."""

    name: str
    mesh: dict
    params: float
    adafactor: float
    adamw: float
    moe_layers: int
    dispatch: float            # one MoE layer's [g, e, c, d] buffer, the larger side of the all-to-all
    hidden: float              # one MoE layer's expert hidden activations
    groups: int = 0
    capacity: int = 0
    backend: str = "-"
    kept: float | None = None  # bytes one MoE layer keeps for the backward pass (None: 2 * dispatch + hidden)
    replicated: float = 0.0    # bytes of parameters no mesh axis splits (incl. the routers, by design)
    flags: list = dataclasses.field(default_factory=list)

    @property
    def devices(self) -> int:
        return math.prod(self.mesh.values())

    @property
    def moe_total(self) -> float:
        """All MoE layers' buffers kept for the backward pass (dispatched in + combined out + hidden);
        for ``bucket``, every layer's per-assignment residual rows plus one layer's buffers."""
        if self.kept is None:
            return self.moe_layers * (2 * self.dispatch + self.hidden)
        return self.moe_layers * self.kept + 2 * self.dispatch + self.hidden

    def row(self) -> str:
        gib, mib = 2.0**30, 2.0**20
        mesh = "x".join(str(self.mesh[a]) for a in self.mesh)
        moe = (f"{self.moe_layers} {self.backend} | {self.groups}x{self.capacity} | {self.dispatch / mib:,.1f} | "
               f"{self.hidden / mib:,.1f} | {self.moe_total / gib:.2f}" if self.moe_layers else "0 | - | - | - | -")
        return (f"| {self.name} | {mesh} | {self.params / gib:.3f} | {self.replicated / mib:,.1f} | "
                f"{self.adafactor / gib:.3f} | {self.adamw / gib:.3f} | {moe} | {'; '.join(self.flags) or 'ok'} |")


HEADER = ("| config | mesh (data x expert x model) | params GiB | of which replicated MiB | Adafactor GiB | AdamW GiB "
          "| MoE layers, backend | groups x capacity | dispatch MiB / layer | expert hidden MiB / layer "
          "| MoE buffers, all layers GiB | flags |\n|---|---|---|---|---|---|---|---|---|---|---|---|")


def abstract_mesh(shape: dict) -> AbstractMesh:
    return AbstractMesh(tuple(int(v) for v in shape.values()), tuple(shape))


def _model_dims(cfg) -> list[int]:
    """Sizes of every dimension the default rules put on the ``model`` axis (heads, mlp, vocab)."""
    model = abstract_model(cfg)
    dims = []
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        axes = variable_logical_axes(var) or ()
        shape = var_value(var).shape
        dims += [n for a, n in zip(axes, shape) if a in ("heads", "mlp", "vocab")]
    return dims


def suggest_mesh(cfg, devices: int, max_model: int = 8) -> dict:
    """A ``data x expert x model`` mesh of ``devices``: the largest power-of-two ``model`` <=
    ``max_model`` dividing every heads / mlp / vocab dimension, the largest power-of-two ``expert``
    dividing the expert count (and what is left), the rest ``data``."""
    g = 0
    for n in _model_dims(cfg):
        g = math.gcd(g, n)
    model = 1
    while model * 2 <= max_model and g % (model * 2) == 0 and devices % (model * 2) == 0:
        model *= 2
    e = getattr(getattr(cfg, "moe", None), "num_experts", 1) or 1
    expert = 1
    while e % (expert * 2) == 0 and (devices // model) % (expert * 2) == 0:
        expert *= 2
    return {"data": devices // (model * expert), "expert": expert, "model": model}


def _shard_bytes(shape, dtype, sharding) -> float:
    return math.prod(sharding.shard_shape(tuple(shape))) * np.dtype(dtype).itemsize


def _buffer_bytes(shape, logical, mesh, rules, itemsize) -> float:
    """Per-device bytes of an activation constrained to ``logical`` (non-dividing dims stay whole)."""
    spec = logical_to_spec(logical, rules, mesh)
    n = 1
    for d, size in enumerate(shape):
        k = spec_divisor(spec, mesh, d)
        n *= size // k if size % k == 0 else size
    return n * itemsize


def layout(cfg, mesh_shape: dict, batch: int, lengths: dict, *, name: str = "", rules: Rules = DEFAULT_RULES,
           act_bytes: int = 2) -> Layout:
    """Per-device bytes of ``cfg`` trained on ``mesh_shape`` with ``batch`` sequences of ``lengths``
    (``{'inputs', 'targets'}``; decoder-only models use ``targets``). Activations in ``act_bytes``
    (2: bf16 compute). Raises ValueError (naming the parameter) when a parameter dimension does not
    divide its mesh axes."""
    mesh = abstract_mesh(mesh_shape)
    model = abstract_model(cfg)
    pstate = nnx.state(model, nnx.Param)
    shardings = state_shardings(pstate, mesh, rules)
    flat_p = dict(nnx.to_flat_state(pstate))
    flat_s = dict(nnx.to_flat_state(shardings))
    out = Layout(name=name or type(cfg).__name__, mesh=dict(mesh_shape), params=0.0, adafactor=0.0, adamw=0.0,
                 moe_layers=0, dispatch=0.0, hidden=0.0)
    devices = math.prod(mesh_shape.values())
    # routers are replicated by design (every device routes its own tokens in float32)
    routers = {tuple(p) + tuple(q) for p, node in nnx.iter_graph(model) if isinstance(node, Router)
               for q, _ in nnx.to_flat_state(nnx.state(node, nnx.Param))}
    arrays, arr_shardings = {}, {}
    for path, var in flat_p.items():
        value = var_value(var)
        sh = flat_s[path]
        sh = var_value(sh) if isinstance(sh, nnx.Variable) else sh
        out.params += _shard_bytes(value.shape, value.dtype, sh)
        arrays[path] = jax.ShapeDtypeStruct(value.shape, value.dtype)
        arr_shardings[path] = sh
        key = "/".join(map(str, path))
        n = math.prod(value.shape)
        if devices > 1 and math.prod(sh.shard_shape(value.shape)) == n:
            out.replicated += n * np.dtype(value.dtype).itemsize
            if n >= 1 << 20 and tuple(path) not in routers and mesh_shape.get("model", 1) > 1:
                out.flags.append(f"replicated: {key}")
        axes = variable_logical_axes(var) or ()
        if "expert" in axes and mesh_shape.get("expert", 1) > 1:
            d = list(axes).index("expert")
            if spec_divisor(sh.spec, mesh, d) == 1:
                out.flags.append(f"experts not split: {key}")
    paths = sorted(arrays)
    tree = {str(i): arrays[p] for i, p in enumerate(paths)}
    tree_sh = {str(i): arr_shardings[p] for i, p in enumerate(paths)}
    for opt in ("adafactor", "adamw"):
        tx = make_optimizer(opt).tx
        abstract_opt = jax.eval_shape(tx.init, tree)
        opt_sh = opt_state_shardings(abstract_opt, tree, tree_sh, mesh)
        opt_leaves = jax.tree.leaves(opt_sh, is_leaf=lambda x: isinstance(x, NamedSharding))
        total = sum(_shard_bytes(a.shape, a.dtype, s) for a, s in zip(jax.tree.leaves(abstract_opt), opt_leaves))
        setattr(out, opt, total)

    # MoE buffers: the largest layer (encoder layers see the inputs, decoder layers the targets)
    batch_shards = spec_divisor(logical_to_spec(("batch",), rules, mesh), mesh, 0)
    worst = (0.0, 0.0, 0, 0, None)
    for path, node in nnx.iter_graph(model):
        if not isinstance(node, MoeLayer):
            continue
        mcfg = node.cfg
        wi = next(v for _, v in nnx.to_flat_state(nnx.state(node.experts, nnx.Param)))
        ax = variable_logical_axes(wi) or ()
        shape = var_value(wi).shape
        out.moe_layers += math.prod(n for a, n in zip(ax, shape) if a == "layers")
        length = lengths.get("inputs") if path and path[0] == "encoder" else lengths.get("targets")
        tokens = batch * int(length)
        try:
            g = num_groups(tokens, mcfg.max_group_size, batch_shards)
        except ValueError:
            out.flags.append(f"{tokens} tokens cannot form groups divisible by {batch_shards} batch shards")
            continue
        if layer_groups(mcfg, batch, int(length), batch_shards) % batch_shards:
            flag = f"set MoeConfig.group_multiple={batch_shards}"
            if flag not in out.flags:
                out.flags.append(flag)
        t = tokens // g
        e = mcfg.num_experts
        c = node.buffer_capacity(t, deterministic=False)   # the layer's own rule (train capacity factor)
        d, f = mcfg.d_model, mcfg.d_ff * (ffn_matrices(mcfg.activation) - 1)
        out.backend = resolve_backend(mcfg).value
        if not backend_class(mcfg).expert_parallel:  # one sorted [tokens * k, d] list on every device
            rows = tokens * min(mcfg.top_k, e)
            side, hidden = rows * d * act_bytes, rows * f * act_bytes
            flag = f"{out.backend} dispatch is not expert-parallel: [tokens*k, d] whole on every device"
            if flag not in out.flags:
                out.flags.append(flag)
        else:
            before = _buffer_bytes((g, e, c, d), ("batch", None, "capacity", "embed"), mesh, rules, act_bytes)
            after = _buffer_bytes((e, g, c, d), ("expert", "expert_group", "capacity", "embed"), mesh, rules, act_bytes)
            side = max(before, after)
            hidden = _buffer_bytes((e, g, c, f), ("expert", "expert_group", "capacity", "mlp"), mesh, rules, act_bytes)
        kept = None
        if out.backend == "bucket":       # residuals: each assignment's output and up-projection rows
            a = t * min(mcfg.top_k, mcfg.router_width)
            kept = (_buffer_bytes((g, a, d), ("batch", None, "embed"), mesh, rules, act_bytes)
                    + _buffer_bytes((g, a, f), ("batch", None, "mlp"), mesh, rules, act_bytes))
        if side > worst[0]:
            worst = (side, hidden, g, c, kept)
    out.dispatch, out.hidden, out.groups, out.capacity, out.kept = worst
    return out


def default_batch(cfg) -> tuple[int, dict]:
    return ENC_DEC_BATCH if isinstance(cfg, EncDecConfig) else DECODER_BATCH


def table(names: list[str], devices: int = 2048, mesh: dict | None = None) -> str:
    """The markdown table of :func:`layout` for each registered config name on ``devices``
    (``suggest_mesh``) or on one given ``mesh``."""

    rows = [HEADER]
    for n in names:
        cfg = get_config(n)
        shape = mesh or suggest_mesh(cfg, devices)
        b, lengths = default_batch(cfg)
        rows.append(layout(cfg, shape, b, lengths, name=n).row())
    return "\n".join(rows)
