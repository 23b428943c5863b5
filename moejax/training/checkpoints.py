"""The trainer's side of checkpointing: ``MODEL_DIR`` records which model it holds.

The format itself (``model_config.json`` + ``checkpoints/<step>/{params,opt_state,step}``), the
:class:`~moejax.checkpoint.Checkpointer` and :func:`moejax.load` live in :mod:`moejax.checkpoint`.
"""

from __future__ import annotations

import os

from moejax.checkpoint import CONFIG_FILE, read_config, write_config
from moejax.distributed import barrier, is_primary
from moejax.models.config import RUNTIME_FIELDS, config_diff


def _show(v) -> str:
    name = getattr(v, "name", None) or getattr(v, "__name__", None)
    return str(name) if name is not None and not isinstance(v, (str, int, float)) else repr(v)


def check_model_dir(model_dir: str, model_cfg) -> None:
    """Record ``model_cfg`` in ``model_dir``; refuse a directory holding another model's checkpoints,
    naming the fields that differ. A config differing only in how it computes
    (:data:`moejax.models.config.RUNTIME_FIELDS`: compute dtype, remat, kernels) resumes, and the
    record is updated. In a multi-process run process 0 writes the record and the others wait."""
    os.makedirs(model_dir, exist_ok=True)
    write = not os.path.exists(os.path.join(model_dir, CONFIG_FILE))
    if not write:                                 # (or just written by process 0 of this run)
        saved = read_config(model_dir)
        diff = config_diff(saved, model_cfg)
        shown = ", ".join(f"{k} {_show(a)} -> {_show(b)}" for k, a, b in diff[:4]) + (
            f", and {len(diff) - 4} more" if len(diff) > 4 else "")
        if any(k.rsplit(".", 1)[-1] not in RUNTIME_FIELDS for k, _, _ in diff):
            raise ValueError(f"MODEL_DIR {model_dir!r} holds checkpoints of another model ({shown}); use a new "
                             "MODEL_DIR, or INITIAL_CHECKPOINT_PATH to start from it")
        if diff:
            print(f"resuming {model_dir} with other execution settings ({shown}); the parameters are unchanged")
            write = True
    if write and is_primary():
        write_config(model_dir, model_cfg)
    barrier("moejax_check_model_dir")             # every process, whichever branch it took
