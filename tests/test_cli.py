"""What a user sees from the command line: help texts, and one line with exit code 2 for each of their
mistakes (a missing data path, a vocabulary that does not fit the shards, a corrupt shard under
data.on_error=raise) before or instead of a traceback; a finished run says so."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import PY, ROOT, metrics, run, train
from megacca.cli import main
from megacca.tokenizer.vocab import UnifiedVocab

CFG = "configs/pretrain/digits.yaml"


# ------------------------------------------------------------------------------------------------- help
@pytest.mark.parametrize("argv,must", [
    (["--help"], ["train", "config", "bench", "configs/", "docs/", "README.md"]),
    (["-h"], ["COMMAND"]),
    (["train", "--help"], ["usage: megacca train", "CONFIG.yaml", "KEY=VALUE", "data.sources[0].path=", "examples"]),
    (["train", "-h"], ["usage: megacca train"]),
    (["config", "--help"], ["usage: megacca config", "KEY=VALUE", "examples"]),
    (["config", "-h"], ["usage: megacca config"]),
    (["bench", "--help"], ["usage: megacca bench", "train", "data", "examples"]),
    (["bench", "train", "--help"], ["usage: megacca bench train", "--presets", "examples"]),
    (["bench", "data", "--help"], ["usage: megacca bench data", "--shards", "examples"]),
    (["--help"], ["sample", "eval", "sweep"]),
    (["sample", "--help"], ["usage: megacca sample", "CKPT", "--class", "--prompt", "--cfg-scale", "--num-images",
                            "--seed", "--vq", "--out", "vq_sha256", "examples", "exit status"]),
    (["bench", "sample", "--help"], ["usage: megacca bench sample", "--presets", "--images", "random weights",
                                     "examples"]),
    (["eval", "--help"], ["usage: megacca eval"]),
    (["sweep", "--help"], ["usage: megacca sweep"]),
])
def test_help_exits_0_and_explains(capsys, argv, must):
    with pytest.raises(SystemExit) as e:
        main(argv)
    out = capsys.readouterr()
    assert e.value.code == 0, out.err
    for word in must:
        assert word in out.out, (word, out.out)
    assert "error" not in out.err


@pytest.mark.parametrize("argv,words", [([], ["COMMAND"]), (["trian"], ["invalid choice", "trian"]),
                                        (["train"], ["CONFIG.yaml"]), (["bench"], ["name a benchmark", "train"]),
                                        (["sample", "runs/x", "--out", "g.png"], ["--class", "--prompt"]),
                                        (["sample", "runs/x", "--class", "1", "--prompt", "a", "--out", "g.png"],
                                         ["not allowed with"]),
                                        (["sample", "runs/x", "--class", "one", "--out", "g.png"], ["--class"])])
def test_usage_mistakes_are_one_line_exit_2(capsys, argv, words):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert all(w in err for w in words), err


SCRIPTS = sorted([*Path(ROOT, "tools").glob("*.py"), *Path(ROOT, "tokenizers").glob("*.py"),
                  Path(ROOT, "megacca/tokenizer/vocab.py")])


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_python_tools_answer_help(script):
    p = run([PY, str(script), "--help"], timeout=120)
    assert p.stdout.startswith("usage:"), p.stdout


@pytest.mark.parametrize("script", sorted(Path(ROOT, "launch").glob("*.sh")), ids=lambda p: p.name)
def test_launch_scripts_answer_help(script):
    # A script that ignored --help would install, build data or train instead (and take far longer).
    p = run(["bash", str(script), "--help"], timeout=120)
    assert p.stdout.startswith("usage: bash launch/"), p.stdout
    assert "error" not in p.stderr.lower(), p.stderr


# ------------------------------------------------------------------------------------------------- data
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Random c2i code shards (4 of 60 samples, 4x4 codes of a 64-code book, 10 classes), their vocabulary,
    a vocabulary with another codebook, and a copy of the shards whose first tar is cut short."""
    from megacca.bench.data import write_random_code_shards

    d = tmp_path_factory.mktemp("cli")
    write_random_code_shards(str(d / "codes"), samples=240, grid=4, codebook=64, classes=10, per_shard=60)
    UnifiedVocab.build(None, 64, (4, 4), [str(k) for k in range(10)]).save(str(d / "vocab.json"))
    UnifiedVocab.build(None, 128, (4, 4), [str(k) for k in range(10)]).save(str(d / "other_vocab.json"))
    shutil.copytree(d / "codes", d / "cut")
    # A sample is 4 tar blocks of 512 bytes (codes.npy and json, each a header and one data block); cutting
    # inside the 21st sample's json data leaves 20 whole samples and damages key 00000020.
    with open(d / "cut" / "train-000000.tar", "r+b") as f:
        f.truncate(20 * 2048 + 1024 + 512 + 100)
    return d


def _opts(d, source, *extra):
    return [f"data.vocab={d / 'vocab.json'}", f"data.sources=[{{path: {source}, task: c2i}}]", "model.seq_length=48",
            "train.micro_batch_size=4", "train.max_steps=4", "train.save_every=0", *extra]


def _one_line(p) -> str:
    """The process's only stderr line that is not a log record; asserts there is no traceback."""
    assert "Traceback" not in p.stderr, p.stderr
    lines = [line for line in p.stderr.splitlines() if line.startswith("megacca:") and "starting" not in line]
    assert len(lines) == 1, p.stderr
    return lines[0]


@pytest.mark.parametrize("command,extra", [("config", []), ("train", ["parallel.tp=2"])])  # train: 2 ranks
def test_missing_data_path_exit_2_naming_the_key_before_anything_starts(tmp_path, data, command, extra):
    rd = tmp_path / "run"
    p = run([PY, "-m", "megacca", command, CFG, *_opts(data, tmp_path / "nowhere"), f"train.run_dir={rd}", *extra],
            check=False)
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip() == _one_line(p)
    assert _one_line(p).startswith("megacca: config error: data.sources[0].path: ")
    assert str(tmp_path / "nowhere" / "manifest.json") in p.stderr
    assert not rd.exists()  # no half-made run directory


@pytest.mark.parametrize("override,key,words", [
    ("data.vocab={d}/other_vocab.json", "data.vocab", ["codebook of 64", "128"]),  # codes from another codebook
    ("data.vocab={d}/missing.json", "data.vocab", ["missing.json"]),
    ("data.text_model={d}/missing.model", "data.text_model", ["missing.model"]),
    ("data.sources[0].split=heldout", "data.sources[0].split", ["heldout", "has: train"]),
    ("data.sources[0].task=text", "data.sources[0].task", ["'text'", "'codes'"]),
])
def test_data_that_does_not_fit_exit_2_naming_the_key(tmp_path, data, override, key, words):
    rd = tmp_path / "run"
    p = run([PY, "-m", "megacca", "train", CFG, *_opts(data, data / "codes"), f"train.run_dir={rd}",
             override.format(d=data)], check=False)
    assert p.returncode == 2, p.stderr
    line = _one_line(p)
    assert line.startswith(f"megacca: config error: {key}: "), line
    assert all(w in line for w in words), line
    assert not rd.exists()


@pytest.mark.parametrize("nproc", [1, 2])
def test_corrupt_shard_with_on_error_raise_is_one_line_exit_2(tmp_path, data, nproc):
    """The damage is met inside a DataLoader worker of one rank; with 2 ranks the other one is in the step's
    collectives. Each rank leaves with exit 2, the one that read the shard says where, and no rank or
    launcher prints a traceback."""
    p = train(tmp_path / "run", *_opts(data, data / "cut", "data.num_workers=2", "data.on_error=raise"),
              config=CFG, nproc=nproc, check=False)
    assert p.returncode == 2, p.stderr[-3000:]
    line = _one_line(p)
    assert line.startswith("megacca: error: ") and "train-000000.tar" in line and "'00000020'" in line, line


def test_rerunning_a_finished_run_says_it_is_complete(tmp_path):
    rd = tmp_path / "run"
    opts = ["train.max_steps=2", "train.save_every=0"]
    train(rd, *opts)
    before = (rd / "config.yaml").stat().st_mtime_ns
    p = train(rd, *opts)
    assert f"megacca: run {rd} is complete (step 2 of 2); raise train.max_steps" in p.stderr, p.stderr
    assert [m["step"] for m in metrics(rd)] == [1, 2]  # nothing trained, nothing appended
    assert (rd / "config.yaml").stat().st_mtime_ns == before  # nor rewritten
