#!/usr/bin/env bash
# The objects-world model's recipe (issue 19), as one script that can be stopped and run again:
# every step skips what is already done, and training resumes exactly from its last checkpoint.
#
#   WORK=/work/exp EPOCHS=4 MAX_MINUTES=110 bash scripts/objects_recipe.sh
#
# PRECISION=bf16 pays only on CPUs with AVX512-BF16 or AMX (and GPUs); on AVX2-only CPUs fp32 is 16x
# faster (bench/bench_precision.py), hence the default.
#
# Steps and their measured times on this machine's 2 cores (docs/model.md, "Learning the objects world"):
#   1. the corpus: 6,000 scenes, 20,962 captions by espeak-ng and Festival voices (10.5 min)
#   2. a fresh validation split: 1,000 scenes by voices training never hears (2 min), and flite splits
#   3. image-branch pretraining on the generator's labels, 20,000 scenes (22.6 min idle)
#   4. training from the pretrained image branch on the objects world (fp32 on AVX2: about 10.5 min per
#      epoch with 1 data worker); stops after the epoch that crosses MAX_MINUTES; run again to resume
#   5. both worlds: 6,000 shapes-world pairs (3 min) join the objects corpus and training goes on from
#      step 4's best model for EPOCHS2 epochs (about 14 min each on AVX2), so the shapes world is not
#      forgotten (session 11: after 4 + 6 epochs, docs/model.md)
#   6. evaluation: MISA recall on the fresh split and on flite speech, both worlds
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-/work/exp}
EPOCHS=${EPOCHS:-4}
EPOCHS2=${EPOCHS2:-6}
MAX_MINUTES=${MAX_MINUTES:-110}
PRECISION=${PRECISION:-fp32}
M=.venv/bin/matchmap
mkdir -p "$WORK"
# finished DIR EPOCHS: the run in DIR has written its summary after EPOCHS epochs (a budget stop writes one too)
finished() { [ -f "$1/summary.json" ] && .venv/bin/python -c \
    "import json, sys; sys.exit(json.load(open(sys.argv[1]))['epochs'] < int(sys.argv[2]))" "$1/summary.json" "$2"; }

[ -f "$WORK/obj6k/val.json" ] ||
    $M synth "$WORK/obj6k" --world objects --pairs 6000 --val-pairs 500 --engines espeak,festival --seed 3 -q
[ -f "$WORK/fresh1k/val.json" ] ||
    $M synth "$WORK/fresh1k" --world objects --pairs 1 --val-pairs 1000 --engines espeak,festival --seed 1019 -q
[ -f "$WORK/objects-flite/val.json" ] ||
    $M synth "$WORK/objects-flite" --world objects --pairs 1 --val-pairs 300 --engines flite --seed 9 -q
[ -f "$WORK/shapes-val/val.json" ] ||
    $M synth "$WORK/shapes-val" --pairs 1 --val-pairs 1000 --engines espeak,festival --seed 7 -q
[ -f "$WORK/shapes-flite/val.json" ] ||
    $M synth "$WORK/shapes-flite" --pairs 1 --val-pairs 500 --engines flite --seed 8 -q

if ! finished "$WORK/pre20k" 10; then
    resume=(); [ -f "$WORK/pre20k/last.pt" ] && resume=(--resume "$WORK/pre20k/last.pt")
    $M pretrain-images --out "$WORK/pre20k" --scenes 20000 --val-scenes 500 --epochs 10 --workers 2 -q "${resume[@]}"
fi

RUN="$WORK/run$EPOCHS"
if ! finished "$RUN" "$EPOCHS"; then
    resume=(); [ -f "$RUN/last.pt" ] && resume=(--resume "$RUN/last.pt")
    $M train --checkpoint "$WORK/pre20k/model.pt" --train "$WORK/obj6k/train.json" --val "$WORK/obj6k/val.json" \
        --out "$RUN" --epochs "$EPOCHS" --precision "$PRECISION" --workers 1 --eval-every 3 \
        --max-minutes "$MAX_MINUTES" -q "${resume[@]}"
fi

[ -f "$WORK/shapes6k/train.json" ] ||
    $M synth "$WORK/shapes6k" --pairs 6000 --val-pairs 0 --engines espeak,festival --seed 3 -q
if [ ! -f "$WORK/bothval.json" ]; then  # selection on both worlds: the objects val and 500 shapes-val pairs
    .venv/bin/python - "$WORK" <<'PY'
import dataclasses, sys
from training.manifest import combine_manifests, load_manifest, write_manifest
work = sys.argv[1]
shapes = load_manifest(f"{work}/shapes-val/val.json")
write_manifest(combine_manifests([load_manifest(f"{work}/obj6k/val.json"),
                                  dataclasses.replace(shapes, entries=shapes.entries[:500])]), f"{work}/bothval.json")
PY
fi
BOTH="$WORK/both$EPOCHS2"
if ! finished "$BOTH" "$EPOCHS2"; then
    resume=(); [ -f "$BOTH/last.pt" ] && resume=(--resume "$BOTH/last.pt")
    $M train --checkpoint "$RUN/best.pt" --train "$WORK/obj6k/train.json" --train "$WORK/shapes6k/train.json" \
        --val "$WORK/bothval.json" --out "$BOTH" --epochs "$EPOCHS2" --precision "$PRECISION" --workers 1 \
        --eval-every 3 --max-minutes "$MAX_MINUTES" -q "${resume[@]}"
fi
RUN=$BOTH

for split in fresh1k objects-flite shapes-val shapes-flite; do
    echo "== $split"
    $M eval --checkpoint "$RUN/best.pt" "$WORK/$split/val.json"
done
