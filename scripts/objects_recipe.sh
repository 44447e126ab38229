#!/usr/bin/env bash
# The objects-world model's recipe (issue 19): the chain that made the shipped model, as one script
# that can be stopped and run again. Every step skips what is already done, and each training run
# resumes exactly from its last checkpoint (run the script again after a budget stop).
#
#   WORK=/work/exp MAX_MINUTES=110 bash scripts/objects_recipe.sh
#
# PRECISION=bf16 pays only on CPUs with AVX512-BF16 or AMX (and GPUs); on AVX2-only CPUs fp32 is 16x
# faster (bench/bench_precision.py), hence the default. Training needs about 19-22 GB of memory.
#
# Steps and their measured times on this machine's 2 cores (docs/model.md, "Learning the objects world"):
#   1. validation splits by voices training never hears: objects (1,000 scenes), shapes (1,000), flite
#   2. image-branch pretraining on the generator's labels, 20,000 scenes (43.7 min)
#   3. the corpus: 18,000 scenes, 63,049 captions by espeak-ng and Festival voices (27 min), and
#      6,000 shapes-world pairs (3 min), so that the shipped world is not forgotten
#   4. one epoch of the objects corpus from the pretrained image branch (985 steps, 24.5 min)
#   5. four epochs of both worlds on a fresh cosine (4,312 steps; 1 h 54 min for 3 epochs, a budget
#      stop, then 41 min for the 4th after resuming)
#   6. three epochs more on a fresh cosine at half the learning rate, the shapes world given twice
#      (3,516 steps, 1 h 36 min)
#   7. three epochs more on a fresh cosine, the shapes world three times (3,798 steps; 28.5 min per quiet
#      epoch, so about 1 h 30 min)
#   8. three epochs more on a fresh cosine at peak 4e-4, the shapes world five times (4,359 steps; about
#      1 h 45 min on quiet cores, 2 h 16 min here with the cores shared now and then)
#   9. two epochs more on a fresh cosine at peak 3e-4, the shapes world eight times (3,470 steps; 41 min
#      per quiet epoch, so about 1 h 25 min; 2 h 5 min here with the cores shared in its first epoch)
#  10. two epochs more on a fresh cosine at peak 3e-4, the shapes world nine times (3,656 steps; 38-46
#      samples/s, 1 h 45 min here)
#  11. stage-1 heads distilled from its MISA rankings on 3,000 objects and 1,500 shapes captions (the
#      shipped model, encoders/default_model/tiny.pt)
#  12. evaluation: MISA recall on the fresh split and on flite speech, both worlds
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-/work/exp}
MAX_MINUTES=${MAX_MINUTES:-110}
PRECISION=${PRECISION:-fp32}
M=.venv/bin/matchmap
mkdir -p "$WORK"
# finished DIR EPOCHS: the run in DIR has written its summary after EPOCHS epochs (a budget stop writes one too)
finished() { [ -f "$1/summary.json" ] && .venv/bin/python -c \
    "import json, sys; sys.exit(json.load(open(sys.argv[1]))['epochs'] < int(sys.argv[2]))" "$1/summary.json" "$2"; }
# run DIR EPOCHS ARGS...: matchmap train into DIR until it has EPOCHS epochs, resuming its last.pt
run() {
    local dir=$1 epochs=$2
    shift 2
    finished "$dir" "$epochs" && return 0
    local resume=(); [ -f "$dir/last.pt" ] && resume=(--resume "$dir/last.pt")
    $M train --out "$dir" --epochs "$epochs" --precision "$PRECISION" --workers 1 --max-minutes "$MAX_MINUTES" \
        -q "$@" "${resume[@]}"
    finished "$dir" "$epochs" || { echo "$dir stopped at its budget: run this script again to resume it"; exit 0; }
}

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

[ -f "$WORK/obj18k/val.json" ] ||
    $M synth "$WORK/obj18k" --world objects --pairs 18000 --val-pairs 500 --engines espeak,festival --seed 33 -q
[ -f "$WORK/shapes6k/train.json" ] ||
    $M synth "$WORK/shapes6k" --pairs 6000 --val-pairs 0 --engines espeak,festival --seed 3 -q
if [ ! -f "$WORK/bothval18.json" ]; then  # selection on both worlds: the objects val and 500 shapes-val pairs
    .venv/bin/python - "$WORK" <<'PY'
import dataclasses, sys
from training.manifest import combine_manifests, load_manifest, write_manifest
work = sys.argv[1]
shapes = load_manifest(f"{work}/shapes-val/val.json")
write_manifest(combine_manifests([load_manifest(f"{work}/obj18k/val.json"),
                                  dataclasses.replace(shapes, entries=shapes.entries[:500])]), f"{work}/bothval18.json")
PY
fi

OBJ=(--train "$WORK/obj18k/train.json")
SHAPES=(--train "$WORK/shapes6k/train.json")
run "$WORK/more" 1 --checkpoint "$WORK/pre20k/model.pt" "${OBJ[@]}" --val "$WORK/obj18k/val.json"
run "$WORK/long" 4 --checkpoint "$WORK/more/best.pt" "${OBJ[@]}" "${SHAPES[@]}" --val "$WORK/bothval18.json"
run "$WORK/long2" 3 --checkpoint "$WORK/long/best.pt" "${OBJ[@]}" "${SHAPES[@]}" "${SHAPES[@]}" \
    --val "$WORK/bothval18.json" --lr 5e-4 --seed 1
run "$WORK/long3" 3 --checkpoint "$WORK/long2/best.pt" "${OBJ[@]}" "${SHAPES[@]}" "${SHAPES[@]}" "${SHAPES[@]}" \
    --val "$WORK/bothval18.json" --lr 5e-4 --seed 2
run "$WORK/long4" 3 --checkpoint "$WORK/long3/best.pt" "${OBJ[@]}" "${SHAPES[@]}" "${SHAPES[@]}" "${SHAPES[@]}" \
    "${SHAPES[@]}" "${SHAPES[@]}" --val "$WORK/bothval18.json" --lr 4e-4 --seed 3
run "$WORK/long5" 2 --checkpoint "$WORK/long4/best.pt" "${OBJ[@]}" "${SHAPES[@]}" "${SHAPES[@]}" "${SHAPES[@]}" \
    "${SHAPES[@]}" "${SHAPES[@]}" "${SHAPES[@]}" "${SHAPES[@]}" "${SHAPES[@]}" --val "$WORK/bothval18.json" --lr 3e-4 --seed 4
run "$WORK/long6" 2 --checkpoint "$WORK/long5/best.pt" "${OBJ[@]}" "${SHAPES[@]}" "${SHAPES[@]}" "${SHAPES[@]}" \
    "${SHAPES[@]}" "${SHAPES[@]}" "${SHAPES[@]}" "${SHAPES[@]}" "${SHAPES[@]}" "${SHAPES[@]}" \
    --val "$WORK/bothval18.json" --lr 3e-4 --seed 5

if [ ! -f "$WORK/long6/stage1.pt" ]; then
    echo "== stage-1 heads"
    .venv/bin/python - "$WORK" <<'PY'
import json, sys
work = sys.argv[1]
for name, out, n in (("obj18k", "distill3k", 3000), ("shapes6k", "distill1500", 1500)):
    manifest = json.load(open(f"{work}/{name}/train.json"))
    manifest["data"] = manifest["data"][:n]
    json.dump(manifest, open(f"{work}/{name}/{out}.json", "w"))
PY
    $M distill-stage1 --checkpoint "$WORK/long6/best.pt" --train "$WORK/obj18k/distill3k.json" \
        --train "$WORK/shapes6k/distill1500.json" --out "$WORK/long6/stage1.pt"
fi

for split in fresh1k objects-flite shapes-val shapes-flite; do
    echo "== $split"
    $M eval --checkpoint "$WORK/long6/stage1.pt" "$WORK/$split/val.json"
done
