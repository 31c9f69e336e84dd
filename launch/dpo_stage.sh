#!/usr/bin/env bash
""":"
# megacca DPO (preference alignment) stage launcher. This file is valid bash AND valid Python: in bash line 2 is the no-op `:`
# command, in Python it opens a triple-quoted string that ends below. That lets the deepspeed launcher (which
# runs the given file with `python -u FILE --local_rank=N ...`) and plain bash both use it:
#   deepspeed [--num_gpus N | --hostfile H] launch/dpo_stage.sh CONFIG [key=value ...]
#   bash launch/dpo_stage.sh configs/dpo/digits_captions.yaml train.init_from=runs/demo
#   NPROC=2 bash launch/dpo_stage.sh configs/dpo/digits_captions.yaml parallel.tp=2
#   MEGACCA_LAUNCHER=torchrun NPROC=8 bash launch/dpo_stage.sh ...   # torchrun instead of the deepspeed launcher
# Multi-node without ssh: one launcher per node, all with the same hostfile ("NAME slots=N" per node; the
# README's Clusters section writes it under Slurm), e.g. under srun:
#   deepspeed --hostfile H --no_ssh --node_rank $SLURM_NODEID --master_addr $HEAD --master_port 29500 \
#             launch/dpo_stage.sh CONFIG ...
# The logic is launch/launcher.sh, shared by every stage.
STAGE=dpo
source "$(dirname "${BASH_SOURCE[0]}")/launcher.sh"
":"""
# Python side: the deepspeed launcher ran this file with python; hand it back to bash with the same args.
import os
import sys

os.environ.setdefault("MEGACCA_PYTHON", sys.executable)
os.execvp("bash", ["bash", os.path.abspath(__file__), *sys.argv[1:]])
