"""Distillation of an MoE teacher into a dense student (Switch Transformer, Fedus et al. sec. 5).

The student is trained by the ordinary trainer with ``TrainConfig.teacher_checkpoint`` set: the
loss becomes ``alpha * T^2 KL(teacher_T || student_T) + (1 - alpha) * CE(labels)`` (see
:func:`moejax.training.loss.loss_fn`). :func:`init_student_from_teacher` starts the student from
the teacher's non-expert weights where the shapes allow (the paper's Table 6): embeddings,
attention, norms, the dense FFNs of the teacher's dense blocks; the FFNs at the teacher's sparse
positions are either the student's fresh init (``expert_init='random'``) or the mean of that
layer's experts (``'mean'``).
"""

from __future__ import annotations

import jax
import numpy as np

from moejax.tree import flatten, path_key


def init_student_from_teacher(student_params, teacher_params, expert_init: str = "random"):
    """``student_params`` (dense, one block per period) with every shape-compatible teacher weight
    copied in; returns ``(params, copied, total)`` leaf counts."""
    if expert_init not in ("random", "mean"):
        raise ValueError(f"unknown expert_init {expert_init!r}; valid: 'random', 'mean'")
    teacher = flatten(teacher_params)
    t_keys = list(teacher)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(student_params)
    out, copied = [], 0
    for path, fresh in leaves:
        key = path_key(path)
        value = None
        if "blocks" in key:
            i = key.index("blocks")
            rest = key[i + 2:]
            blocks = sorted({int(k[i + 1]) for k in t_keys if k[:i + 1] == key[:i + 1] and len(k) > i + 1})
            period = len(blocks)
            if period:
                layers = []
                for layer in range(fresh.shape[0]):
                    j, p = layer % period, layer // period
                    src = key[:i + 1] + (str(j),) + rest
                    if src in teacher and np.shape(teacher[src])[1:] == fresh.shape[1:]:
                        layers.append(np.asarray(teacher[src])[p])
                    elif expert_init == "mean" and rest[:1] == ("ffn",):
                        esrc = key[:i + 1] + (str(j), "ffn", "experts") + rest[1:]
                        layers.append(np.asarray(teacher[esrc])[p].mean(0) if esrc in teacher else
                                      np.asarray(fresh[layer]))
                    else:
                        layers.append(np.asarray(fresh[layer]))
                        continue
                    copied += 1 / fresh.shape[0]
                value = np.stack(layers)
        elif key in teacher and np.shape(teacher[key]) == fresh.shape:
            value = np.asarray(teacher[key])
            copied += 1
        out.append(fresh if value is None else jax.device_put(value.astype(fresh.dtype), fresh.sharding))
    return jax.tree_util.tree_unflatten(treedef, out), copied, len(leaves)
