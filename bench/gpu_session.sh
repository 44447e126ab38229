#!/usr/bin/env bash
# The GPU checks in one prepared run, for a lent GPU machine whose python3 already holds PyTorch
# (Python 3.12 there). Wheels for the packages that machine lacks travel in .whl/ (downloaded here
# by `make gpu-wheels`; carry the path .whl). Fits a 10-minute limit; each step has its own timeout
# and a failed step does not stop the others. Figures and a log go to $OUT (or ./gpu-out).
#
#   bash bench/gpu_session.sh            # the release gate: exit 0 only if every step passed
#   GPU_CHECK_ARGS="--images 2000 --skip-training" bash bench/gpu_session.sh   # a shorter gpu_check
#
# Steps: (1) the machine, and the versions seen; (2) the CUDA tests (pytest -k cuda: stage 2 with
# resident maps on CUDA against exact CPU scoring, the model's embeddings on CUDA against the CPU's);
# (3) bench/gpu_check.py: CPU vs CUDA search on 10,000 images at K = 100, 1000, 4000 under the
# precision policy (encoders/precision.py), then training on CUDA and throughput figures.
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
LOG="$OUT/session.log"
export PYTHONUNBUFFERED=1
export PYTHONDONTWRITEBYTECODE=1
failed=()

step() {  # step NAME SECONDS COMMAND...: run with a time limit, keep its output in $OUT/NAME.txt
    local name=$1 limit=$2
    shift 2
    echo "==== $name (limit ${limit} s): $*"
    local started=$SECONDS
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$name.txt"
    local rc=${PIPESTATUS[0]}
    echo "==== $name: exit $rc after $((SECONDS - started)) s"
    if [ "$rc" -ne 0 ]; then failed+=("$name (exit $rc)"); fi
}

main() {
if ls .whl/*.whl >/dev/null 2>&1; then
    if python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl; then
        export PYTHONPATH=/tmp/site:$PWD
    else
        failed+=("wheels"); export PYTHONPATH=$PWD
    fi
else
    echo "no .whl/ here (make gpu-wheels, then carry .whl): faiss, soundfile, grpc health and reflection will be missing"
    export PYTHONPATH=$PWD
fi

step machine 30 bash -ec '
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c "import torch, faiss, grpc; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"| faiss\", faiss.__version__, \"| grpcio\", grpc.__version__); assert torch.cuda.is_available(), \"torch sees no CUDA device\""
    echo "cpu cores: $(nproc)"'
# -rs lists skips: on this machine a skipped CUDA test means CUDA was not usable, so it counts as failed.
step cuda_tests 150 bash -c 'python3 -m pytest -q -p no:cacheprovider -rs -k cuda tests/test_search.py \
    tests/test_precision.py >/tmp/cuda_tests.out 2>&1; rc=$?; cat /tmp/cuda_tests.out
    if grep -q "skipped" /tmp/cuda_tests.out; then echo "CUDA tests were skipped: failing the step"; exit 1; fi
    exit $rc'
# shellcheck disable=SC2086  # GPU_CHECK_ARGS is a list of arguments
step gpu_check 360 python3 bench/gpu_check.py ${GPU_CHECK_ARGS:---images 10000 --queries 50 --candidates 100 1000 4000}

echo "==== summary"
if [ ${#failed[@]} -eq 0 ]; then
    echo "GPU SESSION OK: every step passed (log: $LOG)"
    return 0
fi
echo "GPU SESSION FAILED: ${failed[*]} (log: $LOG)"
return 1
}

main 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
