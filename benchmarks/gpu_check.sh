#!/usr/bin/env bash
# One sitting on a lent GPU machine, in order, inside a time budget:
#   1. versions, and a TF32 self-check (CuPy's float32 product with TF32 off and on, against float64);
#   2. each CUDA kernel against its NumPy twin, and the kernels end to end; if these fail, everything
#      below runs on the twins (SCRATCHPROTO_KERNELS=0; else the ConvNet's comparison once without
#      the kernels, INFO line);
#   3. timed, with the GPU to itself: scratchproto (CuPy) against PyTorch (cuDNN), alternating:
#      ConvNet FP32 against PyTorch's default, ResNet-18 TF32 against PyTorch's default, ResNet-18
#      FP32 against PyTorch in FP32 (NVIDIA_TF32_OVERRIDE=0); 60-way 5-shot 5-query; episodes in a
#      row, each read at once against read one late (the trainer's way); one instrumented ResNet-18
#      episode; PyTorch's peak GPU memory;
#   4. with TRAIN_EPOCHS > 0: ResNet-18 with the paper's protocol starts in the background (TF32, as
#      PyTorch's default convolutions; continued with --resume if runs/resnet18-paper/last.npz is
#      there) and trains while the correctness checks below run beside it, until it is stopped
#      (SIGTERM: last.npz holds the last whole epoch) in time for a GPU evaluation of its best.npz
#      (--standard, 1000 episodes per setting) and its figures;
#   5. the CuPy variants of the tests (FP32: TF32 stays off in them; pytest-xdist if installed);
#   6. one short ConvNet training in FP32 and in TF32 (finite, falling loss).
# The log ends with three RESULT lines (the GPU targets: benchmarks/README.md). Everything worth keeping is packed into
# $OUT/gpu.tar (one returned file; the ResNet-18 checkpoints stay behind: 134 MB each).
# Needs CuPy and torch (with CUDA) in $PY, the Omniglot files in data/omniglot or a mirror in
# $SCRATCHPROTO_MIRROR, and the PyTorch reference at $REF.
#   OUT=gpu-out REF=../shared/reference/torch_protonet.py TRAIN_EPOCHS=100 bash benchmarks/gpu_check.sh
# A sitting for the ResNet-18 run alone (about 6 s an epoch on an H200: 100 epochs take two calls
# of 10 minutes on one warm machine, the second continuing the first's run folder):
#   CHECKS=0 TRAIN_EPOCHS=100 BUDGET=570 bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-gpu-out}
REF=${REF:-../shared/reference/torch_protonet.py}
BUDGET=${BUDGET:-540}              # seconds for the whole script
TRAIN_EPOCHS=${TRAIN_EPOCHS:-0}
CHECKS=${CHECKS:-1}                # 0: versions, then straight to the ResNet-18 run (a sitting for training alone)
EVAL_S=${EVAL_S:-110}              # kept at the end for the ResNet-18 evaluation and figures
RUN=runs/resnet18-paper
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
start=$SECONDS
left() { echo $((BUDGET - (SECONDS - start))); }
step() { echo; echo "=== [$((SECONDS - start)) s] $*"; }
train_pid=
compare() {   # compare.py with its arguments; prints its lines and keeps the summary in $OUT/last_compare
  timeout 120 $PY benchmarks/compare.py --torch-python "$(command -v $PY)" --reference "$REF" \
    --device gpu --way 60 --shot 5 --query 5 --episodes 10 --rounds 3 "$@" | tee "$OUT/last_compare"
}
result() {    # RESULT <backbone> <mode> scratchproto <s> <torch label> <s> ratio <r>, from the last compare
  # (a fourth argument replaces the word RESULT: lines that are not the three RESULT lines)
  awk -v b="$1" -v m="$2" -v t="$3" -v w="${4:-RESULT}" '/median sec\/episode/ {
    printf "%s %s %s scratchproto %s %s %s ratio %s\n", w, b, m, $4, t, $6, $8 }' "$OUT/last_compare" >> "$OUT/results"
}

main() {
: > "$OUT/results"
step "machine and versions"
date -u
git log -1 --format='commit %H %cd' 2>/dev/null
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
$PY -c "import cupy, numpy, torch, sys; print('python', sys.version.split()[0], 'cupy', cupy.__version__, \
'cuda runtime', cupy.cuda.runtime.runtimeGetVersion(), 'numpy', numpy.__version__, 'torch', torch.__version__, \
'cudnn', torch.backends.cudnn.version(), 'cudnn.allow_tf32', torch.backends.cudnn.allow_tf32, \
'matmul.allow_tf32', torch.backends.cuda.matmul.allow_tf32)"
# the images, decoded once here so that the runs below do not each decode them
timeout 60 $PY -c "from scratchproto.omniglot import Omniglot; Omniglot('data/omniglot', progress=False)"

if [ "$CHECKS" = 1 ]; then
step "TF32 self-check: relative error of a float32 product (1024 x 1024) against float64"
for mode in 0 1; do
  SCRATCHPROTO_TF32=$mode timeout 60 $PY -c "
import numpy as np
from scratchproto import backend
cp = backend.get_xp('gpu')
rng = np.random.default_rng(0)
a, b = rng.standard_normal((1024, 1024)), rng.standard_normal((1024, 1024))
exact = a @ b
got = (cp.asarray(a, dtype=np.float32) @ cp.asarray(b, dtype=np.float32)).get()
print('SCRATCHPROTO_TF32=$mode: max relative error', float(np.abs(got - exact).max() / np.abs(exact).max()))"
done

step "kernels against their NumPy twins"
kernels_ok=0
timeout 120 $PY -m pytest -q -rfEs -p no:cacheprovider tests/test_kernels.py && kernels_ok=1
if [ $kernels_ok = 1 ]; then
  echo "the kernels' tests passed: everything below runs them (CuPy's default)"
else
  export SCRATCHPROTO_KERNELS=0
  echo "the kernels' tests failed: everything below runs on their twins (SCRATCHPROTO_KERNELS=0)"
fi

step "the GPU self-check that runs before training (selfcheck.py), on its own and timed"
timeout 120 $PY -c "
import time
from scratchproto import backend, selfcheck
xp = backend.get_xp('gpu')
for i in range(2):   # the first call compiles the float64 kernels
    t = time.perf_counter()
    problem = selfcheck.first_difference(xp)
    print('self-check:', problem or 'agrees with NumPy', f'({time.perf_counter() - t:.2f} s)')"

step "scratchproto vs PyTorch, alternating, 60-way 5-shot 5-query"
if [ $kernels_ok = 1 ]; then
  SCRATCHPROTO_KERNELS=0 compare --backbone convnet --rounds 1; result convnet fp32-no-kernels torch-default INFO
fi
compare --backbone convnet; result convnet fp32 torch-default
compare --backbone resnet18 --tf32; result resnet18 tf32 torch-default
compare --backbone resnet18 --torch-fp32; result resnet18 fp32 torch-fp32

step "episodes in a row: each read at once against read one late, as the trainer does"
for bb in convnet resnet18; do
  timeout 60 $PY benchmarks/episode.py --backbone $bb --device gpu --way 60 --shot 5 --query 5 \
    --episodes 10 --no-layers --in-a-row
done

step "where a ResNet-18 episode's time goes (one instrumented episode, TF32)"
timeout 60 $PY benchmarks/episode.py --backbone resnet18 --device gpu --tf32 --way 60 --shot 5 --query 5 --episodes 5

step "PyTorch's peak GPU memory for the same episodes (scratchproto's is in episode.py's lines above)"
timeout 60 $PY - "$REF" <<'EOF'
import argparse, importlib.util, sys
import torch
spec = importlib.util.spec_from_file_location("ref", sys.argv[1])
ref = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ref)
for bb in ("convnet", "resnet18"):
    torch.cuda.reset_peak_memory_stats()
    ref.cmd_time(argparse.Namespace(backbone=bb, way=60, shot=5, query=5, episodes=3, device="cuda"))
    print(f"torch {bb}: peak allocated {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB, "
          f"peak reserved {torch.cuda.max_memory_reserved() / 2**20:.0f} MiB")
EOF
fi   # CHECKS
if [ "$TRAIN_EPOCHS" -gt 0 ] && [ $(left) -gt $((EVAL_S + 60)) ]; then
  step "ResNet-18, the paper's protocol, TF32: up to $TRAIN_EPOCHS epochs in the background"
  mkdir -p "$OUT/resnet18-paper"
  run_args=(--backbone resnet18 --device gpu --tf32 --epochs "$TRAIN_EPOCHS" --out "$RUN")
  [ -f "$RUN/last.npz" ] && run_args=(--resume "$RUN" --epochs "$TRAIN_EPOCHS")
  $PY run.py "${run_args[@]}" --no-progress >> "$OUT/resnet18-paper/train.log" 2>&1 &
  train_pid=$!
  echo "pid $train_pid, log in resnet18-paper/train.log"
fi

if [ "$CHECKS" = 1 ]; then
step "CuPy tests"
xdist=$($PY -c "import xdist" 2>/dev/null && echo "-n 6")
timeout 180 $PY -m pytest -q -rfEs -p no:cacheprovider $xdist -k cupy tests/ --durations=8

step "one short ConvNet training, FP32 and TF32 (2 epochs of 20 training and 10 validation episodes)"
for flag in "" "--tf32"; do
  rm -rf "runs/gpu-epoch$flag"
  timeout 90 $PY run.py --backbone convnet --device gpu --epochs 2 --train-episodes 20 --val-episodes 10 \
    $flag --out "runs/gpu-epoch$flag" --no-progress
done
fi   # CHECKS

if [ -n "$train_pid" ]; then
  wait_s=$(( $(left) - EVAL_S ))
  step "training on for $wait_s s more"
  while [ $wait_s -gt 0 ] && kill -0 "$train_pid" 2>/dev/null; do sleep 2; wait_s=$((wait_s - 2)); done
  kill -TERM "$train_pid" 2>/dev/null
  wait "$train_pid"
  echo "training exited with status $? after $( [ -f $RUN/trace.jsonl ] && wc -l < $RUN/trace.jsonl || echo 0) epochs"
  tail -n 4 "$OUT/resnet18-paper/train.log"
  if [ -f "$RUN/best.npz" ]; then
    step "test evaluation of $RUN/best.npz on the GPU, --standard"
    timeout $(( $(left) > 30 ? $(left) - 15 : 15 )) $PY run.py --eval "$RUN/best.npz" --standard --device gpu --tf32 --no-progress
    timeout 30 $PY run.py --plot "$RUN"
  fi
  cp "$RUN"/*.json "$RUN"/*.jsonl "$RUN"/*.png "$OUT/resnet18-paper/" 2>/dev/null
fi
step "done"
cat "$OUT/results"
}

main 2>&1 | tee "$OUT/gpu_check.log"
# a call returns at most 8 files: everything goes back as one tar, beside the log
cp -r runs/gpu-epoch runs/gpu-epoch--tf32 "$OUT/" 2>/dev/null
rm -f "$OUT"/gpu-epoch*/*.npz
tar cf /tmp/gpu.tar -C "$OUT" . && find "$OUT" -mindepth 1 -delete && mv /tmp/gpu.tar "$OUT/" \
  && tar xf "$OUT/gpu.tar" -C "$OUT" ./gpu_check.log
