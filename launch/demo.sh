#!/usr/bin/env bash
# The main job, from a clean clone: the CCA result in miniature on the handwritten digits, on a 2-core CPU.
# setup .venv -> digit shards (shift-augmented) -> sentencepiece -> VQ tokenizer -> code shards -> pretrain a
# unified model (class->image, caption->image, image->caption) -> pick the base by held-out loss -> sample
# without guidance and with CFG -> CCA -> the matched MLE control -> DPO on captions -> results.json/.md, sample
# grid, trade-off plot. The pipeline after the data is megacca/demo.py.
set -euo pipefail
usage() { cat <<'EOF'
usage: bash launch/demo.sh [--out DIR] [--seeds N] [--quick]

The CCA result in miniature, end to end on scikit-learn's handwritten digits (no download), on a CPU:
  data       digit shards with shift-conditioned augmentation, sentencepiece on the captions, a VQ
             tokenizer, code shards, the unified vocabulary, caption preference pairs
             (launch/prepare_digits.sh; each step skipped when its output exists)
  pretrain   the `digits` preset (1M parameters) on class->image, caption->image, image->caption;
             the checkpoint with the lowest held-out loss is the base (early stopping)
  evaluate   1,000 samples per row, judged by a classifier trained on the real training digits:
             conditional accuracy, Frechet distance to held-out digits, diversity
  align      CCA (no guidance needed afterwards), the matched MLE control, DPO on image->caption
Writes DIR/results.json, DIR/results.md, DIR/samples_<entry>.npz, DIR/samples.png, DIR/tradeoff.png and
the runs DIR/{pretrain,cca,finetune_mle,dpo} (other seeds: DIR/seed<N>/). About 9 minutes on 2 idle CPU cores (per seed after the first: ~7).

options:
  --out DIR    output directory (default runs/demo; its runs/ are replaced)
  --seeds N    train and evaluate seeds 0..N-1; results.md adds mean +- sd of the headline rows
  --quick      tiny step and sample counts: checks the pipeline in about two minutes (figures meaningless)
Environment: DATA (default data/digits).
EOF
}
OUT=runs/demo
ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --out) [ $# -ge 2 ] || { echo "demo.sh: error: --out needs a directory" >&2; exit 2; }; OUT="$2"; shift 2 ;;
    --out=*) OUT="${1#--out=}"; shift ;;
    --seeds|--seeds=*)
      if [ "$1" = --seeds ]; then n="${2:-}"; shift $(( $# >= 2 ? 2 : 1 )); else n="${1#--seeds=}"; shift; fi
      [[ "$n" =~ ^[1-9][0-9]*$ ]] || { echo "demo.sh: error: --seeds must be a positive integer, got '$n'" >&2; exit 2; }
      ARGS+=(--seeds "$n") ;;
    --quick) ARGS+=(--quick); shift ;;
    *) echo "demo.sh: error: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
STARTED=$(date +%s.%N)
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash launch/setup_env.sh
PY=.venv/bin/python
DATA="${DATA:-data/digits}"
bash launch/prepare_digits.sh "$DATA"
exec "$PY" -m megacca.demo --data "$DATA" --out "$OUT" --started "$STARTED" ${ARGS[@]+"${ARGS[@]}"}
