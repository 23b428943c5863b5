"""seqio task or mixture -> feature-converted, batched numpy -> global arrays on the mesh.

Deterministic: the same ``seed`` gives the same batches in every run, and ``start_step`` skips the
batches a resumed run has already consumed. Multi-host aware: each process reads its own shard
(``seqio.ShardInfo``) and feeds it to ``jax.make_array_from_process_local_data``.
"""

from __future__ import annotations

import difflib
import functools
import math

import jax
import numpy as np
import seqio
from jax.sharding import NamedSharding

from moejax.sharding import DEFAULT_RULES, logical_to_spec, spec_divisor


def get_provider(name: str) -> seqio.DatasetProviderBase:
    """The registered seqio task or mixture; an unknown name lists close matches.

    Tasks are registered by importing their module (seqio's convention): ``import moejax.tasks``
    registers the shipped ones (the trainer and the CLI do it), ``moejax.tasks.register_text_files``
    adds a user's text files."""
    names = list(seqio.TaskRegistry.names()) + list(seqio.MixtureRegistry.names())
    if name not in names:
        close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
        hint = (f"; did you mean {', '.join(close)}?" if close else
                f"; registered: {', '.join(sorted(names)) or 'none (import moejax.tasks or your task module first)'}")
        raise ValueError(f"unknown task or mixture {name!r}{hint}")
    return seqio.get_mixture_or_task(name)


def feature_converter(provider: seqio.DatasetProviderBase, encoder_decoder: bool) -> seqio.FeatureConverter:
    """EncDec for encoder-decoder models; for decoder-only models, PrefixLM (inputs + targets in
    one causal sequence, loss on the targets only) when the task has inputs, else plain LM."""
    if encoder_decoder:
        if "inputs" not in provider.output_features:
            raise ValueError(f"task {provider.name!r} has no 'inputs' feature; encoder-decoder models need one "
                             "(use a span-corruption or input/target task)")
        return seqio.EncDecFeatureConverter(pack=False)
    if "inputs" in provider.output_features:
        return seqio.PrefixLMFeatureConverter(pack=False)
    return seqio.DecoderFeatureConverter(pack=False)


def check_lengths(lengths: dict, provider: seqio.DatasetProviderBase) -> None:
    need = set(provider.output_features)
    missing = sorted(need - set(lengths))
    if missing:
        raise ValueError(f"task_feature_lengths {lengths} lacks {missing} for {provider.name!r}")
    for k, v in lengths.items():
        if k in need and int(v) < 4:
            raise ValueError(f"task_feature_lengths[{k!r}]={v} is too short; use at least 4 tokens")


def task_names(name: str) -> list[str]:
    """The tasks of a mixture (sorted by name; a task id is an index into this list) or ``[name]``."""
    provider = get_provider(name)
    return sorted(t.name for t in provider.tasks) if isinstance(provider, seqio.Mixture) else [name]


def local_shards(data_shards: int | None = None) -> range:
    """The seqio shards this process reads: ``data_shards`` (default: one per process) split evenly
    over the processes in process order, so process ``p`` feeds rows ``[p*B/P, (p+1)*B/P)`` of the
    global batch (checked against the mesh by :func:`to_global`)."""
    pc, pi = jax.process_count(), jax.process_index()
    d = pc if data_shards is None else int(data_shards)
    if d < 1 or d % pc:
        raise ValueError(f"data_shards={data_shards} must be a positive multiple of the {pc} processes")
    return range(pi * d // pc, (pi + 1) * d // pc)


def dataset(name: str, lengths: dict, batch_size: int, *, encoder_decoder: bool, split: str = "train",
            seed: int = 0, shuffle: bool = True, repeat: bool = True, start_step: int = 0,
            with_task_ids: bool = False, data_shards: int | None = None):
    """A ``tf.data`` dataset of this process's part of each global batch (numpy dicts via
    ``as_numpy_iterator``): ``[batch_size / processes, length]`` features.

    A global batch is the concatenation of ``data_shards`` per-shard batches (``seqio.ShardInfo``;
    default one shard per process, a single unsharded stream in one process). Each process reads
    only its :func:`local_shards`, so a fixed ``data_shards`` gives the same global batches whatever
    the number of processes (1, 2, 4, ... dividing it). ``with_task_ids`` adds ``task_ids [b]``
    (the example's index in :func:`task_names`) for task-level routing; mixtures are then sampled
    here with the mixture's rates and ``seed``."""
    import tensorflow as tf

    provider = get_provider(name)
    check_lengths(lengths, provider)
    total = jax.process_count() if data_shards is None else int(data_shards)
    shards = local_shards(total)
    if batch_size % total:
        raise ValueError(f"batch_size={batch_size} is not divisible by the {total} data shards "
                         f"({jax.process_count()} processes)")

    def one(task_name, shard):
        p = get_provider(task_name)
        return seqio.get_dataset(task_name, task_feature_lengths={k: int(v) for k, v in lengths.items()
                                                                  if k in p.output_features},
                                 dataset_split=split, shuffle=shuffle, num_epochs=None if repeat else 1,
                                 feature_converter=feature_converter(p, encoder_decoder), seed=seed,
                                 shard_info=seqio.ShardInfo(shard, total) if total > 1 else None, use_cached=False)

    def stream(shard):
        if not with_task_ids:
            ds = one(name, shard)
        else:
            names = task_names(name)
            parts = [one(n, shard).map(lambda ex, i=i: {**ex, "task_ids": tf.constant(i, tf.int32)})
                     for i, n in enumerate(names)]
            if len(parts) == 1:
                ds = parts[0]
            else:
                rates = [float(provider.get_rate(get_provider(n))) for n in names]
                ds = tf.data.Dataset.sample_from_datasets(parts, weights=[r / sum(rates) for r in rates], seed=seed,
                                                          stop_on_empty_dataset=repeat)
        return ds.batch(batch_size // total, drop_remainder=repeat)

    if len(shards) == 1:
        ds = stream(shards[0])
    else:
        ds = tf.data.Dataset.zip(tuple(stream(i) for i in shards)).map(
            lambda *parts: {k: tf.concat([p[k] for p in parts], 0) for k in parts[0]})
    return ds.skip(start_step) if start_step else ds


def check_truncation(name: str, lengths: dict, split: str = "train", n: int = 32, max_fraction: float = 0.5) -> dict:
    """Sample ``n`` untrimmed examples of every input/target task of ``name``; raise when more than
    ``max_fraction`` of a feature would be cut by ``lengths``. Returns ``{feature: fraction cut}``.
    Language-modelling tasks (targets only) are exempt: cutting documents to length is their norm."""
    provider = get_provider(name)
    tasks = list(provider.tasks) if isinstance(provider, seqio.Mixture) else [provider]
    cut: dict[str, list] = {}
    for task in tasks:
        if "inputs" not in task.output_features:
            continue
        ds = task.get_dataset(None, split=split, shuffle=False, num_epochs=1, try_in_mem_cache=False)
        for ex in ds.take(n).as_numpy_iterator():
            for k in task.output_features:
                if k in lengths:
                    cut.setdefault(k, []).append(len(ex[k]) > int(lengths[k]))
    fractions = {k: float(np.mean(v)) for k, v in cut.items()}
    bad = {k: f for k, f in fractions.items() if f > max_fraction}
    if bad:
        raise ValueError(f"task_feature_lengths {lengths} are too short for {name!r}: "
                         + ", ".join(f"{100 * f:.0f}% of {k!r} would be truncated" for k, f in bad.items()))
    return fractions


def batch_sharding(mesh, rules=DEFAULT_RULES) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(("batch", "length"), rules, mesh))


def check_batch_size(batch_size: int, mesh, rules=DEFAULT_RULES, microbatches: int = 1) -> None:
    """ValueError before any data is read when the global ``batch_size`` does not split into
    ``microbatches`` equal parts over the mesh's batch shards (and the processes)."""
    shards = spec_divisor(batch_sharding(mesh, rules).spec, mesh, 0)
    need = math.lcm(shards, jax.process_count(), microbatches)
    if batch_size % need:
        parts = f"the {shards} batch shards of mesh {dict(mesh.shape)}" + (
            f" and {microbatches} microbatches" if microbatches > 1 else "")
        raise ValueError(f"BATCH_SIZE={batch_size} does not split over {parts}; use a multiple of {need}")


@functools.lru_cache(maxsize=64)
def _check_process_rows(sharding: NamedSharding, global_shape: tuple) -> None:
    """This process's devices must hold rows ``[p*B/P, (p+1)*B/P)`` of the global batch, the rows
    :func:`local_shards` reads (true for meshes built from ``jax.devices()`` in process order)."""
    pc, pi = jax.process_count(), jax.process_index()
    if pc == 1:
        return
    b = global_shape[0]
    rows = set()
    for dev, idx in sharding.devices_indices_map(global_shape).items():
        if dev.process_index == pi:
            rows.update(range(*idx[0].indices(b)))
    want = set(range(pi * b // pc, (pi + 1) * b // pc))
    if rows != want:
        raise ValueError(f"process {pi} holds batch rows {min(rows)}..{max(rows)} ({len(rows)} rows) of the "
                         f"global batch of {b} on mesh {dict(sharding.mesh.shape)}, not the contiguous block "
                         f"{pi * b // pc}..{(pi + 1) * b // pc - 1} its data shards fill; build the mesh so that "
                         "each process's devices are one block of the batch axes (e.g. moejax.mesh.create_mesh)")


def to_global(batch: dict, mesh, rules=DEFAULT_RULES) -> dict:
    """This process's numpy batch ``[b / processes, ...]`` -> global ``jax.Array``s ``[b, ...]``
    sharded over the batch axes (rank-1 features such as ``task_ids`` by rows only)."""
    sharding = batch_sharding(mesh, rules)
    shards = spec_divisor(sharding.spec, mesh, 0)
    first = np.asarray(next(iter(batch.values())))
    b = first.shape[0] * jax.process_count()
    if b % shards:
        raise ValueError(f"global batch size {b} is not divisible by the {shards} batch shards of mesh "
                         f"{dict(mesh.shape)}; use a multiple of {shards}")
    _check_process_rows(sharding, (b,) + first.shape[1:])
    row = NamedSharding(mesh, type(sharding.spec)(sharding.spec[0]))      # [b] features (task_ids)
    return {k: jax.make_array_from_process_local_data(sharding if np.ndim(v) > 1 else row, np.asarray(v))
            for k, v in batch.items()}
