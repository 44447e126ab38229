#!/usr/bin/env bash
# The main job end to end with the shipped model: a small spoken-scenes corpus is made, its images
# indexed into a collection, the search service started, spoken captions sent as queries, the hits
# printed, the service stopped. Everything lives in .demo/ (delete it to start over).
set -euo pipefail
cd "$(dirname "$0")/.."
MM=.venv/bin/matchmap
PY=.venv/bin/python
DEMO=.demo
DATA=$DEMO/data
PORT=${MATCHMAP_DEMO_PORT:-50561}

if ! grep -q '"world": "objects"' "$DEMO/corpus/val.json" 2>/dev/null; then
  echo "== 1. a spoken-scenes corpus: 60 images of everyday things (emoji), each with 2-5 spoken captions"
  echo "      (espeak-ng and Festival voices the model never heard)"
  $MM synth "$DEMO/corpus" --world objects --pairs 1 --val-pairs 60 --seed 2026 --engines espeak,festival --force
fi

echo "== 2. index the corpus images into the collection 'demo' (shipped model, SQLite catalog in $DATA)"
rm -rf "$DATA"  # a fresh library each run: one indexed with an earlier shipped model would be refused
$MM index --data-dir "$DATA" --collection demo "$DEMO/corpus/val.json" || [ $? -eq 1 ]
$MM collections --data-dir "$DATA"

echo "== 3. start the search service on localhost:$PORT"
$MM serve --data-dir "$DATA" --port "$PORT" --host 127.0.0.1 > "$DEMO/server.log" 2>&1 &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 120); do
  $PY -m search.healthcheck --target "127.0.0.1:$PORT" >/dev/null 2>&1 && break
  kill -0 $SERVER 2>/dev/null || { cat "$DEMO/server.log"; exit 1; }
  sleep 0.5
done

echo "== 4. speak: three captions from the corpus are the queries, one naming an animal, one a food, one a vehicle"
echo "      (their voices were never heard in training)"
mapfile -t wavs < <($PY scripts/demo_queries.py "$DEMO/corpus/val.json")
$MM query --server "127.0.0.1:$PORT" --collection demo --top-k 5 --json "${wavs[@]}" > "$DEMO/hits.json"
$PY scripts/demo_report.py "$DEMO/corpus/val.json" "$DEMO/hits.json" "$DEMO/results.png"
echo
echo "== 5. stop the service"
kill -TERM $SERVER
wait $SERVER 2>/dev/null || true
trap - EXIT
echo "done. Next: see README.md (your own images: matchmap index --collection photos ~/Pictures)."
