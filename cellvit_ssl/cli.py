"""One command-line convention for every command, and the ``cellvit-ssl`` entry point.

Every command takes an optional YAML config file and ``key=value`` overrides with the
training config's key names (``data.index=cells.csv``, ``data.num_workers=4``); short flags are
aliases of those keys (``--index cells.csv`` is ``data.index=cells.csv``). Lists are written one
way everywhere: ``key=[a,b,c]``, or after a flag as ``--channels a,b,c`` or ``--images a b c``.
``--help`` lists every key with its default and documentation; a mistyped key is an error
naming the nearest valid one.

``cellvit-ssl train|embed|evaluate|finetune|predict|index|...`` runs ``python -m cellvit_ssl.<command>``.
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cellvit_ssl.config import describe, dotlist, merge_config, nearest_key, read_yaml
from cellvit_ssl.errors import ConfigError

#: Commands of ``cellvit-ssl``: name → (module, one-line summary).
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("cellvit_ssl.train", "self-supervised training (one GPU, torchrun, SLURM)"),
    "embed": ("cellvit_ssl.embed", "embeddings of an index or of images into AnnData"),
    "evaluate": ("cellvit_ssl.evaluate", "k-NN / linear scores of embeddings against baselines"),
    "finetune": ("cellvit_ssl.finetune", "a classifier from a checkpoint and a labelled index (linear, full, LoRA)"),
    "predict": ("cellvit_ssl.predict", "class probabilities and labels of an index or of images into AnnData"),
    "index": ("cellvit_ssl.data.index", "build an index table from a folder or a CHAMMI download"),
    "curate": ("cellvit_ssl.curate", "curate an index: near-duplicates out, clusters balanced, rare rows retrieved"),
}


@dataclass(frozen=True)
class Flag:
    """A short flag that sets a config key.

    Attributes:
        names: ``--index`` and other spellings.
        key: The dotted config key it sets.
        value: For flags without an argument: the value they set (e.g. ``True``).
    """

    names: tuple[str, ...]
    key: str
    value: Any = None


@dataclass
class CommandLine:
    """The parser of one command.

    Args:
        prog: How the command is invoked (for usage lines).
        description: What the command does (first lines of ``--help``).
        schema: The config dataclass of the command.
        flags: Short flags, aliases of keys.
        positionals: Keys set by bare arguments, in order (e.g. ``embed.checkpoint``).
        examples: Example invocations for ``--help``.
        config_file: Whether a YAML config file may be given as a bare ``*.yaml`` argument.
    """

    prog: str
    description: str
    schema: type
    flags: Sequence[Flag] = ()
    positionals: Sequence[str] = ()
    examples: Sequence[str] = ()
    config_file: bool = True
    _by_name: dict[str, Flag] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._by_name = {name: flag for flag in self.flags for name in flag.names}
        self._lists = {key for key, kind in _leaf_types(self.schema).items() if _is_list(kind)}
        self._dicts = {key for key, kind in _leaf_types(self.schema).items() if typing.get_origin(kind) is dict}

    # ---------------------------------------------------------------- help
    def help(self) -> str:
        """The ``--help`` text: usage, flags, every key with its default and documentation."""
        usage = f"usage: {self.prog}"
        usage += "".join(f" {p.rsplit('.', 1)[-1].upper()}" for p in self.positionals)
        usage += " [CONFIG.yaml]" if self.config_file else ""
        usage += " [key=value ...] [flags]"
        lines = [usage, "", self.description.strip(), ""]
        if self.flags:
            lines.append("flags (aliases of keys):")
            for flag in self.flags:
                target = f"{flag.key}={_show(flag.value)}" if flag.value is not None else f"{flag.key}=VALUE"
                lines.append(f"  {', '.join(flag.names):<26} {target}")
            lines.append("")
        lines.append("keys (key=value; lists as key=[a,b]):")
        rows = describe(self.schema)
        width = min(40, max(len(k) + len(d) + 3 for k, d, _ in rows))
        for key, default, doc in rows:
            head = f"  {key}={default}"
            lines.append(f"{head:<{width + 2}}  {doc}" if doc else head)
        if self.examples:
            lines += ["", "examples:", *(f"  {e}" for e in self.examples)]
        return "\n".join(lines)

    # ---------------------------------------------------------------- parsing
    def parse(self, argv: Sequence[str]) -> list[tuple[str, DictConfig]]:
        """Config sources from the command line: the YAML file (if any), then the overrides.

        ``-h`` / ``--help`` prints :meth:`help` and exits with status 0.

        Raises:
            ConfigError: On an unknown flag (naming the nearest), a flag without its value,
                a second config file, or more bare arguments than the command takes.
        """
        argv = list(argv)
        if "-h" in argv or "--help" in argv:
            try:
                print(self.help())
            except BrokenPipeError:  # `--help | head`
                pass
            raise SystemExit(0)
        overrides: list[str] = []
        config: str | None = None
        positionals = list(self.positionals)
        i = 0
        while i < len(argv):
            token = argv[i]
            i += 1
            if token.startswith("--") or token.partition("=")[0] in self._by_name:
                name, _, inline = token.partition("=")
                flag = self._flag(name)
                if flag.value is not None:
                    if inline:
                        raise ConfigError(f"{name} takes no value (it sets {flag.key}={_show(flag.value)})")
                    overrides.append(f"{flag.key}={_show(flag.value)}")
                    continue
                values = [inline] if inline else []
                takes_pairs = flag.key in self._dicts
                if not values:
                    while i < len(argv) and (not self._is_option(argv[i])
                                             or (takes_pairs and not argv[i].startswith("--") and not values)):
                        values.append(argv[i])
                        i += 1
                        if flag.key not in self._lists and flag.key not in self._dicts:
                            break
                if not values:
                    raise ConfigError(f"{name} needs a value (it sets {flag.key})")
                overrides += self._as_overrides(name, flag.key, values)
            elif "=" in token and not token.startswith("="):
                overrides.append(token)
            elif self.config_file and token.lower().endswith((".yaml", ".yml")) and config is None:
                config = token
            elif positionals:
                overrides.append(f"{positionals.pop(0)}={_quote(token)}")
            else:
                raise ConfigError(f"unexpected argument {token!r}; {self.prog} takes "
                                  f"{self._bare_description()} then key=value overrides (see --help)")
        sources: list[tuple[str, DictConfig]] = []
        if config is not None:
            sources.append((config, read_yaml(config)))
        sources.append(("command line", dotlist(overrides)))
        return sources

    def load(self, sources: Sequence[tuple[str, Any]], base: Sequence[tuple[str, Any]] = ()) -> Any:
        """Merge ``base`` sources (e.g. a checkpoint's settings), then the command line, onto the schema."""
        return merge_config(self.schema, [*base, *sources])

    def _bare_description(self) -> str:
        parts = [p.rsplit(".", 1)[-1].upper() for p in self.positionals]
        if self.config_file:
            parts.append("an optional CONFIG.yaml")
        return ", ".join(parts) if parts else "no bare arguments"

    def _is_option(self, token: str) -> bool:
        return token.startswith("--") or token in self._by_name or ("=" in token and not token.startswith("="))

    def _flag(self, name: str) -> Flag:
        if name in self._by_name:
            return self._by_name[name]
        if name.startswith("--no-") and f"--{name[5:]}" in self._by_name:
            flag = self._by_name[f"--{name[5:]}"]
            if flag.value is True:
                return Flag((name,), flag.key, False)
        key = name[2:].replace("-", "_")
        near = nearest_key(key, self.schema)
        hint = difflib_close(name, list(self._by_name))
        suggestion = f"; did you mean {hint!r}?" if hint else (f"; did you mean {near}=...?" if near else "")
        raise ConfigError(f"unknown flag {name!r}{suggestion} (see {self.prog} --help)")

    def _as_overrides(self, flag: str, key: str, values: list[str]) -> list[str]:
        items = [part for v in values for part in v.split(",") if part != ""]
        if key in self._lists:
            return [f"{key}=[{','.join(_quote(v) for v in items)}]"]
        if key in self._dicts:
            pairs = [item.split("=", 1) for item in items]
            bad = [item for item, pair in zip(items, pairs) if len(pair) != 2 or not pair[0]]
            if bad:
                raise ConfigError(f"{flag} {bad[0]!r}: expected NAME=VALUE pairs, e.g. {flag} a=b,c=d")
            return [f"{key}.{_quote(k)}={_quote(v)}" for k, v in pairs]
        return [f"{key}={_quote(values[0])}"]


def difflib_close(word: str, options: Sequence[str]) -> str | None:
    """The option closest to ``word`` (None when nothing is close)."""
    import difflib

    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return close[0] if close else None


def _show(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _quote(value: str) -> str:
    """A command-line value as one YAML scalar: plain when safe, else single-quoted (YAML escaping)."""
    if value and all(c.isalnum() or c in "_./~+-@%" for c in value):
        return value
    return "'" + value.replace("'", "''") + "'"


def _leaf_types(schema: type, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, hint in typing.get_type_hints(schema).items():
        if dataclasses.is_dataclass(hint):
            out.update(_leaf_types(hint, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = hint
    return out


def _is_list(kind: Any) -> bool:
    return typing.get_origin(kind) in (list, tuple, Sequence)


def config_overrides(values: Mapping[str, Any]) -> list[str]:
    """``{"data.index": "a.csv"}`` → ``["data.index='a.csv'"]`` (values written as YAML)."""
    return [f"{k}={OmegaConf.to_yaml(OmegaConf.create({'v': v})).strip()[3:]}" for k, v in values.items()]


def run_command(main, argv: Sequence[str] | None = None) -> int:
    """Run a command's ``main(argv)``; the exit status."""
    return int(main(list(sys.argv[1:] if argv is None else argv)) or 0)


def main(argv: Sequence[str] | None = None) -> int:
    """``cellvit-ssl COMMAND [args]``: dispatch to ``python -m cellvit_ssl.<command>``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: cellvit-ssl COMMAND [args]   (or: python -m MODULE [args], MODULE as listed)\n")
        print("commands:")
        for name, (module, summary) in COMMANDS.items():
            print(f"  {name:<10} {summary}  [python -m {module}]")
        print("\n`cellvit-ssl COMMAND --help` lists the command's keys and flags.")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        hint = difflib_close(name, list(COMMANDS))
        print(f"error: unknown command {name!r}" + (f"; did you mean {hint!r}?" if hint else "")
              + f" (commands: {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
