#!/usr/bin/env bash
# Build the digits training data, each step skipped when its output exists:
#   images (sklearn digits) -> sentencepiece on the captions -> tiny VQ -> code shards -> vocab.json
#   -> image->caption preference pairs (DPO)
# Usage: bash launch/prepare_digits.sh [OUT_DIR=data/digits]
set -euo pipefail
case "${1:-}" in -h|--help) cat <<'EOF'
usage: bash launch/prepare_digits.sh [OUT_DIR]     (default OUT_DIR: data/digits)

Builds the digits training data, each step skipped when its output exists: image shards (scikit-learn
digits) -> sentencepiece on the captions -> tiny VQ tokenizer -> code shards -> vocab.json -> image->caption
preference pairs for DPO (caption_pairs/).
Environment: MEGACCA_PYTHON (default .venv/bin/python).
EOF
  exit 0 ;;
esac
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${1:-data/digits}"
PY="${MEGACCA_PYTHON:-.venv/bin/python}"
mkdir -p "$OUT"
step() { printf '\n== %s\n' "$*"; }

if [ ! -f "$OUT/images/manifest.json" ]; then
  step "image shards from the scikit-learn digits"
  "$PY" tools/make_shards.py digits --out "$OUT/images"
fi
if [ ! -f "$OUT/text.model" ]; then
  step "sentencepiece on the captions"
  "$PY" tokenizers/train_text.py --input "$OUT/images" --vocab-size 128 --model-type bpe --out "$OUT/text"
fi
if [ ! -f "$OUT/vq/model.safetensors" ]; then
  step "VQ tokenizer (800 steps: about 2 minutes on an idle 2-vCPU machine)"
  "$PY" tokenizers/train_vq.py tokenizers/configs/vq_digits.yaml --data "$OUT/images" --out "$OUT/vq"
fi
if [ ! -f "$OUT/codes/manifest.json" ]; then
  step "images -> code shards"
  "$PY" tools/vq_encode.py --vq "$OUT/vq" --src "$OUT/images" --out "$OUT/codes" --workers 2
fi
if [ ! -f "$OUT/vocab.json" ]; then
  step "unified vocabulary"
  vq_sha=$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["vq"]["sha256"])' "$OUT/codes/manifest.json")
  "$PY" megacca/tokenizer/vocab.py --text-model "$OUT/text.model" --codebook-size \
    "$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["vq"]["codebook_size"])' "$OUT/codes/manifest.json")" \
    --image-grid 4 4 --classes-from "$OUT/codes" --vq-sha256 "$vq_sha" --out "$OUT/vocab.json"
fi
if [ ! -f "$OUT/caption_pairs/manifest.json" ]; then
  step "image->caption preference pairs (for DPO) -> code shards"
  "$PY" tools/make_shards.py caption-pairs --src "$OUT/images" --out "$OUT/caption_pairs_images" --overwrite
  "$PY" tools/vq_encode.py --vq "$OUT/vq" --src "$OUT/caption_pairs_images" --out "$OUT/caption_pairs" --workers 2
fi
