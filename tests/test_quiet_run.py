"""A plain CPU run prints megacca's own lines only: the libraries' known-harmless warnings are hidden (by exact
message, megacca/cli.py), and whatever else a library warns about still shows."""
from __future__ import annotations

import re

from conftest import PY, run

# megacca's INFO log lines and its note that it starts the ranks itself.
OWN_STDERR = re.compile(r"\d\d:\d\d:\d\d INFO megacca\.|megacca: .*starting 2 ranks")


def test_tp2_debug_run_has_a_clean_stderr(tmp_path):
    # PYTHONWARNINGS="" restores Python's default filters (the other tests' runs ignore all warnings).
    p = run([PY, "-m", "megacca", "train", "configs/pretrain/debug.yaml", f"train.run_dir={tmp_path / 'run'}",
             "train.max_steps=2", "parallel.tp=2", "train.save_every=0", "train.progress_bar=off"],
            PYTHONWARNINGS="")
    foreign = [line for line in p.stderr.splitlines() if not OWN_STDERR.match(line)]
    assert not foreign, "\n".join(foreign)
    # DeepSpeed logs to stdout; its CPU-accelerator notice is one of the hidden ones.
    assert "Setting accelerator to CPU" not in p.stdout
    assert "step      2 | loss" in p.stdout


def test_unrelated_warnings_still_show(tmp_path):
    """The filters match exact messages: another warning from the same megatron module is not hidden."""
    code = ("import warnings, megacca.cli as c; c.hide_known_harmless_warnings(); "
            "import megatron.core.transformer.transformer_config as m; "
            "warnings.warn_explicit('full scope is deprecated. Something else.', UserWarning, m.__file__, 1, "
            "module=m.__name__); "
            "warnings.warn_explicit('full scope is deprecated. Use empty cuda_graph_scope to capture the whole "
            "layer.', UserWarning, m.__file__, 2, module=m.__name__)")
    p = run([PY, "-c", code], PYTHONWARNINGS="")
    assert "Something else." in p.stderr
    assert "capture the whole layer" not in p.stderr
