#!/usr/bin/env bash
# Selective WSM fine-tuning vs full fine-tuning vs a frozen encoder, from one streamssl-pretrained
# encoder, on the synthetic corpus (CPU scale). Usage: recipes/selective/run.sh [OUT] [FINETUNE_STEPS]
# The encoder is the demo's cpu-small one with `sa` attention: LLSA couples its layers, so it has no
# per-layer attention to replace.
set -euo pipefail
out=${1:-runs/selective}
steps=${2:-1500}
streamssl corpus synth --out "$out/corpus" --hours 0.5 --seed 0
streamssl pretrain --preset cpu-small --set encoder.mixer=sa --train "$out/corpus/train.jsonl" --out "$out/pretrain"
for mode in "--replace last:2 --mixer wsm" "--full" "--frozen"; do
    name=$(echo "$mode" | awk '{print substr($1, 3)}')
    # shellcheck disable=SC2086
    streamssl finetune --preset cpu-small --init "$out/pretrain" $mode --steps "$steps" \
        --train "$out/corpus/train.jsonl" --dev "$out/corpus/dev.jsonl" --out "$out/$name"
    streamssl evaluate --checkpoint "$out/$name" --data "$out/corpus/test.jsonl" --json > "$out/$name.json"
done
