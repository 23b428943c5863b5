"""moejax: a JAX/Flax NNX Mixture-of-Experts model zoo.

The MoE layer lives in :mod:`moejax.moe`; models in :mod:`moejax.models`; logical-axis sharding in
:mod:`moejax.sharding`. ``moejax.load(path, mesh=None)`` rebuilds any moejax checkpoint (a trainer
``MODEL_DIR``, a converted or compressed model) and ``moejax.save(model, path)`` writes one
(:mod:`moejax.checkpoint`; imported on first use, so ``import moejax`` stays light).
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    if name in ("load", "save"):
        from moejax import checkpoint

        return getattr(checkpoint, name)
    raise AttributeError(f"module 'moejax' has no attribute {name!r}")
