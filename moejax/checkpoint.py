"""The one checkpoint format of moejax, and :func:`load`.

Trainer runs, converted Hugging Face models and the outputs of ``moejax merge`` / ``quantize`` /
``extract-task`` share one on-disk layout::

    <dir>/model_config.json            the model config (dataclass fields, its class, dtypes by name)
    <dir>/checkpoints/<step>/params    orbax item: flat {'encoder/stack/.../wi/value': array}
    <dir>/checkpoints/<step>/opt_state orbax item, trainer runs only (same flat keys)
    <dir>/checkpoints/<step>/step      orbax item: {'step': int32}

written by an orbax ``CheckpointManager`` (each step to a temporary directory, then renamed, so a
killed run never leaves a corrupt checkpoint). :func:`save` writes a model's params as step 0;
:func:`load` rebuilds the model of any such directory (optionally straight into its shardings on a
mesh); :func:`load_params` reads only the params into a given abstract target (finetuning,
evaluation). Directories written by ``moejax.convert.checkpoint.save`` before the formats were
unified (``config.json`` + an orbax ``params`` pytree) still load; :func:`load` reads them with
:func:`_load_legacy_params`, the only other reader.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from moejax.distributed import barrier, is_primary
from moejax.models.build import build_model
from moejax.models.config import RUNTIME_FIELDS, DecoderConfig, EncDecConfig, ModelConfig, config_diff
from moejax.models.layers import Llama3Rope, Yarn
from moejax.moe import MoeConfig
from moejax.sharding import DEFAULT_RULES, Rules, state_shardings
from moejax.tree import flatten, path_str, unflatten

CONFIG_FILE = "model_config.json"
LEGACY_CONFIG_FILE = "config.json"          # pre-unification `moejax convert` / merge / quantize output
_CLASSES = {"DecoderConfig": DecoderConfig, "EncDecConfig": EncDecConfig, "MoeConfig": MoeConfig, "Yarn": Yarn,
            "Llama3Rope": Llama3Rope}


# ----------------------------------------------------------------------------- the config record

def config_to_json(cfg) -> dict:
    """A JSON-able dict of a model config (dtypes by name, nested MoeConfigs inline)."""

    def enc(v):
        if dataclasses.is_dataclass(v):
            return {"__class__": type(v).__name__, **{f.name: enc(getattr(v, f.name)) for f in dataclasses.fields(v)}}
        if isinstance(v, (tuple, list)):
            return [enc(x) for x in v]
        if isinstance(v, (str, int, float, bool)) or v is None:
            return v
        return {"__dtype__": np.dtype(v).name}

    return enc(cfg)


#: The default rules table before the ``fsdp`` mesh axis existed: configs saved with it read back
#: with today's :data:`moejax.sharding.DEFAULT_RULES` (identical on any mesh without ``fsdp``).
_PRE_FSDP_DEFAULT_RULES = (
    ("batch", ("data", "expert")), ("expert_group", "data"), ("length", None), ("embed", None), ("mlp", "model"),
    ("heads", "model"), ("kv", None), ("vocab", "model"), ("expert", "expert"), ("expert_inner", None),
    ("layers", None), ("capacity", None), ("unmodeled", None),
)


def config_from_json(d: dict):
    """Inverse of :func:`config_to_json`; an unknown class or field is a ValueError naming it. A
    config saved with the pre-FSDP default axis rules gets today's defaults."""

    def dec(v):
        if isinstance(v, dict) and "__dtype__" in v:
            return jnp.dtype(v["__dtype__"])
        if isinstance(v, dict) and "__class__" in v:
            cls = _CLASSES.get(v["__class__"])
            if cls is None:
                raise ValueError(f"unknown config class {v['__class__']!r} in checkpoint config; "
                                 f"known: {', '.join(_CLASSES)}")
            names = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(v) - names - {"__class__"})
            if unknown:
                raise ValueError(f"checkpoint config has {cls.__name__} fields this moejax does not know: {unknown}")
            fields = {k: dec(x) for k, x in v.items() if k != "__class__"}
            if fields.get("axis_rules") == _PRE_FSDP_DEFAULT_RULES:
                fields["axis_rules"] = DEFAULT_RULES
            return cls(**fields)
        if isinstance(v, list):
            return tuple(dec(x) for x in v)
        return v

    return dec(d)


def write_config(path: str, cfg: ModelConfig) -> None:
    """Write ``<path>/model_config.json`` atomically (temporary file, then rename)."""
    os.makedirs(path, exist_ok=True)
    tmp = os.path.join(path, CONFIG_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(config_to_json(cfg), f, indent=2)
    os.replace(tmp, os.path.join(path, CONFIG_FILE))


def read_config(path: str) -> ModelConfig:
    """The model config stored in checkpoint directory ``path``."""
    path = os.path.abspath(path)
    for name in (CONFIG_FILE, LEGACY_CONFIG_FILE):
        f = os.path.join(path, name)
        if os.path.exists(f):
            with open(f) as fh:
                d = json.load(fh)
            if name == LEGACY_CONFIG_FILE and "__class__" not in d:
                raise ValueError(f"{path!r} is not a moejax checkpoint ({name} is not a moejax config; a Hugging "
                                 "Face directory? convert it with `moejax convert --hf_dir DIR --out CKPT`)")
            return config_from_json(d)
    raise ValueError(f"{path!r} is not a moejax checkpoint (no {CONFIG_FILE})")


def _is_legacy(path: str) -> bool:
    return not os.path.exists(os.path.join(path, CONFIG_FILE)) and os.path.isdir(os.path.join(path, "params"))


# ----------------------------------------------------------------------------- steps

class CheckpointMismatch(ValueError):
    """A checkpoint holds another model's params or another optimizer's state (not damage)."""


def _low_memory_handler() -> ocp.StandardCheckpointHandler:
    """The standard handler (same format, same restore) that holds at most ~1 GB of the arrays in
    host memory at a time. The standard handler bounds only the writes: it first copies every array
    to the host (and a replicated one in slices per replica), a second copy of the whole model.
    Here arrays are copied one replica at a time, at most 1 GB in flight (measured: a replicated
    2 GiB pytree on 8 CPU devices saves with +0.01 GiB instead of +2 GiB)."""
    handler = ocp.StandardCheckpointHandler(save_concurrent_gb=1)
    try:    # the bounds live on its PyTree handler and jax.Array's type handler
        arrays = ocp.type_handlers.create_type_handler_registry(
            (jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False)))
        handler._impl = ocp.PyTreeCheckpointHandler(save_concurrent_gb=1, save_device_host_concurrent_gb=1,
                                                    type_handler_registry=arrays)
    except (TypeError, AttributeError):     # an orbax without these options: the writes are still bounded
        pass
    return handler


class Checkpointer:
    """Steps of one checkpoint directory (``<dir>/checkpoints/<step>``): save / restore a trainer
    :class:`moejax.training.state.TrainState` (items ``params``, ``opt_state``, ``step``) or params
    alone (items ``params``, ``step``), keeping the newest ``keep``."""

    def __init__(self, path: str, keep: int | None = 3, *, low_memory: bool = False):
        """``low_memory``: write synchronously, at most 1 GB of arrays in flight (orbax's default is
        asynchronous with up to 96 GB copied to the host at once): for one-off writes of a whole
        model (``save``), where the host should hold little beyond the model itself."""
        self.directory = os.path.join(os.path.abspath(path), "checkpoints")
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=not low_memory)
        # explicit handlers: the items' metadata (names, shapes) can then be read before any restore
        handlers = {"params": _low_memory_handler() if low_memory else ocp.StandardCheckpointHandler(),
                    "step": ocp.StandardCheckpointHandler()}
        if not low_memory:
            handlers["opt_state"] = ocp.StandardCheckpointHandler()
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps() or [])

    def _save(self, step_array, items: dict, force: bool) -> None:
        step = int(step_array)
        if step in (self.manager.all_steps() or []):
            return
        args = {k: ocp.args.StandardSave(flatten(v, path_str)) for k, v in items.items()}
        args["step"] = ocp.args.StandardSave({"step": step_array})
        self.manager.save(step, args=ocp.args.Composite(**args), force=force)

    def save(self, state, force: bool = True) -> None:
        """A train state (``params``, ``opt_state``, ``step``) at ``state.step`` (a global array in a
        multi-process run: every process saves its shards)."""
        self._save(state.step, {"params": state.params, "opt_state": state.opt_state}, force)

    def save_params(self, params, step: int = 0) -> None:
        """Params alone (a converted or compressed model, one process) at ``step``."""
        self._save(jnp.asarray(step, jnp.int32), {"params": params}, force=True)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def restore(self, abstract_state, step: int | None = None):
        """Read a train state at ``step`` (default latest) into the shardings of ``abstract_state``.
        A checkpoint of another model or optimizer is a ValueError saying which (not orbax's tree
        diff)."""
        step = self.latest_step() if step is None else step
        self.check_items(step, {k: getattr(abstract_state, k) for k in ("params", "opt_state")})
        items = {k: ocp.args.StandardRestore(flatten(getattr(abstract_state, k), path_str))
                 for k in ("params", "opt_state")}
        items["step"] = ocp.args.StandardRestore({"step": abstract_state.step})
        got = self.manager.restore(step, args=ocp.args.Composite(**items))
        return type(abstract_state)(params=unflatten(abstract_state.params, got["params"], path_str),
                                    opt_state=unflatten(abstract_state.opt_state, got["opt_state"], path_str),
                                    step=got["step"]["step"])

    def metadata(self, step: int) -> dict:
        """``{item: {flat key: (shape, dtype name)}}`` of ``step``, from its metadata alone."""
        meta = self.manager.item_metadata(step)
        out = {}
        for item in ("params", "opt_state"):
            tree = meta.get(item) if hasattr(meta, "get") else getattr(meta, item, None)
            tree = getattr(tree, "tree", tree)
            if tree is not None:
                out[item] = {k: (tuple(v.shape), np.dtype(v.dtype).name) for k, v in dict(tree).items()}
        return out

    def check_items(self, step: int, abstract: dict) -> None:
        """ValueError when ``step`` holds other keys or shapes than ``abstract`` (``{item: tree}``):
        ``params`` -> another model, ``opt_state`` -> another optimizer. Metadata that cannot be read
        is left to the restore (a damaged checkpoint)."""
        try:
            saved = self.metadata(step)
        except Exception:          # noqa: BLE001  (damage: the restore itself reports it)
            return
        what = {"params": "another model's parameters", "opt_state": "the state of another optimizer"}
        for item, tree in abstract.items():
            if item not in saved:
                continue
            want = {k: tuple(v.shape) for k, v in flatten(tree, path_str).items()}
            have = {k: v[0] for k, v in saved[item].items()}
            if want == have:
                continue
            missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
            shapes = [k for k in sorted(set(want) & set(have)) if want[k] != have[k]]
            detail = []
            if missing:
                detail.append(f"{len(missing)} expected tensors missing (e.g. {missing[0]!r})")
            if extra:
                detail.append(f"{len(extra)} unexpected (e.g. {extra[0]!r})")
            if shapes:
                detail.append(f"{len(shapes)} of other shapes (e.g. {shapes[0]!r}: {have[shapes[0]]} saved, "
                              f"{want[shapes[0]]} expected)")
            hint = ("resume with the optimizer the run was trained with (or start a new MODEL_DIR from its params "
                    "with INITIAL_CHECKPOINT_PATH)" if item == "opt_state" else "use the model it was trained with")
            raise CheckpointMismatch(f"checkpoint {step} in {self.directory} holds {what[item]} "
                                     f"({'; '.join(detail)}); {hint}")

    def restore_intact(self, abstract_state, check=None):
        """The newest step that restores (and passes ``check(state)``, which raises on a bad one, e.g.
        non-finite params): a damaged newer step (truncated or garbage files, an empty directory) is
        reported by step, renamed to ``<step>.damaged`` (kept for inspection, ignored from then on)
        and the previous one tried. A checkpoint of another model or optimizer is not damage: a
        ValueError. ValueError too when no step is intact."""
        damaged = []
        for step in reversed(self.all_steps()):
            try:                    # restore() checks the items first: a mismatch raises before any read
                state = self.restore(abstract_state, step)
                if check is not None:
                    check(state)
            except CheckpointMismatch:
                raise
            except ValueError as e:
                reason = str(e).splitlines()[0]
            except Exception as e:          # noqa: BLE001  (any reader failure = a damaged step)
                reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            else:
                if damaged:
                    self.manager.reload()
                return state
            damaged.append(step)
            aside = self._set_aside(step)
            print(f"warning: checkpoint {step} in {self.directory} is damaged ({reason}); kept as {aside}, "
                  "trying the previous step", flush=True)
        raise ValueError(f"no intact checkpoint in {self.directory} (damaged: steps {damaged}, renamed *.damaged); "
                         "move them away to start afresh")

    def _set_aside(self, step: int) -> str:
        src = os.path.join(self.directory, str(step))
        dst, n = src + ".damaged", 1
        while os.path.exists(dst):
            dst, n = f"{src}.damaged{n}", n + 1
        if is_primary():
            os.rename(src, dst)
        barrier(f"moejax_set_aside_{step}")
        return os.path.basename(dst)

    def restore_params(self, abstract_params, step: int | None = None):
        """Only the ``params`` item at ``step`` (default latest)."""
        step = self.latest_step() if step is None else step
        got = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(flatten(abstract_params, path_str))))
        return unflatten(abstract_params, got["params"], path_str)

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


# ----------------------------------------------------------------------------- models

def save(model: nnx.Module, path: str) -> None:
    """Write ``model.cfg`` and the params of ``model`` to ``path`` (which must not hold a checkpoint
    yet) as step 0 of the moejax format."""
    path = os.path.abspath(path)
    if os.path.exists(os.path.join(path, CONFIG_FILE)) or os.path.exists(os.path.join(path, "checkpoints")):
        raise ValueError(f"checkpoint {path!r} already exists; choose a new directory")
    write_config(path, model.cfg)
    ckpt = Checkpointer(path, keep=None, low_memory=True)
    try:
        ckpt.save_params(nnx.state(model, nnx.Param), step=0)
    finally:
        ckpt.close()


def _arch(cfg) -> tuple:
    """What must match for params to load: class and every shape-determining field."""
    keys = ("vocab_size", "d_model", "num_layers", "num_encoder_layers", "num_decoder_layers", "num_heads",
            "head_dim", "d_ff")
    return (type(cfg).__name__,) + tuple(getattr(cfg, k, None) for k in keys)


def _load_legacy_params(path: str, abstract_params):
    """Params of a pre-unification directory (``config.json`` + an orbax pytree of
    ``nnx.to_pure_dict(params)`` under ``params``) into the shardings of ``abstract_params``."""
    target = nnx.to_pure_dict(abstract_params)
    restored = ocp.StandardCheckpointer().restore(os.path.join(path, "params"), target)
    state = jax.tree.map(lambda x: x, abstract_params)
    nnx.replace_by_pure_dict(state, restored)
    return state


def load_params(path: str, abstract_params, expect: ModelConfig | None = None, step: int | None = None):
    """The params stored at ``path`` (latest step unless ``step``) read into ``abstract_params``
    (ShapeDtypeStructs with shardings). ``expect``: the config they are for; a checkpoint of other
    parameter names or shapes (another size, a merged or quantized model) is a
    :class:`CheckpointMismatch` naming the config fields that differ and a tensor."""
    path = os.path.abspath(path)
    saved = read_config(path)

    def mismatch(detail: str):
        shown = ""
        if expect is not None:
            diff = [(k, a, b) for k, a, b in config_diff(saved, expect) if k.rsplit(".", 1)[-1] not in RUNTIME_FIELDS]
            shown = ", ".join(f"{k}={a!r} there, {b!r} here" for k, a, b in diff[:4])
        return CheckpointMismatch(f"{path!r} holds another model" + (f" ({shown})" if shown else "") + f": {detail}")

    if expect is not None and _arch(saved) != _arch(expect):
        raise mismatch(f"{_arch(saved)}, not {_arch(expect)}")
    try:
        if _is_legacy(path):
            return _load_legacy_params(path, abstract_params)
        ckpt = Checkpointer(path, keep=None)
        try:
            if ckpt.latest_step() is None:
                raise ValueError(f"{path!r} has no checkpoints")
            step = ckpt.latest_step() if step is None else step
            try:
                ckpt.check_items(step, {"params": abstract_params})
            except CheckpointMismatch as e:
                raise mismatch(str(e).split(" holds ", 1)[-1]) from None
            return ckpt.restore_params(abstract_params, step)
        finally:
            ckpt.close()
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path!r} does not hold this model's params: {e}") from None


def load(path: str, mesh: jax.sharding.Mesh | None = None, *, rules: Rules = DEFAULT_RULES, step: int | None = None,
         expect: ModelConfig | type | None = None) -> nnx.Module:
    """The model stored at ``path`` (a trainer ``MODEL_DIR``, or a :func:`save` directory: a converted
    or compressed model), its params from the latest step (or ``step``).

    With ``mesh`` every parameter is read straight into its sharding under ``rules`` (nothing is
    materialised whole on one device); without, onto the default device. ``expect``: a config class
    or config the checkpoint must hold (ValueError otherwise).
    """
    path = os.path.abspath(path)
    cfg = read_config(path)
    if expect is not None:
        want = expect if isinstance(expect, type) else type(expect)
        if not isinstance(cfg, want) or (not isinstance(expect, type) and cfg != expect):
            raise ValueError(f"checkpoint {path!r} holds {type(cfg).__name__} {cfg}, not the expected {expect}")
    factory = lambda: build_model(cfg, nnx.Rngs(0))
    graphdef, abstract_params, _ = nnx.split(nnx.eval_shape(factory), nnx.Param, ...)
    leaves, treedef = jax.tree.flatten(abstract_params)
    if mesh is not None:
        shardings = jax.tree.leaves(state_shardings(abstract_params, mesh, rules),
                                    is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    else:
        shardings = [jax.sharding.SingleDeviceSharding(jax.devices()[0])] * len(leaves)
    target = jax.tree.unflatten(treedef, [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)
                                          for a, s in zip(leaves, shardings, strict=True)])
    params = load_params(path, target, step=step)
    # the non-param state (RNG streams); XLA drops the param initialisers it does not need
    rest = jax.jit(lambda: nnx.split(factory(), nnx.Param, ...)[2])()
    return nnx.merge(graphdef, params, rest)
