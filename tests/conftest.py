"""Shared test helpers: run the real entry points as subprocesses with a timeout (a hang fails, never blocks)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megacca.distributed.init import free_port

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["MEGACCA_PYTHON"] = PY
    env["PYTHONWARNINGS"] = "ignore"
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run(cmd: list[str], timeout: int = 240, check: bool = True, **env) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, cwd=ROOT, env=clean_env(**env), capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}\n--- stdout\n{p.stdout[-3000:]}\n"
                             f"--- stderr\n{p.stderr[-5000:]}")
    return p


def torchrun(nproc: int, script: str, *args, timeout: int = 240) -> subprocess.CompletedProcess:
    return run([PY, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
                str(free_port()), script, *map(str, args)], timeout=timeout, OMP_NUM_THREADS=1)


def train(run_dir, *overrides, nproc: int = 1, config="configs/pretrain/debug.yaml", check=True, timeout=240,
          launcher="torchrun", script="launch/pretrain.sh", **env) -> subprocess.CompletedProcess:
    """The real launcher: `bash SCRIPT CONFIG overrides...` with NPROC ranks (SCRIPT: launch/pretrain.sh, or a
    stage's launch/cca_stage.sh / launch/dpo_stage.sh). Multi-rank runs use torchrun unless told otherwise (it
    starts in a third of the deepspeed launcher's time on 2 cores); the deepspeed launcher path has its own test."""
    return run(["bash", script, config, f"train.run_dir={run_dir}", "train.progress_bar=off",
                *overrides], timeout=timeout, check=check, NPROC=nproc, MEGACCA_LAUNCHER=launcher, **env)


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in metrics(run_dir)}


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs CUDA (flash-attn, Transformer Engine, GPU-only paths); skipped "
                                       "without it. On a GPU machine: .venv/bin/python -m pytest -m gpu tests")


def pytest_collection_modifyitems(config, items):
    """Skip `gpu` tests on a machine without CUDA, so the default suite (tests/run.sh) stays green on CPU."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (run `python -m pytest -m gpu tests` on a GPU machine)")
    for item in gpu_items:
        item.add_marker(skip)
