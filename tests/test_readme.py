"""The README's commands, kept working.

The convention the README follows (keep it when editing):

- every fenced ```` ```bash ```` block of README.md runs, in order, from a fresh copy of the
  repository, as a reader pasting it would (``test_readme_blocks_run_in_order_from_a_fresh_copy``,
  slow: it trains the demo);
- a block that cannot run there (it installs packages, needs your images, a GPU, a download)
  has ``<!-- not run by tests: REASON -->`` on the line right above its fence;
- commands are written one way, ``python -m cellvit_ssl.<command>`` (``cellvit-ssl <command>``,
  the console script, is the same command and is mentioned in prose only);
- every command of every block, run or not, and of docs/own_data.md, must parse: the
  package's commands load their config from the given file and ``key=value`` / flags (an
  unknown key, flag or value fails here), benchmark flags exist in the script, pip extras exist
  in pyproject.toml, and paths into the repository exist;
- train commands that run share a ``train.output_dir`` only when their settings agree, so a
  later block never damages an earlier block's run (the refusal would stop it anyway).
"""

from __future__ import annotations

import hashlib
import importlib
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = (README, ROOT / "docs" / "own_data.md")
SKIP = re.compile(r"<!-- not run by tests: (.+) -->")
#: Commands of other tools that the documents show; not checked here.
OTHER_TOOLS = {"apt-get", "tensorboard", "cellpose", "sudo", "srun", "scontrol", "nvidia-smi", "du"}
PACKAGE_COMMANDS = ("cellvit_ssl.train", "cellvit_ssl.embed", "cellvit_ssl.evaluate", "cellvit_ssl.data.index",
                    "cellvit_ssl.curate", "cellvit_ssl.finetune", "cellvit_ssl.predict")


@dataclass(frozen=True)
class Block:
    """One ```bash block of a document."""

    source: Path
    line: int
    text: str
    skip: str | None

    @property
    def where(self) -> str:
        return f"{self.source.name}:{self.line}"


def bash_blocks(path: Path) -> list[Block]:
    """The ```bash blocks of a Markdown file, in order, with their skip reason (if marked)."""
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```bash":
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
            marker = SKIP.fullmatch(lines[i - 1].strip()) if i else None
            blocks.append(Block(path, i + 1, "\n".join(lines[i + 1:end]) + "\n", marker.group(1) if marker else None))
            i = end
        i += 1
    return blocks


def commands(block: Block) -> list[list[str]]:
    """The commands of a block, split as a shell would (continuations joined, comments and ``&&`` split)."""
    out = []
    for line in block.text.replace("\\\n", " ").splitlines():
        argv = shlex.split(line, comments=True)
        while argv:
            cut = argv.index("&&") if "&&" in argv else len(argv)
            out.append(argv[:cut])
            argv = argv[cut + 1:]
    return [a for a in out if a]


def _strip_env(argv: list[str]) -> list[str]:
    while argv and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", argv[0]):
        argv = argv[1:]
    return argv


def _module_call(argv: list[str]) -> tuple[str, list[str]] | None:
    """``(module, args)`` of ``python -m M ...`` / ``torchrun ... -m M ...``; None otherwise."""
    if argv[0] in ("python", "python3", "torchrun") and "-m" in argv:
        k = argv.index("-m")
        return argv[k + 1], argv[k + 2:]
    return None


def check_command(argv: list[str], where: str):
    """Check that one documented command parses; returns the loaded config of package commands."""
    argv = _strip_env(argv)
    if not argv or argv[0] in OTHER_TOOLS:
        return None
    assert argv[0] != "cellvit-ssl", (f"{where}: `{' '.join(argv)}`: README commands are written "
                                      "`python -m cellvit_ssl.<command>` (the console script is mentioned in prose)")
    call = _module_call(argv)
    if call and call[0] == "cellvit_ssl.cli":  # the console script's dispatcher
        from cellvit_ssl.cli import COMMANDS

        args = call[1]
        if not args or args[0] in ("-h", "--help"):
            return None
        assert args[0] in COMMANDS, f"{where}: {args[0]!r} is not a command of cellvit_ssl.cli"
        return check_command(["python", "-m", COMMANDS[args[0]][0], *args[1:]], where)
    if call and call[0] in PACKAGE_COMMANDS:
        module, args = call
        line = importlib.import_module(module).COMMAND_LINE
        try:
            cfg = line.load(line.parse(args))
        except SystemExit as exc:  # --help
            assert exc.code == 0, f"{where}: {' '.join(argv)}"
            return None
        if module == "cellvit_ssl.train":
            from cellvit_ssl.config import validate_config

            validate_config(cfg)
        return cfg
    if call and call[0].startswith("benchmarks."):
        script = ROOT / (call[0].replace(".", "/") + ".py")
        _check_flags(script, call[1], where)
        return None
    if call:
        assert call[0] in OTHER_TOOLS, f"{where}: unknown module {call[0]!r} in {' '.join(argv)}"
        return None
    if argv[0] in ("python", "python3") and argv[1].endswith(".py"):
        _check_flags(ROOT / argv[1], argv[2:], where)
        return None
    if argv[0] == "bash" and argv[1].endswith(".sh"):  # a wrapper of the Python script of the same name
        assert (ROOT / argv[1]).is_file(), f"{where}: {argv[1]} does not exist"
        _check_flags(ROOT / argv[1].replace(".sh", ".py"), argv[2:], where)
        return None
    if argv[0] == "pip":
        extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
        for arg in argv:
            match = re.fullmatch(r"\.\[(.+)\]", arg)
            if match:
                missing = set(match.group(1).split(",")) - set(extras)
                assert not missing, f"{where}: pip extras {missing} are not in pyproject.toml"
        return None
    if argv[0] == "pytest":
        for arg in argv[1:]:
            if not arg.startswith("-"):
                assert (ROOT / arg.split("::")[0]).exists(), f"{where}: {arg} does not exist"
        return None
    raise AssertionError(f"{where}: a command this test does not know how to check: {' '.join(argv)}")


def _check_flags(script: Path, args: list[str], where: str) -> None:
    assert script.is_file(), f"{where}: {script.relative_to(ROOT)} does not exist"
    source = script.read_text()
    for arg in args:
        flag = arg.split("=", 1)[0]
        if flag.startswith("--"):
            assert f'"{flag}"' in source, f"{where}: {script.name} has no option {flag}"


def test_the_documents_follow_the_convention():
    blocks = [b for doc in DOCS for b in bash_blocks(doc)]
    assert len(bash_blocks(README)) >= 10
    assert any(b.skip is None for b in bash_blocks(README)), "no README block runs"
    first_run = next(b for b in bash_blocks(README) if b.skip is None)
    assert "python -m cellvit_ssl.train configs/demo.yaml" in first_run.text
    for b in blocks:
        assert commands(b), f"{b.where}: an empty block"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_documented_command_parses(doc, monkeypatch):
    monkeypatch.chdir(ROOT)  # commands name configs/... relative to the repository root
    for block in bash_blocks(doc):
        for argv in commands(block):
            check_command(argv, block.where)


def test_running_train_commands_never_share_a_run_folder_with_other_settings(monkeypatch):
    from cellvit_ssl.config import config_to_dict
    from cellvit_ssl.errors import ConfigError
    from cellvit_ssl.train import check_resume_config

    monkeypatch.chdir(ROOT)
    first: dict[Path, tuple[str, dict]] = {}
    for block in bash_blocks(README):
        if block.skip:
            continue
        for argv in commands(block):
            call = _module_call(_strip_env(argv))
            if not call or call[0] != "cellvit_ssl.train":
                continue
            cfg = check_command(argv, block.where)
            if cfg is None:  # --help
                continue
            folder = Path(cfg.train.output_dir).resolve()
            if folder not in first:
                first[folder] = (block.where, config_to_dict(cfg))
                continue
            try:
                check_resume_config(first[folder][1], cfg, folder)
            except ConfigError as exc:
                pytest.fail(f"{block.where}: `{' '.join(argv)}` would continue the run of {first[folder][0]} in "
                            f"{folder} with other settings: {exc}")
    assert first, "no train command runs in the README"


def _fresh_copy(dest: Path) -> Path:
    """The repository's files as a fresh clone has them (tracked, plus new files not ignored)."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    for rel in filter(None, listed):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_readme_blocks_run_in_order_from_a_fresh_copy(tmp_path):
    """Every runnable README block in order (the demo, the Configs example, the probe, the demo's own
    fields), in a copy of the repository with its own HOME: minutes on 2 cores."""
    if shutil.which("git") is None:
        pytest.skip("needs git to list the repository's files")
    repo = _fresh_copy(tmp_path / "repo")
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "PYTHONPATH": str(repo),
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    demo_run = repo / "runs" / "demo"
    kept = None
    for block in bash_blocks(repo / "README.md"):
        if block.skip:
            continue
        proc = subprocess.run(["bash", "-eo", "pipefail", "-c", block.text], cwd=repo, env=env,
                              capture_output=True, text=True, timeout=3600)
        assert proc.returncode == 0, f"{block.where}:\n{block.text}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        if kept is None and (demo_run / "teacher.pt").is_file():
            kept = {name: _digest(demo_run / name) for name in ("teacher.pt", "config.yaml", "checkpoint.pt")}
    assert kept, "no README block trained the demo into runs/demo"
    assert {name: _digest(demo_run / name) for name in kept} == kept, "a later README block changed runs/demo"
