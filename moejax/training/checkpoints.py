"""The trainer's side of checkpointing: ``MODEL_DIR`` records which model it holds.

The format itself (``model_config.json`` + ``checkpoints/<step>/{params,opt_state,step}``), the
:class:`~moejax.checkpoint.Checkpointer` and :func:`moejax.load` live in :mod:`moejax.checkpoint`.
"""

from __future__ import annotations

import os

from moejax.checkpoint import CONFIG_FILE, read_config, write_config
from moejax.distributed import barrier, is_primary


def check_model_dir(model_dir: str, model_cfg) -> None:
    """Record ``model_cfg`` in ``model_dir``; refuse a directory holding another model's checkpoints.
    In a multi-process run process 0 writes the record and the others wait for it."""
    os.makedirs(model_dir, exist_ok=True)
    if os.path.exists(os.path.join(model_dir, CONFIG_FILE)):  # (or just written by process 0 of this run)
        saved = read_config(model_dir)
        if saved != model_cfg:
            raise ValueError(f"MODEL_DIR {model_dir!r} holds checkpoints of another model ({type(saved).__name__} "
                             f"d_model={getattr(saved, 'd_model', '?')}, vocab={getattr(saved, 'vocab_size', '?')}); "
                             "use a new MODEL_DIR, or INITIAL_CHECKPOINT_PATH to start from it")
    elif is_primary():
        write_config(model_dir, model_cfg)
    barrier("moejax_check_model_dir")             # every process, whichever branch it took
