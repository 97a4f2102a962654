#!/usr/bin/env bash
# One sitting on a GPU machine (the GPU issue's plan), in order, inside a time budget:
#   1. versions, and a TF32 self-check (CuPy's float32 product with TF32 off and on, against float64);
#   2. the CuPy variants of the tests (FP32: TF32 stays off in them);
#   3. each CUDA kernel against its NumPy twin, and the kernels end to end; if these pass, the
#      comparisons below run with SCRATCHPROTO_KERNELS=1 (and the ConvNet once without, INFO line);
#   4. scratchproto (CuPy) against PyTorch (cuDNN), alternating: ConvNet FP32 against PyTorch's
#      default, ResNet-18 TF32 against PyTorch's default, ResNet-18 FP32 against PyTorch in FP32
#      (NVIDIA_TF32_OVERRIDE=0); 60-way 5-shot 5-query; episodes in a row, each read at once
#      against read one late (the trainer's way); PyTorch's peak GPU memory;
#   5. one short training epoch of the ConvNet in FP32 and in TF32 (finite, falling loss);
#   6. with the time left and TRAIN_EPOCHS > 0: ResNet-18 with the paper's protocol (the ResNet issue).
# The log ends with the RESULT lines the GPU issue asks for.
# Needs CuPy and torch (with CUDA) in $PY, the Omniglot files in data/omniglot or a mirror in
# $SCRATCHPROTO_MIRROR, and the PyTorch reference at $REF.
#   OUT=gpu-out REF=../shared/reference/torch_protonet.py bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-gpu-out}
REF=${REF:-../shared/reference/torch_protonet.py}
BUDGET=${BUDGET:-480}              # seconds for the whole script
TRAIN_EPOCHS=${TRAIN_EPOCHS:-0}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
start=$SECONDS
left() { echo $((BUDGET - (SECONDS - start))); }
step() { echo; echo "=== [$((SECONDS - start)) s] $*"; }
compare() {   # compare.py with its arguments; prints its lines and keeps the summary in $OUT/last_compare
  timeout 150 $PY benchmarks/compare.py --torch-python "$(command -v $PY)" --reference "$REF" \
    --device gpu --way 60 --shot 5 --query 5 --episodes 10 --rounds 3 "$@" | tee "$OUT/last_compare"
}
result() {    # RESULT <backbone> <mode> scratchproto <s> <torch label> <s> ratio <r>, from the last compare
  # (a fourth argument replaces the word RESULT: lines that are not the GPU issue's three)
  awk -v b="$1" -v m="$2" -v t="$3" -v w="${4:-RESULT}" '/median sec\/episode/ {
    printf "%s %s %s scratchproto %s %s %s ratio %s\n", w, b, m, $4, t, $6, $8 }' "$OUT/last_compare" >> "$OUT/results"
}

main() {
: > "$OUT/results"
step "machine and versions"
date -u
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
$PY -c "import cupy, numpy, torch, sys; print('python', sys.version.split()[0], 'cupy', cupy.__version__, \
'cuda runtime', cupy.cuda.runtime.runtimeGetVersion(), 'numpy', numpy.__version__, 'torch', torch.__version__, \
'cudnn', torch.backends.cudnn.version(), 'cudnn.allow_tf32', torch.backends.cudnn.allow_tf32, \
'matmul.allow_tf32', torch.backends.cuda.matmul.allow_tf32)"

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

step "CuPy tests"
timeout 180 $PY -m pytest -q -rfEs -p no:cacheprovider -k cupy tests/ --durations=8

step "kernels against their NumPy twins"
kernels_ok=0
timeout 120 $PY -m pytest -q -p no:cacheprovider tests/test_kernels.py && kernels_ok=1

step "scratchproto vs PyTorch, alternating, 60-way 5-shot 5-query"
if [ $kernels_ok = 1 ]; then
  # the kernels passed on this GPU: the comparisons run them (the opt-in), and the ConvNet once
  # without them too, for the before and after in one sitting
  export SCRATCHPROTO_KERNELS=1
  echo "SCRATCHPROTO_KERNELS=1 (kernels' tests passed)"
  SCRATCHPROTO_KERNELS=0 compare --backbone convnet --rounds 2; result convnet fp32-no-kernels torch-default INFO
else
  echo "kernels' tests failed: the comparisons run without them"
fi
compare --backbone convnet; result convnet fp32 torch-default
compare --backbone resnet18 --tf32; result resnet18 tf32 torch-default
compare --backbone resnet18 --torch-fp32; result resnet18 fp32 torch-fp32

step "episodes in a row: each read at once against read one late, as the trainer does (issue 13, step 5)"
for bb in convnet resnet18; do
  timeout 90 $PY benchmarks/episode.py --backbone $bb --device gpu --way 60 --shot 5 --query 5 \
    --episodes 10 --no-layers --in-a-row
done

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

step "one short ConvNet training epoch, FP32 and TF32 (20 training and 10 validation episodes)"
for flag in "" "--tf32"; do
  rm -rf "runs/gpu-epoch$flag"
  timeout 90 $PY run.py --backbone convnet --device gpu --epochs 2 --train-episodes 20 --val-episodes 10 \
    $flag --out "runs/gpu-epoch$flag" --no-progress
done

train_s=$(( $(left) - 10 ))
if [ "$TRAIN_EPOCHS" -gt 0 ] && [ $train_s -gt 60 ]; then
  step "ResNet-18, the paper's protocol: up to $TRAIN_EPOCHS epochs in $train_s s"
  mkdir -p "$OUT/resnet18-paper"
  run_args=(--backbone resnet18 --device gpu --epochs "$TRAIN_EPOCHS" --out runs/resnet18-paper)
  [ -f runs/resnet18-paper/last.npz ] && run_args=(--resume runs/resnet18-paper)   # a folder carried back in
  timeout -s TERM $train_s $PY run.py "${run_args[@]}" --no-progress 2>&1 | tee -a "$OUT/resnet18-paper/train.log"
  cp runs/resnet18-paper/config.json runs/resnet18-paper/trace.jsonl "$OUT/resnet18-paper/"
  # The checkpoints are larger than one returned file may be (16 MiB) and than one call returns
  # (8 files): last.npz (to resume; with Adam's moments, ~134 MB) and the weights of best.npz
  # (--strip, ~45 MB) are cut into 16 MiB parts in gpu-parts/ (kept on the warm machine), with
  # their SHA-256 in $OUT. Fetch them 8 at a time with follow-up calls while the machine is warm:
  #   cp gpu-parts/last.npz.part0[0-7] "$OUT"/          (then the rest, then best-weights.npz.part*)
  # and on this side: cat last.npz.part* > last.npz && sha256sum -c SHA256SUMS
  if [ -f runs/resnet18-paper/last.npz ]; then
    rm -rf gpu-parts && mkdir -p gpu-parts
    $PY run.py --strip runs/resnet18-paper/best.npz gpu-parts/best-weights.npz
    cp runs/resnet18-paper/last.npz gpu-parts/
    (cd gpu-parts && sha256sum last.npz best-weights.npz > SHA256SUMS \
      && split -b 16M -d last.npz last.npz.part && split -b 16M -d best-weights.npz best-weights.npz.part \
      && rm last.npz best-weights.npz && ls -l)
    cp gpu-parts/SHA256SUMS "$OUT/resnet18-paper/"
  fi
fi
step "done"
cat "$OUT/results"
}

main 2>&1 | tee "$OUT/gpu_check.log"
