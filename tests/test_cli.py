"""One command-line convention: config file and/or key=value with training's key names, flags as aliases."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cellvit_ssl.cli import COMMANDS, main
from cellvit_ssl.embed import COMMAND_LINE as EMBED
from cellvit_ssl.errors import ConfigError
from cellvit_ssl.evaluate import COMMAND_LINE as EVALUATE
from cellvit_ssl.train import COMMAND_LINE as TRAIN


def test_cellvit_ssl_lists_its_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("train", "embed", "evaluate", "index"))
    assert set(COMMANDS) >= {"train", "embed", "evaluate", "index"}
    assert main(["embedd"]) == 2
    assert "did you mean 'embed'" in capsys.readouterr().err


def test_console_script_and_module_run_the_same_command():
    proc = subprocess.run([sys.executable, "-m", "cellvit_ssl.cli", "evaluate", "--help"], capture_output=True,
                          text=True)
    assert proc.returncode == 0 and "evaluate.label_key=null" in proc.stdout and "--label-key" in proc.stdout


@pytest.mark.parametrize("line, keys", [
    (TRAIN, ["data.num_workers=2", "train.epochs=100", "model.variant=boc", "ssl.centering=sinkhorn_knopp"]),
    (EMBED, ["data.num_workers=2", "embed.pooling=default", "embed.chunk_rows=512"]),
    (EVALUATE, ["data.num_workers=0", "evaluate.k=10", "evaluate.protocol=auto"]),
])
def test_help_lists_every_key_with_its_default_and_documentation(line, keys, capsys):
    with pytest.raises(SystemExit) as stop:
        line.parse(["--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    for key in keys:
        row = next(r for r in out.splitlines() if r.strip().startswith(key))
        assert len(row.split(key, 1)[1].strip()) > 5, f"{key} has no documentation in --help"


def test_flags_are_aliases_of_keys_with_one_list_syntax():
    by_keys = EMBED.load(EMBED.parse(["ckpt.pt", "data.index=i.csv", "data.num_workers=3", "embed.out=o.h5ad",
                                      "embed.channels=[DAPI,tubulin]"]))
    by_flags = EMBED.load(EMBED.parse(["ckpt.pt", "--index", "i.csv", "--workers", "3", "--out", "o.h5ad",
                                       "--channels", "DAPI,tubulin"]))
    spaced = EMBED.load(EMBED.parse(["ckpt.pt", "--index=i.csv", "--workers", "3", "--out", "o.h5ad",
                                     "--channels", "DAPI", "tubulin"]))
    assert by_keys == by_flags == spaced
    assert by_flags.embed.checkpoint == "ckpt.pt" and by_flags.embed.channels == ["DAPI", "tubulin"]
    assert EMBED.load(EMBED.parse(["c.pt", "--no-progress", "--allow-missing"])).embed.allow_missing
    pairs = EVALUATE.load(EVALUATE.parse(["e.h5ad", "--leave-out", "Task_three=cell_type,Task_four=Plate"]))
    assert pairs.evaluate.leave_out == {"Task_three": "cell_type", "Task_four": "Plate"}


def test_config_file_then_overrides(tmp_path):
    cfg = tmp_path / "embed.yaml"
    cfg.write_text("data:\n  num_workers: 4\nembed:\n  out: cells.h5ad\n  pooling: protein\n")
    loaded = EMBED.load(EMBED.parse(["ckpt.pt", str(cfg), "embed.pooling=mean"]))
    assert loaded.data.num_workers == 4 and loaded.embed.out == "cells.h5ad" and loaded.embed.pooling == "mean"


@pytest.mark.parametrize("argv, hint", [
    (["ckpt.pt", "embed.pooing=mean"], "did you mean 'embed.pooling'"),
    (["ckpt.pt", "data.num_worker=2"], "did you mean 'data.num_workers'"),
    (["ckpt.pt", "--worker", "2"], "did you mean '--workers'"),
    (["ckpt.pt", "--index"], "needs a value"),
    (["ckpt.pt", "extra.pt"], "unexpected argument 'extra.pt'"),
    (["ckpt.pt", "data.mode=cell"], "expected one of"),
])
def test_mistakes_name_the_nearest_key(argv, hint):
    with pytest.raises(ConfigError, match=hint):
        EMBED.load(EMBED.parse(argv))


def test_every_command_reports_user_errors_with_status_2(tmp_path, capsys):
    from cellvit_ssl.data.index import main as index_main
    from cellvit_ssl.embed import main as embed_main
    from cellvit_ssl.evaluate import main as evaluate_main
    from cellvit_ssl.train import main as train_main

    for command, argv in ((train_main, ["train.epoch=3"]), (embed_main, [str(tmp_path / "x.pt"), "embed.ot=a"]),
                          (evaluate_main, ["e.h5ad", "evaluate.label=x"]), (index_main, ["folder", "--outt", "i"])):
        assert command(argv) == 2
        assert "did you mean" in capsys.readouterr().err


def test_console_script_help_names_each_command_module(capsys):
    """``cellvit-ssl --help`` says which ``python -m`` module runs each command (index is data.index)."""
    from cellvit_ssl import cli

    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name, (module, _) in cli.COMMANDS.items():
        assert f"python -m {module}" in out, name
    assert "python -m cellvit_ssl.data.index" in out
