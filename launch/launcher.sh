# The body of the stage launchers (launch/pretrain.sh, launch/cca_stage.sh, launch/dpo_stage.sh), sourced by them
# with STAGE set: the same contract for every stage. Each stage script is valid bash AND valid Python (see
# launch/pretrain.sh), so the deepspeed launcher, torchrun, bash and ./script all run it; under a launcher (RANK
# and WORLD_SIZE set) this runs one rank, otherwise it validates the config and starts NPROC ranks on "$0".
if [ -z "${STAGE:-}" ]; then  # run itself rather than sourced by a stage script
  msg="usage: bash launch/pretrain.sh | launch/cca_stage.sh | launch/dpo_stage.sh CONFIG.yaml [KEY=VALUE ...]
launch/launcher.sh is the body those stage launchers share; their --help explains it."
  case "${1:-}" in -h|--help) echo "$msg"; exit 0 ;; *) echo "$msg" >&2; exit 2 ;; esac
fi
SELF="launch/$(basename "$0")"
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ENTRY="megacca train"
export MEGACCA_STAGE="$STAGE"  # `megacca train` refuses a config of another stage
if [ -n "${MEGACCA_PYTHON:-}" ]; then PY="$MEGACCA_PYTHON"
elif [ -x "$here/.venv/bin/python" ]; then PY="$here/.venv/bin/python"
else PY="$(command -v python3 || command -v python)"; fi

if [ -n "${RANK:-}" ] && [ -n "${WORLD_SIZE:-}" ]; then
  # Started by a launcher (deepspeed, torchrun); megacca's CLI drops the deepspeed launcher's --local_rank.
  exec "$PY" -m megacca ${ENTRY#megacca } "$@"
fi
case "${1:-}" in
  -h|--help)
    cat <<EOF
usage: bash $SELF CONFIG.yaml [KEY=VALUE ...]
       deepspeed [--num_gpus N | --hostfile H] $SELF CONFIG.yaml [KEY=VALUE ...]
       torchrun --nproc_per_node N $SELF CONFIG.yaml [KEY=VALUE ...]

Runs '$ENTRY' for a config of stage '$STAGE' on NPROC ranks (default: the GPUs, or 1 on a CPU
machine) after checking the config and the files it names (a problem: exit 2, one line naming the key).
Environment:
  NPROC=N                     ranks on this machine (N > 1 starts a launcher)
  MEGACCA_LAUNCHER=torchrun   torchrun instead of the deepspeed launcher
  MEGACCA_PYTHON=PATH         the Python to run (default: .venv/bin/python)
Under a launcher (RANK and WORLD_SIZE set) it runs one rank. README.md ("Training", "Clusters") has more.

The arguments are those of '$ENTRY':
EOF
    exec "$PY" -m megacca ${ENTRY#megacca } --help ;;
  "") echo "usage: bash $SELF CONFIG.yaml [KEY=VALUE ...]  (--help for more)" >&2; exit 2 ;;
esac

# Not under a launcher. Validate the config first (exit 2 on a bad one, before any rank starts).
NGPU=0
if command -v nvidia-smi > /dev/null 2>&1; then NGPU=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true); fi
NPROC="${NPROC:-$(( NGPU > 0 ? NGPU : 1 ))}"
if [ "$NPROC" = 1 ] && [ -z "${MEGACCA_FORCE_LAUNCHER:-}" ]; then
  # One rank needs no launcher, and `megacca train` checks the config and its files before it starts.
  exec "$PY" -m megacca ${ENTRY#megacca } "$@"
fi
# Check the config and the files it names once, here, before a launcher starts N ranks that would each fail.
WORLD_SIZE="$NPROC" "$PY" -m megacca config "$@" > /dev/null
if [ "$NGPU" = 0 ]; then
  # The deepspeed launcher only pins threads with numactl; without it N CPU ranks would oversubscribe.
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}"
fi
if [ "${MEGACCA_LAUNCHER:-deepspeed}" = torchrun ]; then
  NPROC="$NPROC" exec "$PY" -m megacca ${ENTRY#megacca } "$@"  # megacca starts NPROC ranks with torchrun
fi
PORT="${MASTER_PORT:-$((29500 + RANDOM % 1000))}"
exec "$PY" -m deepspeed.launcher.runner --num_gpus "$NPROC" --master_port "$PORT" "$0" "$@"
