#!/usr/bin/env bash
# The GPU checks in one prepared run, for a lent GPU machine whose python3 already holds PyTorch
# (see docs/gpu.md). Wheels for the packages that machine lacks travel in .whl/ (downloaded here by
# `make gpu-wheels`); figures go to $OUT (or ./gpu-out) as text.
#
#   bash bench/gpu_session.sh
set -o pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c "import torch, faiss, grpc; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| faiss', faiss.__version__, '| grpcio', grpc.__version__)"
    nproc
} 2>&1 | tee "$OUT/machine.txt"
python3 bench/gpu_check.py --images 10000 --queries 50 --candidates 100 1000 4000 2>&1 | tee "$OUT/gpu_check.txt"
