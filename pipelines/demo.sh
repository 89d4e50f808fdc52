#!/usr/bin/env bash
# The demo's chain with one subcommand per stage: the example to copy for your own data.
#
# `meissonic demo` runs the same stages with the same settings in one process (and adds a summary);
# here every stage is a command you can rerun, change or replace:
#   - your own LAION-style parquet instead of `meissonic synth` and its local server (then drop the
#     server lines and point `curate` at your metadata);
#   - a released model folder (hf download MeissonFlow/Meissonic --local-dir DIR)
#     instead of the demo's tiny one, and a recipe from pipelines/stage*.yaml instead of
#     pipelines/demo_train.yaml (at 256 px or more, on a GPU).
#
# Usage:  bash pipelines/demo.sh [OUT]        (about 10 minutes on 2 CPU cores; OUT defaults to demo-sh-out)
# Smaller, for a quick look:  ROWS=1500 STEPS=200 IMAGES_PER_PROMPT=1 bash pipelines/demo.sh /tmp/demo-sh
set -euo pipefail

OUT=${1:-demo-sh-out}
ROWS=${ROWS:-18000}                        # synthetic metadata rows (about half survive curate)
STEPS=${STEPS:-}                           # training steps; empty: the recipe's max_steps
IMAGES_PER_PROMPT=${IMAGES_PER_PROMPT:-2}  # benchmark images per prompt (78 prompts)
SEED=${SEED:-0}
SAMPLER=(--steps 16 --guidance-scale 1.5 --temperature 1,0 --token-temperature 0.25 --resolution 64 --device cpu)
# Yielding OpenMP threads: spinning ones make torch several times slower on a busy CPU.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}

if [ -e "$OUT" ]; then
  echo "Error: $OUT already exists; remove it or pass another folder" >&2
  exit 1
fi
mkdir -p "$OUT"
start=$SECONDS
stage() { echo; echo "== $1 ($((SECONDS - start)) s so far)"; }

stage "model: tiny model folder (random transformer and text encoder) + patch VQ fitted on shapes scenes"
meissonic demo --model-only --out "$OUT" --seed "$SEED"

stage "synth: LAION-style source, served on 127.0.0.1 (any free port) until this script ends"
# (--sides 64: served at the training size, as `meissonic demo` does, so edges stay crisp.)
meissonic synth --out "$OUT/source" --rows "$ROWS" --seed "$SEED" --sides 64 --serve --port 0 \
  >"$OUT/server.log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null || true' EXIT
until grep -q '^serving' "$OUT/server.log" 2>/dev/null; do
  kill -0 "$server" 2>/dev/null || { cat "$OUT/server.log" >&2; exit 1; }
  sleep 0.5
done
cat "$OUT/server.log"

stage "curate: filter the metadata with DuckDB"
meissonic curate "$OUT/source/metadata" --out "$OUT/curated" \
  --max-watermark 0.5 --max-unsafe 0.5 --min-side 64 --max-aspect-ratio 2 --min-caption-words 2 --seed "$SEED"

stage "download: img2dataset over the loopback server (PNG keeps the flat colours exact)"
meissonic download "$OUT/curated" --out "$OUT/images" --image-size 64 --resize-mode keep_ratio \
  --encode-format png --encode-quality 1 --processes 1 --threads 8 --shard-size 2000
kill "$server" 2>/dev/null || true

stage "tokenize: VQ codes + text features + micro-conditions"
meissonic tokenize "$OUT/images" --out "$OUT/tokens" --model "$OUT/model" --resolution 64 \
  --batch-size 64 --device cpu --workers 1

stage "train: masked image modeling (recipe: pipelines/demo_train.yaml)"
meissonic train --config "$(dirname "$0")/demo_train.yaml" --data "$OUT/tokens" --out "$OUT/run" \
  --arch "$OUT/model" --base-model "$OUT/model" ${STEPS:+--max-steps "$STEPS" --checkpoint-every "$STEPS"}
checkpoint=$(ls -d "$OUT"/run/step-* | tail -n 1)

stage "sample: a few prompts, with a grid"
meissonic sample --model "$checkpoint" --out "$OUT/samples" --grid --batch-size 12 "${SAMPLER[@]}" --seed "$SEED" \
  -p "a red circle" -p "a blue square" -p "a yellow triangle on the left" -p "a green circle at the top" \
  -p "a purple square on the right" -p "an orange triangle at the bottom" -p "two blue circles" \
  -p "three red squares" -p "a red circle on the left and a blue square on the right" \
  -p "a yellow square at the top and a green triangle at the bottom" -p "a purple circle in the center" \
  -p "two orange triangles"

stage "eval: the shapes benchmark (pixel scorer, no weights)"
meissonic eval --suite shapes --prompts shapes --model "$checkpoint" --out "$OUT/eval" \
  --images-per-prompt "$IMAGES_PER_PROMPT" --sample-batch-size 64 "${SAMPLER[@]}" --seed "$SEED" --grid-size 24

echo
echo "done in $((SECONDS - start)) s: samples in $OUT/samples/grid.png, benchmark in $OUT/eval/report.json"
