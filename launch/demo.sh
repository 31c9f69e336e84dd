#!/usr/bin/env bash
# The main job, from a clean clone: set up .venv, build the digits data (shards, sentencepiece, VQ, codes,
# vocabulary, caption preference pairs), then pretrain the debug preset on it with the real launcher. (The
# end-to-end CCA demo with sampling and evaluation replaces the last part with the generation work.) 2 min 54 s on
# a 2-vCPU machine; the README's Quick start gives the conditions.
set -euo pipefail
case "${1:-}" in -h|--help) cat <<'EOF'
usage: bash launch/demo.sh [KEY=VALUE ...]

The main job from a clean clone: set up .venv (launch/setup_env.sh), build the digits data
(launch/prepare_digits.sh; each step skipped when its output exists), pretrain the debug preset on it with
launch/pretrain.sh, print a summary. KEY=VALUE overrides go to the pretraining (see megacca train --help).
Environment: DATA (default data/digits), RUN (default runs/demo; removed first).
EOF
  exit 0 ;;
esac
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash launch/setup_env.sh
PY=.venv/bin/python
DATA="${DATA:-data/digits}"
RUN="${RUN:-runs/demo}"
bash launch/prepare_digits.sh "$DATA"
printf '\n== pretraining (debug preset, 2D rotary, class->image, caption->image and image->caption mixed 2:2:1)\n'
rm -rf "$RUN"
bash launch/pretrain.sh configs/pretrain/digits.yaml "data.vocab=$DATA/vocab.json" \
  "data.sources[0].path=$DATA/codes" "data.sources[1].path=$DATA/codes" "data.sources[2].path=$DATA/codes" \
  "train.run_dir=$RUN" \
  train.log_every=50 train.progress_bar=off "$@"
"$PY" - "$DATA" "$RUN" <<'PYEOF'
import json, sys
from pathlib import Path
data, run = Path(sys.argv[1]), Path(sys.argv[2])
vq = json.loads((data / "vq" / "train_report.json").read_text())
m = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
print("\n== demo summary")
print(f"VQ tokenizer: held-out reconstruction MSE {vq['recon_mse']:.5f}, "
      f"codebook usage {vq['codebook_usage']:.3f}")
print(f"pretraining: {len(m)} steps, loss {m[0]['loss']:.3f} -> {m[-1]['loss']:.3f}, "
      f"last step {m[-1]['tokens_per_s']:,.0f} tokens/s")
print(f"run directory: {run} (config.yaml, metrics.jsonl, tensorboard/, checkpoints/)")
PYEOF
