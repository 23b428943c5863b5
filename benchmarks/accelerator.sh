#!/usr/bin/env bash
# One run on a GPU host, from the repository root, with the host's own jax (CUDA), flax, optax and
# torch + transformers (no install: moejax is imported from the checkout). Writes each table and log
# under ${OUT:-/tmp/moejax-accelerator} and prints them as it goes:
#   1. the machine (GPU, jax / flax / torch / transformers versions);
#   2. benchmarks/moe_layer.py --dropless at GPU size (bf16, 16384 tokens, d_model 2048), with HF's
#      MixtralSparseMoeBlock on CUDA as the anchor;
#   3. benchmarks/attention.py (the attention_impl kernels and cuDNN, bf16, 2048 and 8192 tokens);
#   4. the tests that need neither gin/seqio/TensorFlow nor 8 devices (MoE layer, attention kernels)
#      on the GPU (JAX_PLATFORMS=cuda); tests that ask for the 8-device fixture error by design.
# Each step has its own time limit (seconds: MOE_S, ATTN_S, TESTS_S) so one slow step cannot eat the rest.
set -u
OUT=${OUT:-/tmp/moejax-accelerator}
mkdir -p "$OUT"
export PYTHONPATH="$PWD:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 \
  XLA_PYTHON_CLIENT_PREALLOCATE=false TF_CPP_MIN_LOG_LEVEL=2
PY=${PY:-python3}

{
  nvidia-smi -L
  $PY -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
  $PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.is_available())"
} 2>&1 | tee "$OUT/machine.txt"

echo "## MoE layer, dropless"
timeout "${MOE_S:-220}" $PY benchmarks/moe_layer.py --dropless --tokens 16384 --seq 2048 --d_model 2048 \
  --dtype bfloat16 --rounds 3 --reps 5 2>&1 | tee "$OUT/moe_dropless.md"

echo "## attention"
timeout "${ATTN_S:-80}" $PY benchmarks/attention.py --seqs 2048 8192 --batch 2 --heads 32 --kv_heads 8 \
  --head_dim 128 --dtype bfloat16 --reps 5 2>&1 | tee "$OUT/attention.md"

echo "## tests on the GPU"
JAX_PLATFORMS=cuda MOEJAX_TEST_JAX_CACHE=0 timeout "${TESTS_S:-150}" $PY -m pytest -q -n 8 -p no:cacheprovider \
  --tb=line -rfE tests/moe tests/models/test_attention_impl.py > "$OUT/tests.log" 2>&1
echo "pytest exit $?"
grep -E "passed|failed|error" "$OUT/tests.log" | tail -3
grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | cut -c1-200 | head -40
