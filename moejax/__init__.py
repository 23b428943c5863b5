"""moejax: a JAX/Flax NNX Mixture-of-Experts model zoo.

The MoE layer lives in :mod:`moejax.moe`; logical-axis sharding helpers in :mod:`moejax.sharding`.
"""

__version__ = "0.1.0"
