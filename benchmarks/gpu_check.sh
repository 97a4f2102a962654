#!/usr/bin/env bash
# One sitting on a GPU machine, in order of importance, inside a time budget:
#   1. the CuPy variants of the tests;
#   2. one instrumented episode of each backbone on the GPU (per-layer times; also the gate for 4);
#   3. scratchproto (CuPy) against PyTorch (cuDNN), alternating, both backbones, 60-way 5-shot
#      5-query, and PyTorch's peak GPU memory for the same episodes; im2col chunk sizes;
#   4. with the time left: ResNet-18 trained with the paper's protocol on the GPU for up to
#      $EPOCHS epochs (the width sweep's 10), then its 1000-episode test evaluation.
# Needs CuPy and torch (with CUDA) in $PY, the Omniglot folder data/omniglot (archives, splits
# and cache, as `python run.py` leaves it) and the PyTorch reference at $REF.
#   OUT=gpu-out REF=../shared/reference/torch_protonet.py bash benchmarks/gpu_check.sh
# The log goes to $OUT/gpu_check.log, the ResNet-18 run's trace, config, eval and log to
# $OUT/resnet18-gpu/.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-gpu-out}
REF=${REF:-../shared/reference/torch_protonet.py}
BUDGET=${BUDGET:-540}              # seconds for the whole script
EPOCHS=${EPOCHS:-10}
RUN=runs/resnet18-gpu
export PYTHONUNBUFFERED=1
EVAL_RESERVE=${EVAL_RESERVE:-100}  # seconds kept for the test evaluation after training
mkdir -p "$OUT/resnet18-gpu"
start=$SECONDS
left() { echo $((BUDGET - (SECONDS - start))); }
step() { echo; echo "=== [$((SECONDS - start)) s] $*"; }

main() {
step "machine"
date -u
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
$PY -c "import cupy, numpy, torch, sys; print('python', sys.version.split()[0], 'cupy', cupy.__version__, \
'cuda runtime', cupy.cuda.runtime.runtimeGetVersion(), 'numpy', numpy.__version__, 'torch', torch.__version__, \
'cudnn', torch.backends.cudnn.version(), 'cudnn.allow_tf32', torch.backends.cudnn.allow_tf32, \
'matmul.allow_tf32', torch.backends.cuda.matmul.allow_tf32)"

step "CuPy tests"
timeout 180 $PY -m pytest -q -rfEs -p no:cacheprovider -k cupy tests/ --durations=8

step "one instrumented episode per backbone (gate for the training)"
gate=0
timeout 120 $PY benchmarks/episode.py --backbone resnet18 --device gpu --way 60 --episodes 5 || gate=1
timeout 60 $PY benchmarks/episode.py --backbone convnet --device gpu --way 60 --episodes 20 --data data/omniglot

step "scratchproto vs PyTorch, alternating"
timeout 120 $PY benchmarks/compare.py --torch-python "$(command -v $PY)" --reference "$REF" \
  --backbone convnet --device gpu --way 60 --shot 5 --query 5 --episodes 10 --rounds 3
timeout 150 $PY benchmarks/compare.py --torch-python "$(command -v $PY)" --reference "$REF" \
  --backbone resnet18 --device gpu --way 60 --shot 5 --query 5 --episodes 10 --rounds 3

step "PyTorch's peak GPU memory for the same episodes (the reference's time command prints none)"
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

step "im2col chunk size on the GPU (fast.py's 2**21 floats was chosen on the CPU)"
timeout 90 $PY benchmarks/conv_chunks.py --device gpu --log2-chunks 21 24 27
for lg in 21 27; do
  timeout 60 $PY benchmarks/episode.py --backbone resnet18 --device gpu --way 60 --episodes 5 --no-layers --log2-chunk $lg
done

train_s=$(( $(left) - EVAL_RESERVE ))
if [ $gate -ne 0 ] || [ $train_s -lt 60 ]; then
  step "no training: gate $gate, $train_s s left for it"
  return
fi
step "ResNet-18, the paper's protocol, on the GPU: up to $EPOCHS epochs in $train_s s"
timeout -s TERM $train_s $PY run.py --backbone resnet18 --device gpu --epochs $EPOCHS --out $RUN \
  --no-progress 2>&1 | tee "$OUT/resnet18-gpu/train.log"
cp $RUN/config.json $RUN/trace.jsonl "$OUT/resnet18-gpu/"
eval_s=$(( $(left) - 5 ))
step "test evaluation of $RUN/best.npz in $eval_s s"
timeout $eval_s $PY run.py --eval $RUN/best.npz --standard --device gpu --no-progress 2>&1 \
  | tee "$OUT/resnet18-gpu/eval.log"
cp $RUN/eval.json "$OUT/resnet18-gpu/"
step "done"
}

main 2>&1 | tee "$OUT/gpu_check.log"
