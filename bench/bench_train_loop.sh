#!/usr/bin/env bash
# Training throughput in the real loop (data pipeline, workers and all), arm after arm on the same
# captions: `matchmap train --epochs 1` on the first STEPS x 64 captions of a manifest, from CHECKPOINT,
# once per arm; prints each arm's samples/s (metrics.jsonl). Run it on a quiet machine.
#
#   MANIFEST=/work/exp/obj18k/train.json VAL=/work/exp/obj18k/val.json CHECKPOINT=/work/exp/long/best.pt \
#       bash bench/bench_train_loop.sh
#
# Arms: audio length groups 1 (one padded batch) and 4, with one data worker; 4 with libgomp waiting
# passively; 4 with no worker. ARMS="NAME:GROUPS:WORKERS[:ENV=VALUE] ..." replaces them.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${MANIFEST:?a training manifest}" "${VAL:?a validation manifest}" "${CHECKPOINT:?a checkpoint to start from}"
STEPS=${STEPS:-64}
WORK=${WORK:-$(mktemp -d)}
ARMS=${ARMS:-"padded:1:1 groups4:4:1 groups4-passive:4:1:OMP_WAIT_POLICY=PASSIVE groups4-no-worker:4:0"}
.venv/bin/python - "$MANIFEST" "$VAL" "$WORK" "$STEPS" <<'PY'
import dataclasses, sys
from training.manifest import load_manifest, write_manifest
train, val, work, steps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
m = load_manifest(train)
write_manifest(dataclasses.replace(m, entries=m.entries[: steps * 64]), f"{work}/train.json")
v = load_manifest(val)
write_manifest(dataclasses.replace(v, entries=v.entries[:64]), f"{work}/val.json")
PY
echo "load average $(cut -d' ' -f1 /proc/loadavg) at start; $STEPS steps of 64 per arm"
for arm in $ARMS; do
    IFS=: read -r name groups workers env_var <<< "$arm"
    rm -rf "${WORK:?}/$name"
    env ${env_var:+"$env_var"} .venv/bin/matchmap train --checkpoint "$CHECKPOINT" --train "$WORK/train.json" \
        --val "$WORK/val.json" --out "$WORK/$name" --epochs 1 --precision fp32 --workers "$workers" \
        --audio-length-groups "$groups" -q > "$WORK/$name.log" 2>&1
    .venv/bin/python -c "import json, sys; r = json.loads(open(sys.argv[1]).readline()); print(f'{sys.argv[2]:<20} groups {sys.argv[3]}, workers {sys.argv[4]} {sys.argv[5]}: {r[\"samples_per_s\"]:.1f} samples/s')" \
        "$WORK/$name/metrics.jsonl" "$name" "$groups" "$workers" "${env_var:-}"
done
echo "reproduce: MANIFEST=$MANIFEST VAL=$VAL CHECKPOINT=$CHECKPOINT STEPS=$STEPS bash bench/bench_train_loop.sh"
