"""KV-cached decoding for decoder-only models with static shapes under ``jit``, and scoring.

Shape letters (README legend): ``b`` batch, ``p`` prompt
length, ``n`` new tokens, ``v`` vocab.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def _sample(logits: jax.Array, rng: jax.Array, temperature: float, top_p: float) -> jax.Array:
    """``logits [b, v]`` -> ``[b]`` int32: argmax when temperature == 0, else nucleus sampling."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # smallest set whose mass reaches top_p: keep sorted entries whose preceding mass < top_p
        keep_sorted = (cum - jax.nn.softmax(sorted_logits, axis=-1)) < top_p
        cutoff = jnp.min(jnp.where(keep_sorted, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits >= cutoff, logits, -jnp.inf)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def _check_args(max_new_tokens, temperature, top_p, rng):
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1; got temperature={temperature}, top_p={top_p}")
    if temperature > 0 and rng is None:
        raise ValueError("sampling (temperature > 0) needs an rng key")
    return jax.random.key(0) if rng is None else rng


def generate(model, prompt: jax.Array, max_new_tokens: int, *, temperature: float = 0.0, top_p: float = 1.0,
             rng: jax.Array | None = None, prompt_mask: jax.Array | None = None,
             task_ids: jax.Array | None = None) -> jax.Array:
    """Decode ``max_new_tokens`` after ``prompt [b, p]`` -> ``[b, p + n]`` int32.

    One jitted program: a prefill of the prompt into a static KV cache of length ``p + n``, then a
    ``lax.scan`` of single-token steps. ``temperature == 0`` is greedy; otherwise temperature /
    nucleus (``top_p``) sampling with ``rng``. ``prompt_mask [b, p]`` marks real prompt tokens
    (left padding). MoE layers route each step's tokens as their own group, so capacity-limited
    (non-dropless) models may drop differently than in a full-sequence pass. ``task_ids [b]``:
    task-level routing.
    """
    rng = _check_args(max_new_tokens, temperature, top_p, rng)
    b, p = prompt.shape
    mask = jnp.ones((b, p), bool) if prompt_mask is None else prompt_mask.astype(bool)
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, prompt, mask, rng, task_ids):
        m = nnx.merge(graphdef, state)
        caches = m.init_cache(b, p + max_new_tokens)
        # positions count real tokens only, so left padding does not shift the rotary phases
        pos = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)
        logits, _, caches = m.apply_with_cache(prompt, caches, positions=pos, padding_mask=mask, task_ids=task_ids)
        rng, sub = jax.random.split(rng)
        first = _sample(logits[:, -1], sub, temperature, top_p)
        next_pos = pos[:, -1] + 1

        def step(carry, _):
            tok, caches, position, rng = carry
            logits, _, caches = m.apply_with_cache(tok[:, None], caches, positions=position[:, None],
                                                   padding_mask=jnp.ones((b, 1), bool), task_ids=task_ids)
            rng, sub = jax.random.split(rng)
            nxt = _sample(logits[:, -1], sub, temperature, top_p)
            return (nxt, caches, position + 1, rng), tok

        (last, _, _, _), toks = jax.lax.scan(step, (first, caches, next_pos, rng), None, length=max_new_tokens - 1)
        new = jnp.concatenate([jnp.swapaxes(toks, 0, 1), last[:, None]], axis=1)  # toks is [0, b] when n == 1
        return jnp.concatenate([prompt.astype(jnp.int32), new], axis=1)

    return run(state, prompt, mask, rng, task_ids)


def generate_encdec(model, encoder_ids: jax.Array, max_new_tokens: int, *, start_id: int,
                    encoder_mask: jax.Array | None = None, temperature: float = 0.0, top_p: float = 1.0,
                    rng: jax.Array | None = None, task_ids: jax.Array | None = None) -> jax.Array:
    """Encoder-decoder decoding: encode once, then cached single-token decoder steps in a
    ``lax.scan``, starting from ``start_id`` (T5: 0, NLLB: eos=2). Returns ``[b, n]`` int32 (the
    start token excluded). Same sampling options as :func:`generate`."""
    rng = _check_args(max_new_tokens, temperature, top_p, rng)
    b, t = encoder_ids.shape
    emask = jnp.ones((b, t), bool) if encoder_mask is None else encoder_mask.astype(bool)
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, encoder_ids, emask, rng, task_ids):
        m = nnx.merge(graphdef, state)
        enc, _ = m.encode(encoder_ids, emask, task_ids=task_ids)
        caches = m.init_cache(b, max_new_tokens)

        def step(carry, _):
            tok, caches, rng = carry
            logits, _, caches = m.decode(enc, emask, tok[:, None], caches=caches, task_ids=task_ids)
            rng, sub = jax.random.split(rng)
            nxt = _sample(logits[:, -1], sub, temperature, top_p)
            return (nxt, caches, rng), nxt

        start = jnp.full((b,), start_id, jnp.int32)
        _, toks = jax.lax.scan(step, (start, caches, rng), None, length=max_new_tokens)
        return jnp.swapaxes(toks, 0, 1)

    return run(state, encoder_ids, emask, rng, task_ids)


def score(model, inputs: jax.Array, targets: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Log-likelihood of ``targets [b, s]`` given teacher-forced ``inputs [b, s]`` -> ``[b]``
    (summed over positions where ``mask`` is True)."""
    logits, _ = model(inputs)
    logp = jax.nn.log_softmax(logits, axis=-1)
    ll = jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    if mask is not None:
        ll = ll * mask
    return jnp.sum(ll, axis=-1)
