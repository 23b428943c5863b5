"""Writes the notebooks from the cell sources below (run: python notebooks/_build.py).

Keeping the sources here keeps the notebooks reviewable as code; the .ipynb files are committed
without outputs and executed by the test suite (tests/test_notebooks.py) and in Colab.
"""

import nbformat as nbf

SETUP = '''# Setup: in Colab, install moejax from its repository; without an accelerator, emulate 8 CPU devices.
import os, sys
MOEJAX_REPO = os.environ.get("MOEJAX_REPO", "https://github.com/moejax/moejax")
if "google.colab" in sys.modules:
    !pip -q install "moejax @ git+{MOEJAX_REPO}"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if not (os.environ.get("COLAB_TPU_ADDR") or os.path.exists("/dev/nvidia0")):
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
import jax
print(jax.devices())'''


def notebook(name, cells):
    nb = nbf.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["colab"] = {"provenance": []}
    nb.cells = [nbf.v4.new_code_cell(SETUP)]
    for c in cells:
        nb.cells.append(nbf.v4.new_markdown_cell(c[3:]) if c.startswith("md:") else nbf.v4.new_code_cell(c))
    nbf.write(nb, f"notebooks/{name}.ipynb")


ANATOMY = [
    "md:# 1. Anatomy of an MoE layer\nRouters, capacity buckets, dropped tokens and the auxiliary losses of "
    "`moejax.moe.MoeLayer`, with routing heatmaps and expert-load bar charts.",
    '''import jax, jax.numpy as jnp, numpy as np
import matplotlib.pyplot as plt
from flax import nnx
from moejax.moe import MoeConfig, MoeLayer

x = jax.random.normal(jax.random.key(0), (4, 64, 32))          # [batch, length, d_model]
def layer(**kw):
    base = dict(num_experts=8, d_model=32, d_ff=64, router_init_std=1.0, max_group_size=64)
    base.update(kw)
    return MoeLayer(MoeConfig(**base), rngs=nnx.Rngs(0))''',
    "md:## Routers\nSwitch (top-1), GShard top-2, Mixtral-style renormalised top-2, expert choice. "
    "Each returns the layer output and a `MoeStats` with losses and routing metrics.",
    '''routers = {
    "switch top-1": dict(top_k=1),
    "GShard top-2": dict(top_k=2, weight_norm="kept"),
    "Mixtral top-2 (dropless)": dict(top_k=2, weight_norm="topk", dropless=True),
    "expert choice": dict(router="expert_choice", top_k=2),
}
rows = []
for name, kw in routers.items():
    y, st = layer(**kw)(x, deterministic=True)
    rows.append((name, int(st.num_routed), int(st.num_dropped), float(st.load_balancing_loss),
                 float(st.router_z_loss), st.capacity))
print(f"{'router':28s} routed dropped  aux    z-loss  capacity")
for r in rows:
    print(f"{r[0]:28s} {r[1]:6d} {r[2]:7d} {r[3]:6.3f} {r[4]:7.3f} {r[5]:6d}")''',
    "md:## Routing heatmap and expert load (top-2, capacity factor 1.0)",
    '''lay = layer(top_k=2, capacity_factor_eval=1.0)
logits = lay.router.logits(x.reshape(4, 64, 32))
probs = jax.nn.softmax(logits, -1)
y, st = lay(x, deterministic=True)
fig, ax = plt.subplots(1, 2, figsize=(11, 3))
ax[0].imshow(np.asarray(probs[0]).T, aspect="auto", cmap="viridis")
ax[0].set(title="router probabilities, sequence 0", xlabel="token", ylabel="expert")
ax[1].bar(range(8), np.asarray(st.expert_load))
ax[1].set(title=f"expert load (kept assignments), {int(st.num_dropped)} dropped", xlabel="expert")
plt.show()''',
    "md:## Capacity: dropped tokens vs capacity factor\n`C = max(ceil(cf * k * tokens_per_group / E), min_capacity)`; "
    "dropped tokens get a zero MoE output and are carried by the residual.",
    '''cfs = [0.25, 0.5, 1.0, 1.25, 2.0, 4.0]
drops = {k: [float(layer(top_k=k, capacity_factor_eval=cf, min_capacity=0)(x, deterministic=True)[1].dropped_fraction)
             for cf in cfs] for k in (1, 2)}
for k, d in drops.items():
    plt.plot(cfs, d, marker="o", label=f"top-{k}")
plt.xscale("log"); plt.xlabel("capacity factor"); plt.ylabel("fraction of assignments dropped"); plt.legend()
plt.show()''',
    "md:## Dropped tokens by position\nCapacity fills in token order, so later positions drop more "
    "(OpenMoE's *drop-towards-the-end*).",
    '''st = layer(top_k=1, capacity_factor_eval=0.5, min_capacity=0)(x, deterministic=True)[1]
plt.plot(np.asarray(st.dropped_by_position)); plt.xlabel("position"); plt.ylabel("drop rate"); plt.show()''',
    "md:## The losses\nLoad balancing `E * sum_e f_e P_e` equals k at perfect balance; the router z-loss "
    "penalises large logits.",
    '''for k in (1, 2):
    st = layer(top_k=k, router_init_std=1e-4)(x, deterministic=True)[1]     # near-uniform router
    print(f"top-{k}: load balancing loss {float(st.load_balancing_loss):.3f} (k = {k} at balance), "
          f"z-loss {float(st.router_z_loss):.3f}")''',
]

PARALLEL = [
    "md:# 2. Parallelism on a device mesh\nData, model and expert parallelism from one table of logical "
    "axis rules: how parameters and activations are sharded, and the all-to-all in the compiled program.",
    '''import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from moejax.sharding import DEFAULT_RULES, make_mesh, create_sharded, logical_to_spec
from moejax.models import build_model
from moejax.models.registry import get_config
for logical, mesh_axes in DEFAULT_RULES:
    print(f"{logical:14s} -> {mesh_axes}")''',
    "md:## Parameters are born sharded\nThe same model on a (2 data x 4 expert) mesh and a "
    "(2 data x 2 expert x 2 model) mesh: each parameter's logical axes map to a `PartitionSpec`.",
    '''cfg = get_config("tiny_switch")
for shape in ({"data": 2, "expert": 4}, {"data": 2, "expert": 2, "model": 2}):
    mesh = make_mesh(shape)
    model = create_sharded(lambda: build_model(cfg, nnx.Rngs(0)), mesh)
    ffn = model.encoder.stack.blocks[1].ffn
    print(shape)
    for name, var in [("experts.wi", ffn.experts.wi), ("router.kernel", ffn.router.kernel),
                      ("attn.q", model.encoder.stack.blocks[0].self_attn.q), ("embedding", model.embed.embedding)]:
        a = var[...]
        print(f"  {name:14s} {str(a.shape):18s} logical {var.get_metadata()['logical_axes']} -> {a.sharding.spec}")''',
    '''mesh = make_mesh({"data": 2, "expert": 4})
model = create_sharded(lambda: build_model(cfg, nnx.Rngs(0)), mesh)
wi = model.encoder.stack.blocks[1].ffn.experts.wi[...][0]     # [experts, d, f] of the first period
jax.debug.visualize_array_sharding(wi.reshape(wi.shape[0], -1))''',
    "md:## Expert parallelism compiles to all-to-alls\nTokens are sharded over (data, expert); experts "
    "over expert. The dispatch becomes an all-to-all in and one out; expert weights stay where they live.",
    '''from moejax.moe import MoeConfig, MoeLayer
layer_cfg = MoeConfig(num_experts=8, d_model=32, d_ff=64, top_k=2, max_group_size=64, group_multiple=8)
layer = create_sharded(lambda: MoeLayer(layer_cfg, rngs=nnx.Rngs(0)), mesh)
x = jax.device_put(jax.random.normal(jax.random.key(0), (8, 64, 32)),
                   jax.sharding.NamedSharding(mesh, logical_to_spec(("batch", "length", "embed"), DEFAULT_RULES, mesh)))
graphdef, state = nnx.split(layer)
f = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x, deterministic=True)[0])
with jax.set_mesh(mesh):
    hlo = f.lower(state, x).compile().as_text()
print("all-to-all ops:", hlo.count("all-to-all("))
for line in hlo.splitlines():                  # what is gathered (small routing tensors, never expert weights)
    if "all-gather(" in line:
        print(line.strip()[:160])''',
]

TRAIN = [
    "md:# 3. Pretrain and finetune\nThe three finetuning regimes of the seed on the embedded tasks, "
    "through the same gin runs as the command line (`moejax train ...`), with loss curves.",
    '''import os, tempfile, json
import matplotlib.pyplot as plt
from moejax.main import main
from moejax.training.writers import read_jsonl
root = tempfile.mkdtemp()
COMMON = ["--gin_file=models/tiny_switch.gin", "--gin.BATCH_SIZE=16", "--gin_file=mesh/data2_expert4.gin",
          "--gin.moejax.TrainConfig.log_every=5", "--gin.moejax.TrainConfig.eval_batches=2",
          "--gin.moejax.TrainConfig.infer_examples=8"]
# MOEJAX_NOTEBOOK_SCALE=0.25: a quick smoke run with a quarter of the steps (the test suite's)
SCALE = float(os.environ.get("MOEJAX_NOTEBOOK_SCALE", "1"))
def run(run_file, name, task, steps, lr, init=None):
    steps = max(5, int(steps * SCALE))
    args = ["train", f"--gin_file=runs/{run_file}.gin", *COMMON, f"--gin.MODEL_DIR='{root}/{name}'",
            f"--gin.MIXTURE_OR_TASK_NAME='{task}'", f"--gin.TRAIN_STEPS={steps}",
            f"--gin.moejax.optimizer.learning_rate={lr}"]
    if init:
        args.append(f"--gin.INITIAL_CHECKPOINT_PATH='{root}/{init}'")
    if run_file == "pretrain":
        args.append("--gin.WARMUP_STEPS=10")
    assert main(args) == 0
    return read_jsonl(f"{root}/{name}/train_metrics.jsonl")''',
    '''curves = {}
curves["pretrain (span corruption)"] = run("pretrain", "pre", "corpus_span_corruption", 80, 0.1)
curves["regime 1: pretrain -> sort"] = run("finetune", "sort", "synth_sort", 40, 0.01, init="pre")
curves["regime 2: pretrain -> instruct"] = run("instruct", "inst", "synth_instruct", 40, 0.01, init="pre")
curves["regime 3: instruct -> reverse"] = run("finetune", "rev", "synth_reverse", 40, 0.01, init="inst")''',
    '''fig, axes = plt.subplots(1, 4, figsize=(16, 3))
for ax, (name, recs) in zip(axes, curves.items()):
    ax.plot([r["step"] for r in recs], [r["loss"] for r in recs]); ax.set_title(name, fontsize=9); ax.set_xlabel("step")
axes[0].set_ylabel("train loss"); plt.show()
for name in ("sort", "inst", "rev"):
    last = read_jsonl(f"{root}/{name}/eval_metrics.jsonl")[-1]
    print(name, {k: round(v, 3) for k, v in last.items() if "/" in k})''',
]

MIXTRAL = [
    "md:# 4. Mixtral from Hugging Face\nConvert a tiny random-weight Mixtral written by `transformers`, "
    "check logits parity, decode with the KV cache; then count the real 8x7B without allocating it.",
    '''import tempfile, numpy as np, jax.numpy as jnp
import torch, transformers
from moejax.convert.hf_mixtral import from_hf
from moejax.inference import generate
hf_cfg = transformers.MixtralConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                    num_experts_per_tok=2, max_position_embeddings=64, attn_implementation="eager")
torch.manual_seed(0)
hf = transformers.MixtralForCausalLM(hf_cfg).eval()
d = tempfile.mkdtemp(); hf.save_pretrained(d, safe_serialization=True)
model, cfg = from_hf(d)
ids = np.random.default_rng(0).integers(0, 96, (2, 12))
with torch.no_grad():
    ref = hf(input_ids=torch.tensor(ids)).logits.numpy()
ours = np.asarray(model(jnp.asarray(ids))[0])
print("max |logits difference| vs transformers:", float(np.abs(ours - ref).max()))''',
    '''out = generate(model, jnp.asarray(ids[:, :6]), 8)
with torch.no_grad():
    hf_out = hf.generate(torch.tensor(ids[:, :6]), max_new_tokens=8, do_sample=False, pad_token_id=0).numpy()
print("moejax greedy:", np.asarray(out)[0].tolist())
print("HF greedy:    ", hf_out[0].tolist())''',
    "md:## The real Mixtral 8x7B, abstractly\n`nnx.eval_shape`: nothing is allocated.",
    '''from moejax.main import main
main(["params", "--model", "mixtral_8x7b", "--mesh", "data=64,expert=8,model=4"])''',
]

AFTER = [
    "md:# 5. After training: distillation, expert merging, quantization\nA tiny Switch teacher, a "
    "distilled dense student, and the merged / quantized variants with before/after tables.",
    '''import os, tempfile, jax, jax.numpy as jnp
from flax import nnx
from moejax.models.registry import get_config
from moejax.training.trainer import TrainConfig, train
from moejax.training.optim import make_optimizer
from moejax.training.writers import read_jsonl
root = tempfile.mkdtemp()
LEN = {"inputs": 64, "targets": 32}
# MOEJAX_NOTEBOOK_SCALE=0.25: a quick smoke run with a quarter of the steps (the test suite's)
SCALE = float(os.environ.get("MOEJAX_NOTEBOOK_SCALE", "1"))
def fit(name, cfg, steps, **kw):
    steps = max(5, int(steps * SCALE))
    tc = TrainConfig(batch_size=16, train_steps=steps, log_every=20, mesh_shape={"data": 8}, eval_batches=4,
                     infer_examples=2, task_feature_lengths=LEN, **kw)
    state = train(f"{root}/{name}", cfg, tc, make_optimizer("adafactor", 0.1, warmup_steps=steps // 2), progress=False)
    return state, read_jsonl(f"{root}/{name}/eval_metrics.jsonl")[-1]["eval/cross_entropy"]
t = get_config("tiny_switch", vocab_size=512)
teacher_cfg = t.replace(moe=t.moe.replace(num_experts=8))
_, ce_teacher = fit("teacher", teacher_cfg, 100)
_, ce_dense = fit("dense", get_config("tiny_t5", vocab_size=512), 100)
_, ce_student = fit("student", get_config("tiny_t5", vocab_size=512), 100, teacher_checkpoint=f"{root}/teacher")
print("| model | val CE | gap kept |\\n|---|---|---|")
for name, ce in [("teacher (8 experts)", ce_teacher), ("dense baseline", ce_dense), ("distilled student", ce_student)]:
    print(f"| {name} | {ce:.3f} | {100 * (ce_dense - ce) / (ce_dense - ce_teacher):.0f}% |")''',
    '''import moejax
import moejax.tasks  # registers the shipped seqio tasks
from moejax.inference.merging import merge_experts, param_counts
from moejax.inference.quantize import quantize_model, expert_weight_bytes
from moejax.training.loss import loss_fn, LossConfig
from moejax.data import batches
teacher = moejax.load(f"{root}/teacher")          # any moejax checkpoint: a MODEL_DIR, a converted model, ...
ds = batches.dataset("corpus_span_corruption", LEN, 32, encoder_decoder=True, split="validation", shuffle=False,
                     repeat=False)
val = [{k: jnp.asarray(v) for k, v in b.items()} for b in ds.take(2).as_numpy_iterator()]
def ce(m):
    return sum(float(loss_fn(m, b, LossConfig(z_loss=0.0), deterministic=True)[1]["cross_entropy"])
               for b in val) / len(val)
print("| variant | val CE | total params | expert bytes |\\n|---|---|---|---|")
variants = [("original", teacher), ("merge -> 4", merge_experts(teacher, 4)),
            ("merge -> 1 (dense)", merge_experts(teacher, 1)), ("int8 experts", quantize_model(teacher, 8)),
            ("int4 experts, g16", quantize_model(teacher, 4, 16))]
for name, m in variants:
    print(f"| {name} | {ce(m):.4f} | {param_counts(m)[0]:,} | {expert_weight_bytes(m):,} |")''',
]

if __name__ == "__main__":
    notebook("01_moe_layer_anatomy", ANATOMY)
    notebook("02_parallelism_on_a_mesh", PARALLEL)
    notebook("03_pretrain_and_finetune", TRAIN)
    notebook("04_mixtral_from_hugging_face", MIXTRAL)
    notebook("05_after_training", AFTER)
