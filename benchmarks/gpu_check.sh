#!/usr/bin/env bash
# One sitting on a GPU machine: the GPU tests, then scratchproto's and PyTorch's (cuDNN) episode
# timings for both backbones, alternating. Needs CuPy and torch (with CUDA) in the Python used,
# and the Omniglot mirror at ../shared/data/omniglot or $SCRATCHPROTO_TEST_MIRROR.
#   bash benchmarks/gpu_check.sh > gpu_check.log 2>&1
# Not run yet: no session so far has had a GPU (see benchmarks/README.md).
set -uo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python -c "import cupy, numpy; print('cupy', cupy.__version__, 'numpy', numpy.__version__)"
python -m pytest -q tests/test_layers.py tests/test_backbones.py tests/test_fast.py tests/test_protonet.py -k cupy
for bb in convnet resnet18; do
  python benchmarks/compare.py --torch-python "$(command -v python)" --backbone "$bb" --device gpu \
    --way 60 --shot 5 --query 5 --episodes 10 --rounds 3
  python benchmarks/episode.py --backbone "$bb" --device gpu --way 60 --episodes 5 | tail -n +2
done
