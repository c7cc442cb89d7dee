#!/usr/bin/env bash
# The GPU check, one short script for a lent GPU machine (CUDA, PyTorch present, no network):
# the CUDA tests, tokens/s and MFU of real training runs, a profile of the largest, then the engine
# overhead on the GPU.
#   bash bench/gpu.sh [OUT_DIR]      (wheels of the other dependencies may wait in .whl/)
# Each part has its own time limit and log, so one failure still leaves the others' numbers. The
# limits add up to 515 s: with the wheel install the check fits one device call of timeout_s=545
# (the CUDA tests took 95 s on one H200 and over 130 s on another).
set -u
out=${1:-${OUT:-/tmp/gpu_check}}
mkdir -p "$out"
work=$(mktemp -d)  # private scratch: a fixed /tmp path on PYTHONPATH could hold anyone's modules
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$work/site" .whl/*.whl || exit 1
    export PYTHONPATH=$work/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export TORCH_EXTENSIONS_DIR=$PWD/.cache/torch_extensions

nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, deepspeed; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__)" | tee -a "$out/gpu.txt"

part() {  # part NAME SECONDS CMD...: run with a limit, log to $out/NAME.log, keep going on failure
    local name=$1 limit=$2; shift 2
    echo "== $name"
    local t0=$SECONDS
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    echo "== $name: exit $? in $((SECONDS - t0)) s"
    tail -n 25 "$out/$name.log"
}

part cuda_tests 180 python3 -m pytest -q -p no:cacheprovider tests/trainer/test_cuda.py
# the goal row first, so a slow start still leaves its figure; the small preset compiled: do fewer,
# fused kernels lift a step that waits on the host? (gpt3_small uncompiled was 34.6%/34.9% on two H200s)
part mfu 160 python3 bench/mfu.py --steps 100 --json "$out/mfu.json" \
    --row "gpt3_small char bf16 compiled, micro 64: conf=shakespeare model=gpt3_small precision=bf16 train.micro_batch=64 train.compile=true" \
    --row "shakespeare bf16: conf=shakespeare precision=bf16" \
    --row "shakespeare bf16 compiled: conf=shakespeare precision=bf16 train.compile=true"
# where the fixed per-step time of the 124M-class run goes: the op table (self CUDA time) of 4 steps
part profile 60 python3 launch/train.py conf=shakespeare model=gpt3_small precision=bf16 train.micro_batch=64 \
    train.compile=true train.max_steps=12 train.profile_steps=4 train.eval_every=0 train.ckpt_every=0 \
    train.sample_tokens=0 train.progress=false resume=never run_dir="$work/profile_run"
cp "$work/profile_run/profile/ops_rank0.txt" "$out/profile_ops.txt" 2>/dev/null
part engine_overhead 70 python3 bench/engine_overhead.py --steps 50 --rounds 3 --no-compile \
    model.n_layer=6 model.n_head=6 model.d_model=384 model.block_size=256 train.micro_batch=64
# the same pair at the 124M-class shape in bf16, where the GPU, not the host, sets the pace
part engine_overhead_124m 45 python3 bench/engine_overhead.py --steps 20 --rounds 3 --zero0-only precision=bf16 \
    model.n_layer=12 model.n_head=12 model.d_model=768 model.block_size=1024 model.bias=false model.dropout=0 \
    train.micro_batch=16
