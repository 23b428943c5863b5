"""Build a moejax model from a Hugging Face directory, streaming: abstract model, then each
parameter read from the memory-mapped safetensors straight into its sharding.

Peak host memory stays near one stacked parameter (plus, on CPU, the converted model itself,
since CPU "devices" are host memory), not the checkpoint read whole: see ``benchmarks/convert.py``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax.convert.fp8 import fp8_view
from moejax.convert.mapping import sharded_params
from moejax.convert.safetensors_io import LazyWeights, read_hf_config
from moejax.models.build import build_model
from moejax.models.config import with_dtypes
from moejax.sharding import DEFAULT_RULES, Rules


def checkpoint_dtype(weights: LazyWeights) -> np.dtype:
    """The floating dtype holding most of the checkpoint's bytes (bf16 for real MoE checkpoints)."""
    nbytes: Counter = Counter()
    for name in weights:
        dt = weights.dtype(name)
        if jnp.issubdtype(dt, jnp.floating):
            nbytes[dt] += int(np.prod(weights.shape(name), dtype=np.int64)) * dt.itemsize
    return jnp.dtype(nbytes.most_common(1)[0][0]) if nbytes else jnp.dtype(jnp.float32)


def build_from_hf(path: str, config_from_hf: Callable, hf_to_state: Callable, *, mesh=None,
                  rules: Rules = DEFAULT_RULES, dtype=None, compute_dtype=None, ignore_fields=(), seed: int = 0,
                  **overrides):
    """``(model, cfg)`` of the HF directory ``path`` through one family's ``config_from_hf`` /
    ``hf_to_state``.

    ``mesh``: every parameter is created in its sharding under ``rules`` (nothing whole on one
    device); without it, on the default device. ``dtype``: the parameters' dtype (default: the
    checkpoint's own, e.g. bfloat16, unless ``param_dtype=`` is among ``overrides``).
    ``compute_dtype``: the activations' dtype (default: the config's, float32). ``ignore_fields``:
    unknown ``config.json`` fields to accept (see :mod:`moejax.convert.fields`). ``seed``: the
    dropout / router-noise RNG streams. ``overrides``: config fields to replace.
    """
    hf = read_hf_config(path)
    try:
        config_from_hf(hf, ignore_fields=ignore_fields, **overrides)   # a wrong model fails before the weights
    except KeyError as e:
        raise ValueError(f"{path}/config.json lacks the field {e.args[0]!r}, which a model_type="
                         f"{hf.get('model_type')!r} config needs") from None
    except TypeError as e:
        raise ValueError(f"{path}/config.json has a field of the wrong type ({str(e).splitlines()[0]})") from None
    weights = fp8_view(hf, LazyWeights(path))          # headers only: nothing is read yet
    cfg = config_from_hf(hf, ignore_fields=ignore_fields, weights=weights, **overrides)
    if dtype is None and "param_dtype" not in overrides:
        dtype = checkpoint_dtype(weights)
    cfg = with_dtypes(cfg, dtype=compute_dtype, param_dtype=dtype).validate()
    flat = hf_to_state(cfg, weights)
    factory = lambda: build_model(cfg, nnx.Rngs(seed))  # noqa: E731
    graphdef, abstract_params, _ = nnx.split(nnx.eval_shape(factory), nnx.Param, ...)
    params = sharded_params(abstract_params, flat, mesh, rules)
    # the non-param state (RNG streams); XLA drops the param initialisers it does not need
    rest = jax.jit(lambda: nnx.split(factory(), nnx.Param, ...)[2])()
    return nnx.merge(graphdef, params, rest), cfg
