"""moejax command line.

``moejax params --model mixtral_8x7b [--mesh data=64,expert=8,model=4]``: exact parameter counts.
``moejax layout --devices 2048 [--models switch_c_2048,nllb_moe_54b]``: per-device bytes of params,
optimizer state and MoE dispatch buffers on a pod-scale mesh, from abstract shapes.
``moejax layout --model mixtral_8x7b --mesh fsdp=32,expert=8 --batch 256 --seq 4096 --remat full
--dtype bfloat16 --hbm 95GiB``: one train step's memory plan (params, optimizer state, gradients,
activations, backward workspace) and whether it fits.
``moejax convert --hf_dir DIR --out CKPT [--mesh data=2,expert=4] [--dtype bfloat16]``: a HF checkpoint
(Mixtral / Mistral / Llama, Switch / T5, NLLB-MoE) to a moejax checkpoint, streamed from the
memory-mapped shards into the mesh (load it with ``moejax.load(path, mesh=None)``).

``moejax merge --checkpoint DIR --num_experts N [--method frequency] --out CKPT`` and
``moejax quantize --checkpoint DIR --bits 8|4 [--group_size G] --out CKPT``: compress a trained
model's experts (a moejax checkpoint usable as ``INITIAL_CHECKPOINT_PATH`` or with ``restore``).

``moejax extract-task --checkpoint DIR --task synth_sort --out CKPT``: the standalone sub-network of
one task of a task-routed model.

``moejax train|eval|infer --gin_file=FILE [--gin_file=...] [--gin_search_paths=DIRS]
[--gin.MACRO=VALUE ...]``: the gin-configured T5X-style entry points. The shipped ``gin/``
directory is always on the search path, so ``--gin_file=runs/pretrain.gin`` works anywhere; the
full config is written to ``MODEL_DIR/config.gin`` once the run is accepted and the operative one
to ``MODEL_DIR/operative_config.gin`` after it (``eval`` / ``infer``: ``config_eval.gin``, ...).
A ``--gin.MACRO`` no loaded file uses, or a value gin cannot parse, is an error. Multi-host: add
``--multiprocess`` (cluster auto-detected) or ``--coordinator_address=H:P --process_count=N
--process_index=I`` on every host.

Errors: one ``error: ...`` line; exit code 2 for bad input, 1 for a fault (e.g. non-finite
training), 143 after SIGTERM (the current step saved). ``moejax --debug ...`` shows tracebacks.

``moejax launch --processes N --devices_per_process D -- train ...``: the same as N local processes
forming one global mesh (``moejax.launch``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys


def _parse_mesh(text: str) -> dict[str, int]:
    mesh = {}
    for part in text.split(","):
        if "=" not in part:
            raise ValueError(f"bad --mesh entry {part!r}; expected name=size, e.g. data=64,expert=8,model=4")
        name, size = part.split("=", 1)
        if not size.strip().isdigit() or int(size) < 1:
            raise ValueError(f"bad --mesh entry {part!r}: the size must be an integer >= 1")
        mesh[name.strip()] = int(size)
    from moejax.sharding import check_mesh_axes

    check_mesh_axes(mesh)
    return mesh


def cmd_params(args) -> int:
    from moejax.layout import default_batch, layout
    from moejax.models.params import report
    from moejax.models.registry import get_config

    cfg = get_config(args.model)
    print(f"# {args.model}\n")
    print(report(cfg).as_table())
    if args.mesh:
        mesh = _parse_mesh(args.mesh)
        batch, lengths = default_batch(cfg)
        lay = layout(cfg, mesh, batch, lengths, name=args.model)
        gib = 2**30
        print(f"\nmesh {mesh} ({lay.devices} devices), default logical axis rules:")
        print(f"  params    {lay.params / gib:.3f} GiB per device")
        print(f"  optimizer {lay.adamw / gib:.3f} GiB per device (AdamW, two f32 moments), "
              f"{lay.adafactor / gib:.3f} GiB (Adafactor)")
        for flag in lay.flags:
            print(f"  flag: {flag}")
    return 0


def _positive(args, *names) -> None:
    for n in names:
        v = getattr(args, n)
        if v < 1:
            raise ValueError(f"--{n} must be >= 1, got {v}")


def cmd_layout(args) -> int:
    from moejax.layout import table
    from moejax.models.registry import names

    _positive(args, "devices", "batch", "seq")

    if args.model:
        return _memory_plan(args)
    models = [m for m in args.models.split(",") if m] if args.models else names()
    mesh = _parse_mesh(args.mesh) if args.mesh else None
    print(table(models, args.devices, mesh))
    return 0


def _memory_plan(args) -> int:
    from moejax.models.config import EncDecConfig
    from moejax.models.registry import get_config
    from moejax.training.memory import parse_bytes, plan

    if not args.mesh:
        raise ValueError("moejax layout --model needs --mesh, e.g. --mesh fsdp=32,expert=8")
    cfg = get_config(args.model)
    lengths = {"targets": args.seq}
    if isinstance(cfg, EncDecConfig):
        lengths["inputs"] = args.inputs or args.seq
    p = plan(cfg, _parse_mesh(args.mesh), args.batch, lengths, remat=args.remat or None, dtype=args.dtype or None,
             param_dtype=args.param_dtype or None, optimizer=args.optimizer, master_weights=args.master_weights,
             name=args.model)
    print(p.table(parse_bytes(args.hbm) if args.hbm else None))
    return 0


def cmd_convert(args) -> int:
    import jax.numpy as jnp

    from moejax import checkpoint
    from moejax.convert import from_hf
    from moejax.sharding import make_mesh

    mesh = make_mesh(_parse_mesh(args.mesh)) if args.mesh else None
    dtype = None
    if args.dtype:
        if args.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"--dtype {args.dtype!r}: expected float32, bfloat16 or float16")
        dtype = jnp.dtype(args.dtype)
    ignore = tuple(f for f in args.ignore_hf_fields.split(",") if f)
    model, cfg = from_hf(args.hf_dir, mesh=mesh, dtype=dtype, ignore_fields=ignore)
    checkpoint.save(model, args.out)
    print(f"converted {args.hf_dir} -> {args.out} ({type(cfg).__name__}, params in {jnp.dtype(cfg.param_dtype).name}"
          f"{', sharded over ' + args.mesh if mesh is not None else ''})")
    return 0


def cmd_export(args) -> int:
    from moejax import checkpoint
    from moejax.convert import to_hf

    if args.dtype and args.dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"--dtype {args.dtype!r}: expected float32, bfloat16 or float16")
    if args.max_shard_gb <= 0:
        raise ValueError(f"--max_shard_gb must be > 0, got {args.max_shard_gb}")
    if os.path.exists(os.path.join(args.out, "config.json")):
        raise ValueError(f"--out {args.out!r} already holds a config.json; choose an empty directory")
    model = checkpoint.load(args.checkpoint, step=args.step)
    options = {"expert_capacity": args.expert_capacity} if args.expert_capacity is not None else {}
    model_type = to_hf(model, args.out, dtype=args.dtype or None, max_shard_bytes=int(args.max_shard_gb * 2**30),
                       **options)
    print(f"exported {args.checkpoint}{f' (step {args.step})' if args.step is not None else ''} -> {args.out} "
          f"(Hugging Face model_type {model_type!r})")
    return 0


def _calibration(model, task: str, n: int, lengths: dict):
    import moejax.tasks  # noqa: F401  (registers the shipped tasks)
    from moejax.data import batches
    from moejax.models.config import EncDecConfig

    ds = batches.dataset(task, lengths, 16, encoder_decoder=isinstance(model.cfg, EncDecConfig), split="validation",
                         shuffle=False, repeat=True)
    return list(ds.take(n).as_numpy_iterator())


def cmd_merge(args) -> int:
    from moejax import checkpoint
    from moejax.inference.merging import expert_usage, merge_experts, param_counts

    model = checkpoint.load(args.checkpoint)
    usage = None
    if args.method == "frequency":
        lengths = {"inputs": args.inputs_length, "targets": args.targets_length}
        usage = expert_usage(model, _calibration(model, args.calibration_task, args.calibration_batches, lengths))
    merged = merge_experts(model, args.num_experts, args.method, args.group_by, usage)
    checkpoint.save(merged, args.out)
    (t0, a0), (t1, a1) = param_counts(model), param_counts(merged)
    print(f"merged {model.cfg.moe.num_experts} -> {args.num_experts} experts ({args.method}, groups by "
          f"{args.group_by}): total {t0:,} -> {t1:,} params, active {int(a0):,} -> {int(a1):,}; wrote {args.out}")
    return 0


def cmd_quantize(args) -> int:
    from moejax import checkpoint
    from moejax.inference.quantize import expert_weight_bytes, quantize_model

    model = checkpoint.load(args.checkpoint)
    q = quantize_model(model, args.bits, args.group_size)
    checkpoint.save(q, args.out)
    print(f"quantized experts to int{args.bits}" + (f" (groups of {args.group_size})" if args.group_size else "")
          + f": expert weights {expert_weight_bytes(model):,} -> {expert_weight_bytes(q):,} bytes; wrote {args.out}")
    return 0


def cmd_extract_task(args) -> int:
    import moejax.tasks  # noqa: F401  (registers the shipped tasks)
    from moejax import checkpoint
    from moejax.data.batches import task_names
    from moejax.inference.merging import param_counts
    from moejax.inference.task_routing import extract_task_model

    model = checkpoint.load(args.checkpoint)
    task = args.task
    if not task.isdigit():
        names = task_names(args.mixture)
        if task not in names:
            raise ValueError(f"task {task!r} is not in mixture {args.mixture!r}; its tasks: {', '.join(names)}")
        task = names.index(task)
    small = extract_task_model(model, int(task))
    checkpoint.save(small, args.out)
    print(f"extracted task {args.task} (id {task}): {param_counts(model)[0]:,} -> {param_counts(small)[0]:,} params; "
          f"wrote {args.out}")
    return 0


def parse_gin_flags(extra: list[str]) -> list[str]:
    """``['--gin.TRAIN_STEPS=10', '--gin.MODEL_DIR', "'/tmp/x'"]`` -> gin binding strings."""
    out, i = [], 0
    while i < len(extra):
        a = extra[i]
        if not a.startswith("--gin."):
            raise ValueError(f"unrecognised argument {a!r}; gin bindings look like --gin.KEY=VALUE")
        body = a[len("--gin."):]
        if "=" in body:
            key, val = body.split("=", 1)
        else:
            if i + 1 >= len(extra):
                raise ValueError(f"{a} needs a value")
            key, val = body, extra[i + 1]
            i += 1
        out.append(f"{key} = {val}")
        i += 1
    return out


class _DropGinPathProbe(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Path not found: ")


def _init_distributed(args) -> None:
    """Join a multi-process run when asked (before any device is touched)."""
    explicit = args.coordinator_address is not None or args.process_count is not None or args.process_index is not None
    if explicit or args.multiprocess:
        from moejax.distributed import initialize

        initialize(args.coordinator_address, args.process_count, args.process_index)


def _syntax_error(binding: str) -> Exception | None:
    """gin's parse error of one ``KEY = VALUE`` binding on its own, or None (a SyntaxError, or on
    Python 3.12+ the tokenizer's TokenError for an unclosed quote)."""
    import tokenize

    import gin
    from gin import config_parser

    try:
        for _ in config_parser.ConfigParser(binding, gin.config.ParserDelegate(skip_unknown=True)):
            pass
    except (SyntaxError, tokenize.TokenError) as e:
        return e
    return None


def _check_binding_syntax(bindings: list[str]) -> None:
    """A ValueError naming the first ``--gin.`` flag gin cannot parse, with the quoting hint."""
    for b in bindings:
        if _syntax_error(b) is None:
            continue
        key, val = (x.strip() for x in b.split("=", 1))
        hint = ""
        if not (val[:1] in "'\"" and val[-1:] == val[:1] and len(val) > 1):
            hint = f"; strings need gin quotes: --gin.{key}=\"'{val.strip(chr(39) + chr(34))}'\""
        raise ValueError(f"--gin.{key}={val}: gin cannot parse the value {val!r}{hint}")


def _referenced_macros() -> set[str]:
    """Names of the macros the parsed gin config refers to (``%NAME`` anywhere in a value)."""
    import gin

    seen: set[str] = set()

    def walk(v):
        sel = getattr(v, "scoped_selector", None)
        if isinstance(sel, str) and sel.endswith("/gin.macro"):
            seen.add(sel[: -len("/gin.macro")])
        if isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, (list, tuple, set)):
            for x in v:
                walk(x)

    for params in gin.config._CONFIG.values():       # gin keeps no public index of references
        for value in params.values():
            walk(value)
    return seen


def _check_cli_macros(bindings: list[str]) -> None:
    """A ValueError for a ``--gin.NAME=`` macro that no loaded gin file uses (a typo would otherwise
    be ignored), with the closest macro names."""
    import difflib

    used = _referenced_macros()
    for b in bindings:
        key = b.split("=", 1)[0].strip()
        if "." in key or "/" in key or key in used:
            continue
        close = difflib.get_close_matches(key, sorted(used), 3)
        raise ValueError(f"--gin.{key}: no loaded gin file uses the macro {key}"
                         + (f"; did you mean {', '.join(close)}?" if close else
                            f"; the macros in use: {', '.join(sorted(used))}"))


def _write_atomic(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def cmd_gin(args, extra) -> int:
    import gin
    from moejax import entry
    from moejax.distributed import is_primary

    _init_distributed(args)

    gin.clear_config()
    bindings = parse_gin_flags(extra)
    _check_binding_syntax(bindings)
    known = getattr(gin.config, "_LOCATION_PREFIXES", [])
    dirs = [os.path.abspath(p) for paths in args.gin_search_paths or [] for p in paths.split(",") if p]
    for d in dirs + [entry.shipped_gin_dir()]:
        if d not in known:
            gin.add_config_file_search_path(d)
    if not args.gin_file:
        raise ValueError("no --gin_file given; e.g. --gin_file=examples/tiny_switch_pretrain.gin")
    probe = _DropGinPathProbe()          # gin logs an ERROR for every file before it tries the search paths
    logging.getLogger().addFilter(probe)
    try:
        gin.parse_config_files_and_bindings(args.gin_file, bindings, finalize_config=False)
    finally:
        logging.getLogger().removeFilter(probe)
    _check_cli_macros(bindings)
    entry.check_required_macros()          # names every unset macro (gin's own check stops at the first)
    gin.finalize()
    entry.register_text_files_macro()
    model_dir = gin.query_parameter("MODEL_DIR/macro.value")
    if not isinstance(model_dir, str) or not model_dir:
        raise ValueError(f"MODEL_DIR must be a directory path, got {model_dir!r}; pass --gin.MODEL_DIR=\"'/path'\"")
    model_dir = os.path.abspath(os.path.expanduser(model_dir))
    suffix = "" if args.command == "train" else f"_{args.command}"   # eval / infer keep the training record

    def record():                          # once the run is accepted: refused runs write nothing
        if is_primary():
            os.makedirs(model_dir, exist_ok=True)
            _write_atomic(os.path.join(model_dir, f"config{suffix}.gin"), gin.config_str())

    entry.run(args.command, on_start=record)
    if is_primary():
        _write_atomic(os.path.join(model_dir, f"operative_config{suffix}.gin"), gin.operative_config_str())
    return 0


def cmd_launch(args, extra) -> int:
    from moejax.launch import launch_local

    _positive(args, "processes", "devices_per_process")
    argv = [a for a in extra if a != "--"]
    if not argv:
        raise ValueError("nothing to launch; e.g. moejax launch --processes 2 -- train --gin_file=...")
    return launch_local(argv, args.processes, args.devices_per_process, port=args.port, log_dir=args.log_dir)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="moejax", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    pp = sub.add_parser("params", help="exact parameter counts (abstract: nothing is allocated)")
    pp.add_argument("--model", required=True, help="a registered config name")
    pp.add_argument("--mesh", default="", help="e.g. data=64,expert=8,model=4: bytes per device")
    pp.set_defaults(fn=cmd_params)
    pl = sub.add_parser("layout", help="per-device bytes of params, optimizer state and MoE buffers on a pod mesh")
    pl.add_argument("--devices", type=int, default=2048, help="mesh size (a data x expert x model mesh is chosen)")
    pl.add_argument("--mesh", default="", help="or an explicit mesh, e.g. data=16,expert=64,model=2")
    pl.add_argument("--models", default="", help="comma-separated config names (default: all registered)")
    pl.add_argument("--model", default="", help="one config: its train-step memory plan on --mesh (with activations)")
    pl.add_argument("--batch", type=int, default=256, help="global batch (sequences), with --model")
    pl.add_argument("--seq", type=int, default=4096, help="target length, with --model")
    pl.add_argument("--inputs", type=int, default=0, help="encoder input length (encoder-decoders; default --seq)")
    pl.add_argument("--remat", default="", help="none | full | dots_saveable | ... (default: the config's)")
    pl.add_argument("--dtype", default="", help="compute dtype, e.g. bfloat16 (default: the config's)")
    pl.add_argument("--param_dtype", default="", help="parameter dtype (default: the config's)")
    pl.add_argument("--optimizer", default="adamw", help="adamw | adafactor")
    pl.add_argument("--master_weights", action="store_true", help="a float32 master copy of the params")
    pl.add_argument("--hbm", default="", help="per-device memory, e.g. 95GiB: says whether the step fits")
    pl.set_defaults(fn=cmd_layout)
    pc = sub.add_parser("convert", help="Hugging Face save_pretrained dir (safetensors) -> moejax orbax checkpoint")
    pc.add_argument("--hf_dir", required=True)
    pc.add_argument("--out", required=True)
    pc.add_argument("--mesh", default="", help="e.g. data=2,expert=4: each parameter is read straight into its shards")
    pc.add_argument("--dtype", default="", help="parameter dtype (default: the checkpoint's, e.g. bfloat16)")
    pc.add_argument("--ignore_hf_fields", default="",
                    help="comma-separated config.json fields to accept although moejax does not know them")
    pc.set_defaults(fn=cmd_convert)
    px = sub.add_parser("export", help="moejax checkpoint -> Hugging Face save_pretrained dir (safetensors)")
    px.add_argument("--checkpoint", required=True, help="trainer MODEL_DIR or moejax checkpoint")
    px.add_argument("--out", required=True)
    px.add_argument("--step", type=int, default=None, help="a trainer checkpoint's step (default: the latest)")
    px.add_argument("--dtype", default="", help="tensor dtype (default: the parameters', e.g. bfloat16)")
    px.add_argument("--max_shard_gb", type=float, default=5.0, help="safetensors shard size (GiB)")
    px.add_argument("--expert_capacity", type=int, default=None,
                    help="Switch: the fixed per-sequence expert capacity HF routes with (a model trained with "
                         "capacity factors has none)")
    px.set_defaults(fn=cmd_export)
    pm = sub.add_parser("merge", help="merge each MoE layer's experts into fewer (1 = dense)")
    pm.add_argument("--checkpoint", required=True, help="trainer MODEL_DIR or moejax checkpoint")
    pm.add_argument("--num_experts", type=int, required=True)
    pm.add_argument("--method", default="uniform", choices=["uniform", "frequency"])
    pm.add_argument("--group_by", default="index", choices=["index", "weights", "router"])
    pm.add_argument("--calibration_task", default="corpus_span_corruption")
    pm.add_argument("--calibration_batches", type=int, default=4)
    pm.add_argument("--inputs_length", type=int, default=64)
    pm.add_argument("--targets_length", type=int, default=32)
    pm.add_argument("--out", required=True)
    pm.set_defaults(fn=cmd_merge)
    pq = sub.add_parser("quantize", help="weight-only int8 / int4 expert quantization")
    pq.add_argument("--checkpoint", required=True, help="trainer MODEL_DIR or moejax checkpoint")
    pq.add_argument("--bits", type=int, default=8)
    pq.add_argument("--group_size", type=int, default=None)
    pq.add_argument("--out", required=True)
    pq.set_defaults(fn=cmd_quantize)
    pe = sub.add_parser("extract-task", help="a task-routed model's sub-network for one task, standalone")
    pe.add_argument("--checkpoint", required=True, help="trainer MODEL_DIR or moejax checkpoint")
    pe.add_argument("--task", required=True, help="task id, or a task name of --mixture")
    pe.add_argument("--mixture", default="synth_multitask", help="the mixture the model was trained on")
    pe.add_argument("--out", required=True)
    pe.set_defaults(fn=cmd_extract_task)
    for mode in ("train", "eval", "infer"):
        pg = sub.add_parser(mode, help=f"gin-configured {mode} (T5X flags)")
        pg.add_argument("--gin_file", action="append", default=[], help="repeatable; searched on the gin paths")
        pg.add_argument("--gin_search_paths", action="append", default=[], help="comma-separated directories")
        pg.add_argument("--multiprocess", action="store_true",
                        help="join a multi-host run, cluster auto-detected (TPU pod slice, SLURM, MPI)")
        pg.add_argument("--coordinator_address", default=None, help="host:port of process 0 (multi-process)")
        pg.add_argument("--process_count", type=int, default=None, help="number of processes (multi-process)")
        pg.add_argument("--process_index", type=int, default=None, help="this process's rank (multi-process)")
        pg.set_defaults(fn=cmd_gin)
    pn = sub.add_parser("launch", help="run a train/eval/infer command as N local processes (one global mesh)")
    pn.add_argument("--processes", type=int, default=2)
    pn.add_argument("--devices_per_process", type=int, default=1, help="emulated CPU devices per process")
    pn.add_argument("--port", type=int, default=None, help="coordinator port (default: a free one)")
    pn.add_argument("--log_dir", default=None, help="where processes 1..N-1 log (default: a temp dir)")
    pn.set_defaults(fn=cmd_launch)
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv and (argv.index("--debug") < argv.index("--") if "--" in argv else True)
    if debug:
        argv.remove("--debug")
    args, extra = p.parse_known_args(argv)
    try:
        if args.fn in (cmd_gin, cmd_launch):
            return args.fn(args, extra)
        if extra:
            p.error(f"unrecognized arguments: {' '.join(extra)}")
        return args.fn(args)
    except Exception as e:                 # noqa: BLE001  (every error becomes one line; --debug: the traceback)
        if debug:
            raise
        return _report(e)


def _first_line(e: BaseException) -> str:
    """The message without gin's appended "In call to configurable ..." context lines."""
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    return lines[0].strip() if lines else type(e).__name__


def _report(e: Exception) -> int:
    """Print ``error: ...`` for ``e``; the exit code: 2 bad input, 143 preempted, 1 any other fault."""
    from moejax.training.faults import NonFiniteError, Preempted

    if isinstance(e, Preempted):
        print(f"moejax: {_first_line(e)}", file=sys.stderr)
        return 143
    if isinstance(e, NonFiniteError):
        print(f"error: {_first_line(e)}", file=sys.stderr)
        return 1
    if isinstance(e, (ValueError, OSError, SyntaxError)):
        print(f"error: {_first_line(e)}", file=sys.stderr)
        return 2
    if isinstance(e, (TypeError, LookupError)):
        print(f"error: {type(e).__name__}: {_first_line(e)} (moejax --debug ... shows where)", file=sys.stderr)
        return 2
    print(f"error: internal error, {type(e).__name__}: {_first_line(e)} (rerun with moejax --debug for the "
          "traceback)", file=sys.stderr)
    return 1


def cli() -> None:
    """The ``moejax`` console script: :func:`main`, then exit at once on an error (no interpreter
    teardown: a tf.data iterator's destructor there can block forever)."""
    rc = main()
    sys.stdout.flush()
    sys.stderr.flush()
    if rc:
        os._exit(rc)
    sys.exit(rc)


if __name__ == "__main__":
    cli()
