"""Expert FFNs stacked on a leading expert axis (ReLU, GeLU, gated GeLU, SwiGLU; optional bias).

``split-swiglu`` is T5X's / OpenMoE's SwiGLU: the gate projection ``wi_0`` is ``2f`` wide and
``h = (g[:f] * silu(g[f:])) * (x wi_1)`` (4 matrices' worth of params per FFN, not 3).
``clamped-swiglu`` is gpt-oss's: with gate ``g = x wi_0`` and up ``u = x wi_1`` (biases added),
``g' = min(g, 7)``, ``h = (clip(u, -7, 7) + 1) * g' * sigmoid(1.702 g')``.

Shape letters (README legend): ``e`` experts, ``g`` groups, ``c`` capacity, ``z`` rows of
a sorted (ragged) list, ``d`` d_model, ``f`` d_ff.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.moe.dispatch import ExpertStages
from moejax.moe.grouped import grouped_matmul
from moejax.moe.options import QUANT_BITS, Activation, check

_ACT = {
    Activation.RELU: jax.nn.relu,
    Activation.GELU: lambda x: jax.nn.gelu(x, approximate=True),
    Activation.GELU_EXACT: lambda x: jax.nn.gelu(x, approximate=False),
    Activation.SILU: jax.nn.silu,
}


def _split_silu(g):
    half = g.shape[-1] // 2
    return g[..., :half] * jax.nn.silu(g[..., half:])


def _clamped_swiglu(g, u, limit: float = 7.0, alpha: float = 1.702):
    g = jnp.minimum(g, limit)
    return (jnp.clip(u, -limit, limit) + 1) * (g * jax.nn.sigmoid(alpha * g))


def _times_up(act):
    return lambda g, u: act(g) * u


# gated activation -> h(gate projection, up projection)
_GATED = {
    Activation.GATED_GELU: _times_up(_ACT[Activation.GELU]),
    Activation.GATED_GELU_EXACT: _times_up(_ACT[Activation.GELU_EXACT]),
    Activation.SWIGLU: _times_up(jax.nn.silu),
    Activation.SPLIT_SWIGLU: _times_up(_split_silu),
    Activation.CLAMPED_SWIGLU: _clamped_swiglu,
}


def activation_fn(name: str):
    """(activation, gated?) for an activation name: ``act(pre)`` for a plain FFN, ``act(gate, up)``
    for a gated one (the hidden activations from both projections); ValueError lists valid names."""
    check("activation", name, Activation)
    act = Activation(name)
    return (_GATED[act], True) if act in _GATED else (_ACT[act], False)


def gate_width(name: str) -> int:
    """How many ``d_ff`` widths the gate projection ``wi_0`` has (2 for ``split-swiglu``, else 1)."""
    activation_fn(name)
    return 2 if name == Activation.SPLIT_SWIGLU else 1


def ffn_matrices(name: str) -> int:
    """``d x d_ff`` matrices in one FFN of this activation (2 plain, 3 gated, 4 split-swiglu)."""
    _, gated = activation_fn(name)
    return 2 + gate_width(name) if gated else 2


def _kernel(rngs, shape, dtype, axes):
    # Fan-in of each expert's own matrix (axis -2), not of the stacked tensor.
    init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1,
                                             batch_axis=(0,))
    return nnx.Param(init(rngs.params(), shape, dtype), logical_axes=axes)


def quantize_weight(w: jax.Array, bits: int, group_size: int | None = None) -> tuple[jax.Array, jax.Array]:
    """Symmetric weight-only quantization of ``w [..., e, i, o]`` to int8 / int4.

    Scales are per output channel (``[..., e, o]``) or, with ``group_size``, per group of
    ``group_size`` input rows and output channel (``[..., e, i/group_size, o]``);
    ``q = round(w / scale)`` in ``[-(2^(bits-1)-1), 2^(bits-1)-1]``, so ``|w - q*scale| <= scale/2``.
    """
    if bits not in QUANT_BITS:
        raise ValueError(f"unsupported quantization bit width {bits}; valid: {', '.join(map(str, QUANT_BITS))}")
    qmax = 2 ** (bits - 1) - 1
    w = jnp.asarray(w, jnp.float32)
    din = w.shape[-2]
    if group_size is not None:
        if group_size < 1 or din % group_size:
            raise ValueError(f"quant_group_size={group_size} must divide the input dimension {din}")
        wg = w.reshape(w.shape[:-2] + (din // group_size, group_size, w.shape[-1]))
        scale = jnp.max(jnp.abs(wg), axis=-2) / qmax
        q = jnp.round(wg / jnp.maximum(scale, 1e-30)[..., None, :]).reshape(w.shape)
    else:
        scale = jnp.max(jnp.abs(w), axis=-2) / qmax
        q = jnp.round(w / jnp.maximum(scale, 1e-30)[..., None, :])
    dtype = jnp.int8 if bits == 8 else jnp.int4
    return jnp.clip(q, -qmax, qmax).astype(dtype), scale


def dequantize_weight(q: jax.Array, scale: jax.Array, group_size: int | None, dtype=jnp.float32) -> jax.Array:
    """Inverse of :func:`quantize_weight` (up to rounding)."""
    qf = q.astype(jnp.float32)
    if group_size is None:
        return (qf * scale[..., None, :]).astype(dtype)
    din = q.shape[-2]
    qg = qf.reshape(q.shape[:-2] + (din // group_size, group_size, q.shape[-1]))
    return (qg * scale[..., None, :]).reshape(q.shape).astype(dtype)


def _scale_axes(axes, group_size):
    return (axes[0], None, axes[2]) if group_size is not None else (axes[0], axes[2])


class Experts(nnx.Module):
    """``E`` independent FFNs ``wo(act(x wi))`` (or ``wo(act(x wi_0) * x wi_1)`` when gated).

    Params: ``wi`` / ``wi_0``, ``wi_1`` ``[e, d, f]`` (logical ``(expert_axis, 'embed', 'mlp')``),
    ``wo [e, f, d]``, optional biases ``bi [e, f]``, ``bo [e, d]``.
    """

    def __init__(self, num_experts: int, d_model: int, d_ff: int, *, activation: str = "relu",
                 use_bias: bool = False, dropout: float = 0.0, dtype=jnp.float32,
                 param_dtype=jnp.float32, expert_axis: str = "expert", quant_bits: int | None = None,
                 quant_group_size: int | None = None, grouped_matmul: str = "auto", rngs: nnx.Rngs):
        self.act, self.gated = activation_fn(activation)
        self.grouped_matmul = grouped_matmul
        self.quant_bits, self.quant_group_size = quant_bits, quant_group_size
        self.num_experts, self.dtype = num_experts, dtype
        ea = expert_axis
        up_axes, down_axes = (ea, "embed", "mlp"), (ea, "mlp", "embed")
        if self.gated:
            self.wi_0 = _kernel(rngs, (num_experts, d_model, d_ff * gate_width(activation)), param_dtype, up_axes)
            self.wi_1 = _kernel(rngs, (num_experts, d_model, d_ff), param_dtype, up_axes)
        else:
            self.wi = _kernel(rngs, (num_experts, d_model, d_ff), param_dtype, up_axes)
        self.wo = _kernel(rngs, (num_experts, d_ff, d_model), param_dtype, down_axes)
        if use_bias:
            up_width = d_ff * gate_width(activation) if self.gated else d_ff
            self.bi = nnx.Param(jnp.zeros((num_experts, up_width), param_dtype), logical_axes=(ea, "mlp"))
            if self.gated:
                self.bi_1 = nnx.Param(jnp.zeros((num_experts, d_ff), param_dtype), logical_axes=(ea, "mlp"))
            self.bo = nnx.Param(jnp.zeros((num_experts, d_model), param_dtype), logical_axes=(ea, "embed"))
        self.use_bias = use_bias
        self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout > 0 else None
        if quant_bits is not None:
            for name in self.weight_names():
                w = getattr(self, name)
                q, scale = quantize_weight(w[...], quant_bits, quant_group_size)
                axes = w.get_metadata()["logical_axes"]
                setattr(self, name, nnx.Param(q, logical_axes=axes))
                setattr(self, name + "_scale", nnx.Param(scale, logical_axes=_scale_axes(axes, quant_group_size)))

    def weight_names(self) -> tuple[str, ...]:
        return ("wi_0", "wi_1", "wo") if self.gated else ("wi", "wo")

    def _p(self, name):
        """Weight ``name`` in the compute dtype (dequantized when the experts are quantized)."""
        if self.quant_bits is not None and name in self.weight_names():
            return dequantize_weight(getattr(self, name)[...], getattr(self, name + "_scale")[...],
                                     self.quant_group_size, self.dtype)
        return getattr(self, name)[...].astype(self.dtype)

    def _mm(self, spec: str, x: jax.Array, name: str) -> jax.Array:
        """``einsum(spec, x, W)`` with ``spec`` ``'end,edf->enf'``-shaped; for quantized weights
        the dequantization is fused: int weights are cast, the per-channel scale multiplies the
        output (per-group scales multiply each group's partial sums)."""
        if self.quant_bits is None or name not in self.weight_names():
            return jnp.einsum(spec, x, self._p(name))
        q, scale = getattr(self, name)[...], getattr(self, name + "_scale")[...].astype(self.dtype)
        if self.quant_group_size is None:
            return jnp.einsum(spec, x, q.astype(self.dtype)) * scale[:, None, :]
        e, din, dout = q.shape
        gs = self.quant_group_size
        xg = x.reshape(x.shape[0], x.shape[1], din // gs, gs)
        part = jnp.einsum("engs,egsf->engf", xg, q.reshape(e, din // gs, gs, dout).astype(self.dtype))
        return jnp.sum(part * scale[:, None], axis=2)

    def _hidden(self, up, up_gate, deterministic, rngs):
        """up: x@wi (or x@wi_0), up_gate: x@wi_1 (gated only) -> hidden activations."""
        h = self.act(up, up_gate) if self.gated else self.act(up)
        if self.dropout is not None:
            h = self.dropout(h, deterministic=deterministic, rngs=rngs)
        return h

    def up(self, x: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        """Up projections of the buffer form: ``x [e, n, d]`` -> ``(up [e, n, f'], gate [e, n, f] or
        None)`` (``x wi`` or ``x wi_0``, and ``x wi_1`` when gated; biases added)."""
        x = x.astype(self.dtype)
        if self.gated:
            up = self._mm("end,edf->enf", x, "wi_0")
            gate = self._mm("end,edf->enf", x, "wi_1")
            if self.use_bias:
                up = up + self._p("bi")[:, None]
                gate = gate + self._p("bi_1")[:, None]
            return up, gate
        up = self._mm("end,edf->enf", x, "wi")
        if self.use_bias:
            up = up + self._p("bi")[:, None]
        return up, None

    def down(self, pre: tuple[jax.Array, jax.Array | None], *, deterministic: bool = True,
             rngs: nnx.Rngs | None = None) -> jax.Array:
        """Activation, hidden dropout and down projection: :meth:`up`'s ``pre`` -> ``[e, n, d]``."""
        h = self._hidden(pre[0], pre[1], deterministic, rngs)
        y = self._mm("enf,efd->end", h, "wo")
        if self.use_bias:
            y = y + self._p("bo")[:, None]
        return y

    def __call__(self, x: jax.Array, *, deterministic: bool = True, rngs: nnx.Rngs | None = None) -> jax.Array:
        """Buffer form: ``x [e, ..., d]`` (expert ``i`` applied to ``x[i]``) -> ``[e, ..., d]``."""
        e = x.shape[0]
        lead = x.shape[1:-1]
        y = self.down(self.up(x.reshape(e, -1, x.shape[-1])), deterministic=deterministic, rngs=rngs)
        return y.reshape(e, *lead, y.shape[-1])

    def ragged(self, x: jax.Array, group_sizes: jax.Array, *, deterministic: bool = True,
               rngs: nnx.Rngs | None = None) -> jax.Array:
        """Grouped-matmul form: ``x [z, d]`` sorted by expert, ``group_sizes [e]`` -> ``[z, d]``.

        Rows past ``sum(group_sizes)`` come out as zeros. Uses :func:`moejax.moe.grouped.grouped_matmul`
        (``jax.lax.ragged_dot``, or Megablox on TPU).
        """
        def gmm(a, name):
            return grouped_matmul(a, self._p(name), group_sizes, self.grouped_matmul)

        x = x.astype(self.dtype)
        rows = jnp.arange(x.shape[0])
        if self.use_bias:
            expert_of_row = jnp.searchsorted(jnp.cumsum(group_sizes), rows, side="right")
            valid = (rows < jnp.sum(group_sizes))[:, None]
            expert_of_row = jnp.minimum(expert_of_row, self.num_experts - 1)
        if self.gated:
            up = gmm(x, "wi_0")
            gate = gmm(x, "wi_1")
            if self.use_bias:
                up = up + self._p("bi")[expert_of_row] * valid
                gate = gate + self._p("bi_1")[expert_of_row] * valid
        else:
            up = gmm(x, "wi")
            gate = None
            if self.use_bias:
                up = up + self._p("bi")[expert_of_row] * valid
        h = self._hidden(up, gate, deterministic, rngs)
        y = gmm(h, "wo")
        if self.use_bias:
            y = y + self._p("bo")[expert_of_row] * valid
        return y


class DenseFFN(nnx.Module):
    """The one dense FFN ``[..., d] -> [..., d]``: ``wo(act(x wi + bi)) + bo``, or gated
    ``wo(act(x wi_0 + bi) * (x wi_1 + bi_1)) + bo`` (same activations as :class:`Experts`). Used as
    the dense blocks' FFN and as an MoE layer's always-on shared experts.

    Params: ``wi`` / ``wi_0``, ``wi_1`` ``[d, f]`` (``wi_0`` is ``2f`` wide for ``split-swiglu``;
    logical ``('embed', 'mlp')``), ``wo [f, d]``, optional biases ``bi``, ``bi_1``, ``bo``; kernels
    fan-in truncated-normal.
    """

    def __init__(self, d_model: int, d_ff: int, *, activation: str = "relu", use_bias: bool = False,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.act, self.gated = activation_fn(activation)
        init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")

        def param(shape, axes, fn=init):
            return nnx.Param(fn(rngs.params(), shape, param_dtype), logical_axes=axes)

        up_width = d_ff * gate_width(activation) if self.gated else d_ff
        if self.gated:
            self.wi_0 = param((d_model, up_width), ("embed", "mlp"))
            self.wi_1 = param((d_model, d_ff), ("embed", "mlp"))
        else:
            self.wi = param((d_model, d_ff), ("embed", "mlp"))
        self.wo = param((d_ff, d_model), ("mlp", "embed"))
        self.use_bias = use_bias
        if use_bias:
            zeros = nnx.initializers.zeros
            self.bi = param((up_width,), ("mlp",), zeros)
            if self.gated:
                self.bi_1 = param((d_ff,), ("mlp",), zeros)
            self.bo = param((d_model,), ("embed",), zeros)
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        dt = self.dtype
        x = x.astype(dt)
        w = lambda name: getattr(self, name)[...].astype(dt)
        up = x @ w("wi_0" if self.gated else "wi")
        if self.use_bias:
            up = up + w("bi")
        if self.gated:
            gate = x @ w("wi_1")
            h = self.act(up, gate + w("bi_1") if self.use_bias else gate)
        else:
            h = self.act(up)
        y = h @ w("wo")
        return y + w("bo") if self.use_bias else y


def expert_output_mask(out: jax.Array, rate: float, deterministic: bool, rngs: nnx.Rngs | None) -> jax.Array:
    """NLLB "expert output masking" as transformers implements it: element-wise inverted dropout
    (``rate``, RNG stream ``dropout``) on the experts' output in training, ``out * (1 - rate)`` in
    eval; the identity when ``rate == 0``."""
    if rate == 0.0:
        return out
    if deterministic:
        return out * (1.0 - rate)
    keep = jax.random.bernoulli(rngs.dropout(), 1.0 - rate, out.shape)
    return jnp.where(keep, out / (1.0 - rate), 0.0).astype(out.dtype)


class FFNCall:
    """The :class:`moejax.moe.dispatch.ExpertCall` of plain :class:`Experts` for one layer call
    (binds ``deterministic``, ``rngs`` and the expert output masking rate)."""

    def __init__(self, experts: Experts, *, eom_rate: float, deterministic: bool, rngs: nnx.Rngs | None):
        self.experts, self.eom_rate, self.deterministic, self.rngs = experts, eom_rate, deterministic, rngs

    def buffers(self, buf: jax.Array, slot_mask: jax.Array) -> jax.Array:
        """``buf [e, g, c, d]`` -> ``[e, g, c, d]``; FFN experts compute empty slots too (their
        rows are zero and are never combined), so ``slot_mask`` is not needed here."""
        out = self.experts(buf, deterministic=self.deterministic, rngs=self.rngs)
        return expert_output_mask(out, self.eom_rate, self.deterministic, self.rngs)

    def sorted_rows(self, xs: jax.Array, group_sizes: jax.Array) -> jax.Array:
        out = self.experts.ragged(xs, group_sizes, deterministic=self.deterministic, rngs=self.rngs)
        return expert_output_mask(out, self.eom_rate, self.deterministic, self.rngs)

    def stages(self) -> ExpertStages:
        """The experts as pure functions of their float params (integer weights and RNG state in
        ``rest``); a dropout / expert-output-masking key is drawn here once when training."""
        graphdef, params, rest = nnx.split(self.experts, _float_param, ...)
        stochastic = not self.deterministic and (self.experts.dropout is not None or self.eom_rate > 0)
        key = self.rngs.dropout() if stochastic and self.rngs is not None else None
        det, rate = self.deterministic or key is None, self.eom_rate

        def up(p, r, buf):
            return nnx.merge(graphdef, p, r).up(buf)

        def down(p, r, pre, k):
            m = nnx.merge(graphdef, p, r)
            rngs = None if k is None else nnx.Rngs(dropout=jax.random.fold_in(k, 0))
            out = m.down(pre, deterministic=det, rngs=rngs)
            eom_rngs = None if k is None else nnx.Rngs(dropout=jax.random.fold_in(k, 1))
            return expert_output_mask(out, rate, self.deterministic, eom_rngs)

        return ExpertStages(params, rest, up, down, key, jnp.dtype(self.experts.dtype))


def _float_param(path, value) -> bool:
    """nnx filter: a floating-point Param (a differentiable expert weight)."""
    return isinstance(value, nnx.Param) and jnp.issubdtype(jnp.asarray(value[...]).dtype, jnp.floating)
