"""Plainly written reference MoE: Python loops over groups, choices, tokens and experts.

Routing decisions are made in numpy on concrete values (they are piecewise constant in the
inputs); the output is then rebuilt from those decisions with differentiable jnp ops so that
gradients can be compared too. Documented drop rule: for choice j = 0..k-1 in turn, tokens in
group order (or descending top-1 probability with BPR) take the next free slot of their j-th
expert; when an expert already holds C tokens, the assignment is dropped.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def ref_num_groups(n, max_group_size, multiple=1):
    g = max(1, math.ceil(n / max_group_size))
    while n % g or g % multiple:
        g += 1
    return g


def ref_capacity(t, e, cf, k, min_cap):
    return max(math.ceil(cf * k * t / e), min_cap)


def softmax_np(z):
    z = z - z.max(-1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(-1, keepdims=True)


def route_top_k(probs, k, capacity, mask, keep2=None, second=None, bpr=False):
    """probs [t, e] numpy -> list of (token, expert, choice, routed, kept)."""
    t, e = probs.shape
    choices = []
    for i in range(t):
        order = sorted(range(e), key=lambda j: (-probs[i, j], j))
        sel = order[:k]
        if second is not None:
            sel = [order[0], int(second[i])]
        choices.append(sel)
    token_order = list(range(t))
    if bpr:
        token_order = sorted(range(t), key=lambda i: (-probs[i].max(), i))
    fill = [0] * e
    out = []
    for j in range(k):
        for i in token_order:
            ex = choices[i][j]
            routed = bool(mask[i]) and (j != 1 or keep2 is None or bool(keep2[i]))
            kept = False
            if routed and fill[ex] < capacity:
                fill[ex] += 1
                kept = True
            out.append((i, ex, j, routed, kept))
    return out


def scores_np(logits, cfg, bias=None):
    """numpy ``[t, e]`` expert scores ``s`` (softmax or sigmoid) and the selection scores: ``s +
    bias``, with experts outside the ``top_k_groups`` best groups set to -inf (DeepSeek routing),
    one token and one group at a time."""
    sig = getattr(cfg, "router_score", "softmax") == "sigmoid"
    s = 1.0 / (1.0 + np.exp(-logits)) if sig else softmax_np(logits)
    sel = s + (0.0 if bias is None else np.asarray(bias, np.float64))
    n = getattr(cfg, "num_expert_groups", 1)
    if n > 1:
        t, e = s.shape
        m = e // n
        for i in range(t):
            blocks = [sel[i, j * m:(j + 1) * m] for j in range(n)]
            score = [max(bl) if cfg.group_score == "max" else sum(sorted(bl)[-2:]) for bl in blocks]
            keep = sorted(range(n), key=lambda j: (-score[j], j))[:cfg.top_k_groups]
            for j in range(n):
                if j not in keep:
                    sel[i, j * m:(j + 1) * m] = -np.inf
    return s, sel


def route_expert_choice(probs, capacity, mask):
    t, e = probs.shape
    c = min(capacity, t)
    out = []
    for ex in range(e):
        score = np.where(mask, probs[:, ex], -1.0)
        top = sorted(range(t), key=lambda i: (-score[i], i))[:c]
        for i in top:
            out.append((i, ex, 0, bool(mask[i]), bool(mask[i])))
    return out


def expert_apply(params, ex, v, activation):
    """One expert on one token vector ``v [d]``."""
    if activation == "split-swiglu":
        # OpenMoE / T5X: gate projection 2f wide, split in halves: (g1 * silu(g2)) * up
        g = v @ params["wi_0"][ex] + (params["bi"][ex] if "bi" in params else 0.0)
        up = v @ params["wi_1"][ex] + (params["bi_1"][ex] if "bi" in params else 0.0)
        f = up.shape[-1]
        h = g[:f] * (g[f:] * jax.nn.sigmoid(g[f:])) * up
    elif activation == "clamped-swiglu":        # gpt-oss
        g = v @ params["wi_0"][ex] + (params["bi"][ex] if "bi" in params else 0.0)
        u = v @ params["wi_1"][ex] + (params["bi_1"][ex] if "bi" in params else 0.0)
        g = jnp.minimum(g, 7.0)
        h = (jnp.clip(u, -7.0, 7.0) + 1.0) * g * jax.nn.sigmoid(1.702 * g)
    elif activation in ("gated-gelu", "swiglu"):
        act = jax.nn.silu if activation == "swiglu" else (lambda z: jax.nn.gelu(z, approximate=True))
        h = act(v @ params["wi_0"][ex]) * (v @ params["wi_1"][ex])
        if "bi" in params:
            h = act(v @ params["wi_0"][ex] + params["bi"][ex]) * (v @ params["wi_1"][ex] + params["bi_1"][ex])
    else:
        act = {"relu": jax.nn.relu, "gelu": lambda z: jax.nn.gelu(z, approximate=True), "silu": jax.nn.silu}[activation]
        pre = v @ params["wi"][ex]
        if "bi" in params:
            pre = pre + params["bi"][ex]
        h = act(pre)
    y = h @ params["wo"][ex]
    if "bo" in params:
        y = y + params["bo"][ex]
    return y


def ref_moe(params, x, cfg, *, deterministic=True, padding_mask=None, keep2=None, second=None):
    """Reference forward. params: dict with 'router' [d, e] and expert weights [e, ...].

    keep2 / second: optional per-flat-token arrays for the random / sampling policies.
    Returns (y [b, s, d], decisions per group).
    """
    b, s, d = x.shape
    n = b * s
    g = ref_num_groups(n, cfg.max_group_size, cfg.group_multiple)
    t = n // g
    cf = cfg.capacity_factor_eval if deterministic else cfg.capacity_factor_train
    cap = t if cfg.dropless else ref_capacity(t, cfg.num_experts, cf, cfg.top_k, cfg.min_capacity)
    mask = np.ones((n,), bool) if padding_mask is None else np.asarray(padding_mask).reshape(n)
    xf = x.reshape(n, d)
    decisions = []
    for gi in range(g):
        sl = slice(gi * t, (gi + 1) * t)
        logits = np.asarray(xf[sl], np.float64) @ np.asarray(params["router"], np.float64)
        probs = softmax_np(logits)
        if getattr(cfg, "deepseek_routing", False):
            probs = scores_np(logits, cfg, params.get("selection_bias"))[1]
        if cfg.router == "expert_choice":
            dec = route_expert_choice(probs, cap, mask[sl])
        else:
            dec = route_top_k(probs, cfg.top_k, cap, mask[sl],
                              None if keep2 is None else keep2[sl], None if second is None else second[sl],
                              cfg.batch_prioritized)
        decisions.append(dec)

    def forward(params, x):
        xf = x.reshape(n, d)
        ys = []
        for gi in range(g):
            xs = xf[gi * t:(gi + 1) * t]
            logits = xs.astype(jnp.float32) @ params["router"].astype(jnp.float32)
            sig = getattr(cfg, "router_score", "softmax") == "sigmoid"
            probs = jax.nn.sigmoid(logits) if sig else jax.nn.softmax(logits, axis=-1)
            scale = getattr(cfg, "routed_scale", 1.0)
            y = jnp.zeros((t, d), jnp.float32)
            per_tok = {}
            for (i, ex, j, routed, kept) in decisions[gi]:
                per_tok.setdefault(i, []).append((ex, j, routed, kept))
            for i, lst in per_tok.items():
                gates = [probs[i, ex] for (ex, _, _, _) in lst]
                for (ex, _j, _routed, kept), gate in zip(lst, gates):
                    if not kept:
                        continue
                    if cfg.weight_norm == "topk":
                        w = gate / sum(gates)
                    elif cfg.weight_norm == "kept":
                        w = gate / jnp.maximum(sum(gg for (_, _, _, kk), gg in zip(lst, gates) if kk), 1.1920929e-07)
                    else:
                        w = gate
                    y = y.at[i].add(scale * w * expert_apply(params, ex, xs[i].astype(jnp.float32), cfg.activation))
            ys.append(y)
        return jnp.concatenate(ys).reshape(b, s, d)

    return forward, decisions


def layer_params(layer):
    """Pull a MoeLayer's weights into the reference's plain dict."""
    p = {"router": layer.router.kernel[...]}
    if getattr(layer.router, "selection_bias", None) is not None:
        p["selection_bias"] = layer.router.selection_bias[...]
    for name in ("wi", "wi_0", "wi_1", "wo", "bi", "bi_1", "bo"):
        if hasattr(layer.experts, name):
            p[name] = getattr(layer.experts, name)[...]
    return p
