#!/usr/bin/env bash
# Build the digits training data, each step skipped when its output exists:
#   images (sklearn digits, training images with their 8 one-pixel shifts, shift-conditioned)
#   -> sentencepiece on the captions and shift words -> tiny VQ -> code shards -> vocab.json
#   -> image->caption preference pairs (DPO, un-shifted images only)
# Usage: bash launch/prepare_digits.sh [OUT_DIR=data/digits]
set -euo pipefail
case "${1:-}" in -h|--help) cat <<'EOF'
usage: bash launch/prepare_digits.sh [OUT_DIR]     (default OUT_DIR: data/digits)

Builds the digits training data, each step skipped when its output exists: image shards (scikit-learn
digits; every training image also as its 8 copies shifted by one pixel, which the loader marks in the
condition, docs/data-format.md "Augmented samples"; held-out images unshifted) -> sentencepiece on the
captions and shift words -> tiny VQ tokenizer -> code shards -> vocab.json -> image->caption preference pairs
for DPO (caption_pairs/, unshifted images only).
Environment: MEGACCA_PYTHON (default .venv/bin/python); MEGACCA_DIGITS_AUGMENT=0 builds without the shifted
copies; MEGACCA_VQ_THREADS (default 2; 1 on a machine whose cores are busy with other work).
An OUT_DIR whose images were built the other way is refused (exit 2): use a new OUT_DIR.
EOF
  exit 0 ;;
esac
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${1:-data/digits}"
PY="${MEGACCA_PYTHON:-.venv/bin/python}"
mkdir -p "$OUT"
step() { printf '\n== %s\n' "$*"; }

AUGMENT="${MEGACCA_DIGITS_AUGMENT:-1}"
case "$AUGMENT" in
  1) AUG_FLAG=(--augment-shifts); AUG_WORDS=", training images with their 8 one-pixel shifts" ;;
  0) AUG_FLAG=(); AUG_WORDS="" ;;
  *) echo "prepare_digits.sh: error: MEGACCA_DIGITS_AUGMENT must be 0 or 1, got '$AUGMENT'" >&2; exit 2 ;;
esac
if [ ! -f "$OUT/images/manifest.json" ]; then
  step "image shards from the scikit-learn digits$AUG_WORDS"
  "$PY" tools/make_shards.py digits --out "$OUT/images" ${AUG_FLAG[@]+"${AUG_FLAG[@]}"}
else
  # every later step derives from these images: a directory built the other way would silently give the
  # other data set
  has=$("$PY" -c 'import json,sys; print(int("augment" in json.load(open(sys.argv[1]))))' "$OUT/images/manifest.json")
  if [ "$has" != "$AUGMENT" ]; then
    echo "prepare_digits.sh: error: $OUT/images was built $([ "$has" = 1 ] && echo with || echo without) the shifted" \
      "copies, MEGACCA_DIGITS_AUGMENT=$AUGMENT asks for the other; use a new OUT_DIR (or remove $OUT)" >&2
    exit 2
  fi
fi
if [ ! -f "$OUT/text.model" ]; then
  step "sentencepiece on the captions (and the shift words of augmented copies)"
  "$PY" tokenizers/train_text.py --input "$OUT/images" --vocab-size 128 --model-type bpe --out "$OUT/text"
fi
if [ ! -f "$OUT/vq/model.safetensors" ]; then
  step "VQ tokenizer (800 steps: about 1.5 minutes on an idle 2-vCPU machine)"
  # 2 threads: nothing else runs beside this step here, and on an idle 2-core machine 2 threads take 0.73x the
  # time of the config's 1 (which is chosen for busy machines, where 2 threads collapse); MEGACCA_VQ_THREADS=1
  # for a busy one. The thread count is part of the result (float summation order), not of its quality.
  "$PY" tokenizers/train_vq.py tokenizers/configs/vq_digits.yaml --data "$OUT/images" --out "$OUT/vq" \
    "train.threads=${MEGACCA_VQ_THREADS:-2}"
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
