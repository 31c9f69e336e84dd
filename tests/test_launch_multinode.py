"""The README's multi-node command without ssh, run as two "nodes" on this machine.

Two deepspeed launchers, `--hostfile H --no_ssh --node_rank 0|1`, one rank each, must train exactly like one
launcher with two ranks (`deepspeed --num_gpus 2`): the same two ranks, data shards and all-reduces, so the
losses, gradient norms and weights are bit-identical, not merely close.
"""
from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import torch

from conftest import PY, ROOT, clean_env, free_port, metrics

DEEPSPEED = str(Path(PY).parent / "deepspeed")
RUN = ["launch/pretrain.sh", "configs/pretrain/debug.yaml", "train.max_steps=2", "train.save_every=0",
       "train.progress_bar=off"]
TIMEOUT = 420  # the deepspeed launcher and two megacca starts on 2 busy cores: ~2 min measured


def _start(cmd: list[str]) -> subprocess.Popen:
    # Own session: on a timeout the launcher and the rank it started are killed together.
    return subprocess.Popen(cmd, cwd=ROOT, env=clean_env(OMP_NUM_THREADS=1), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _wait_all(procs: list[subprocess.Popen]) -> None:
    try:
        outs = [p.communicate(timeout=TIMEOUT) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        raise
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, f"{p.args} exited {p.returncode}\n{out[-3000:]}\n{err[-5000:]}"


def _weights(run_dir: Path) -> dict:
    from megacca.safe_load import safe_torch_load

    states = safe_torch_load(run_dir / "checkpoints" / "step_00000002" / "engine" / "deepspeed" /
                             "mp_rank_00_model_states.pt")
    return states["module"]


def test_two_nodes_without_ssh_match_one_node_dp2(tmp_path):
    # Two names for this machine, so the hostfile has two distinct "nodes" of one slot (one rank) each.
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    two, one = tmp_path / "two_nodes", tmp_path / "one_node"
    port = free_port()
    _wait_all([_start([DEEPSPEED, "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(rank),
                       "--master_addr", "127.0.0.1", "--master_port", str(port), *RUN, f"train.run_dir={two}"])
               for rank in (0, 1)])
    _wait_all([_start([DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), *RUN,
                       f"train.run_dir={one}"])])

    a, b = metrics(two), metrics(one)
    assert [m["step"] for m in a] == [1, 2]
    for ma, mb in zip(a, b):
        assert (ma["loss"], ma["grad_norm"], ma["loss_tokens"]) == (mb["loss"], mb["grad_norm"], mb["loss_tokens"])
    wa, wb = _weights(two), _weights(one)
    assert wa.keys() == wb.keys()
    assert any(isinstance(v, torch.Tensor) for v in wa.values())
    for k in wa:  # the weights, and megatron's `_extra_state` entries (None here)
        same = torch.equal(wa[k], wb[k]) if isinstance(wa[k], torch.Tensor) else wa[k] == wb[k]
        assert same, k
