#!/usr/bin/env bash
""":"
# megacca pretraining launcher. This file is valid bash AND valid Python: in bash line 2 is the no-op `:`
# command, in Python it opens a triple-quoted string that ends below. That lets the deepspeed launcher (which runs the given file
# with `python -u FILE --local_rank=N ...`) and plain bash both use it:
#   deepspeed [--num_gpus N | --hostfile H] launch/pretrain.sh CONFIG [key=value ...]
#   bash launch/pretrain.sh CONFIG [key=value ...]    # becomes the launcher itself, NPROC ranks
#   NPROC=2 bash launch/pretrain.sh configs/pretrain/debug.yaml parallel.tp=2
#   MEGACCA_LAUNCHER=torchrun NPROC=8 bash launch/pretrain.sh ...   # torchrun instead of the deepspeed launcher
# Multi-node without ssh: one launcher per node, e.g. under srun:
#   deepspeed --no_ssh --node_rank $SLURM_NODEID --num_nodes $SLURM_NNODES --master_addr $HEAD \
#             --master_port 29500 --num_gpus 8 launch/pretrain.sh CONFIG ...
set -euo pipefail
ENTRY="megacca train"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -n "${MEGACCA_PYTHON:-}" ]; then PY="$MEGACCA_PYTHON"
elif [ -x "$here/.venv/bin/python" ]; then PY="$here/.venv/bin/python"
else PY="$(command -v python3 || command -v python)"; fi

if [ -n "${RANK:-}" ] && [ -n "${WORLD_SIZE:-}" ]; then
  # Started by a launcher (deepspeed, torchrun): drop its --local_rank flag (LOCAL_RANK says the same).
  args=()
  skip=0
  for a in "$@"; do
    if [ "$skip" = 1 ]; then skip=0; continue; fi
    case "$a" in --local_rank=*) ;; --local_rank) skip=1 ;; *) args+=("$a") ;; esac
  done
  exec "$PY" -m megacca ${ENTRY#megacca } ${args[@]+"${args[@]}"}
fi

# Not under a launcher. Validate the config first (exit 2 on a bad one, before any rank starts).
NGPU=0
if command -v nvidia-smi > /dev/null 2>&1; then NGPU=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true); fi
NPROC="${NPROC:-$(( NGPU > 0 ? NGPU : 1 ))}"
WORLD_SIZE="$NPROC" "$PY" -m megacca config "$@" > /dev/null
if [ "$NPROC" = 1 ] && [ -z "${MEGACCA_FORCE_LAUNCHER:-}" ]; then
  exec "$PY" -m megacca ${ENTRY#megacca } "$@"  # one rank needs no launcher
fi
if [ "$NGPU" = 0 ]; then
  # The deepspeed launcher only pins threads with numactl; without it N CPU ranks would oversubscribe.
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}"
fi
PORT="${MASTER_PORT:-$((29500 + RANDOM % 1000))}"
if [ "${MEGACCA_LAUNCHER:-deepspeed}" = torchrun ]; then
  exec "$PY" -m torch.distributed.run --nproc_per_node "$NPROC" --master_port "$PORT" "$0" "$@"
fi
exec "$PY" -m deepspeed.launcher.runner --num_gpus "$NPROC" --master_port "$PORT" "$0" "$@"
":"""
# Python side: the deepspeed launcher ran this file with python; hand it back to bash with the same args.
import os
import sys

os.environ.setdefault("MEGACCA_PYTHON", sys.executable)
os.execvp("bash", ["bash", os.path.abspath(__file__), *sys.argv[1:]])
