"""The one command-line convention of the entry points (train, prepare, sample, eval, export).

Every entry point takes `key=value` arguments: dotted keys, strings taken verbatim (a prompt keeps its
spaces), `--help` listing every key with its doc (the docstring under its dataclass field, written
once). Every mistake is one line on stderr, `config error: ...`, and an unknown key names the closest
valid one. train.py and prepare.py hand the checked overrides to Hydra, which composes the presets;
sample.py, eval.py and export.py fill a flat dataclass. The cluster commands keep their flags
(FlagParser), with the same one-line errors.

Standard library only at import (the rest is imported where used): launch/vast/node.py imports
FlagParser on a rented node before anything is installed.
"""
from __future__ import annotations

import argparse
import difflib
import os
import re
import sys
import typing
from pathlib import Path

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
HELP = ("-h", "--help")


def set_environment() -> None:
    """One JIT-extension cache and one ninja for every way of running (make, the venv's python,
    an activated venv), so DeepSpeed's CPU op is built once per checkout: ninja rebuilds everything
    that another version of ninja built. The Makefile sets the same two."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(CONF_DIR.parent / ".cache" / "torch_extensions"))
    scripts = os.path.dirname(sys.executable)  # the venv's bin/, whose ninja came with DeepSpeed
    if os.path.isfile(os.path.join(scripts, "ninja")):
        os.environ["PATH"] = os.pathsep.join([scripts, *(p for p in os.environ.get("PATH", "").split(os.pathsep)
                                                          if p != scripts)])


def strip_launcher_args(argv: list[str]) -> list[str]:
    """Drop the `--local_rank=N` the deepspeed launcher appends (Hydra rejects unknown arguments).

    LOCAL_RANK is read from the environment, which the launcher also sets.
    """
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg.startswith("--local_rank="):
            os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
        elif arg == "--local_rank":
            skip = True
        else:
            out.append(arg)
    return out


# --- one line for every mistake ---------------------------------------------------------------------------
def closest(word: str, choices) -> str | None:
    """The valid choice a mistyped `word` most likely meant; a dotted key also by its last part, so
    that `max_steps` finds `train.max_steps`."""
    choices = list(choices)
    match = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    if not match:
        by_last = {choice.rsplit(".", 1)[-1]: choice for choice in choices}
        match = [by_last[m] for m in difflib.get_close_matches(word.rsplit(".", 1)[-1], by_last, n=1, cutoff=0.6)]
    return match[0] if match else None


def unknown(what: str, word: str, choices, lister: str) -> str:
    """`unknown key `x`; did you mean `y`?`, or the command that lists the valid ones when none is close."""
    guess = closest(word, choices)
    return f"unknown {what} `{word}`; " + (f"did you mean `{guess}`?" if guess else f"`{lister}` lists them")


def config_exit(error) -> typing.NoReturn:
    """Exit 1 with one line on stderr (sys.exit prints a string there)."""
    sys.exit("config error: " + "; ".join(line.strip() for line in str(error).splitlines() if line.strip()))


class FlagParser(argparse.ArgumentParser):
    """argparse for the cluster commands, whose every error is one line on stderr (exit 2), not its
    usage dump; an unknown flag names the closest known one."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: {' '.join(message.split())}\n")

    def parse_args(self, args=None, namespace=None):
        parsed, extra = self.parse_known_args(args, namespace)
        if extra:
            flags = [flag for parser in self._parsers() for action in parser._actions for flag in action.option_strings]
            word = extra[0].split("=", 1)[0]
            self.error(unknown("flag", word, flags, f"{self.prog} --help") if word.startswith("-") else
                       f"unexpected argument `{extra[0]}` (`{self.prog} --help` lists the arguments)")
        return parsed

    def _parsers(self) -> list[argparse.ArgumentParser]:
        """This parser and its subcommands' (an unknown flag may be meant for either)."""
        subs = [a for a in self._actions if isinstance(a, argparse._SubParsersAction)]
        return [self, *(p for a in subs for p in a.choices.values())]


# --- sample.py, eval.py, export.py: a flat dataclass ------------------------------------------------------
def _value(key: str, text: str, kind):
    """`text` as the field's type; a string verbatim (no YAML reading: `prompt="the "` keeps its space)."""
    if kind is str:
        return text
    if kind is bool and text.lower() in ("true", "false"):
        return text.lower() == "true"
    if kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    config_exit(f"{key}={text}: expected {'a whole number' if kind is int else 'a number' if kind is float else kind}")


def parse_args(schema, argv: list[str], prog: str):
    """`key=value` arguments into the dataclass `schema`; `--help` prints its keys and exits."""
    if any(arg in HELP for arg in argv):
        print_help(prog, schema)
    types = typing.get_type_hints(schema)
    values = {}
    for arg in argv:
        key, equals, text = arg.partition("=")
        if not equals:
            config_exit(f"`{arg}`: expected key=value (`{prog} --help` lists the keys)")
        if key not in types:
            config_exit(unknown("key", key, types, f"{prog} --help"))
        values[key] = _value(key, text, types[key])
    return schema(**values)


def print_help(prog: str, schema) -> typing.NoReturn:
    """The entry point's first doc line, then every key, its default and its doc; exit 0."""
    from trainer.config import print_keys

    about = (sys.modules[schema.__module__].__doc__ or "").strip().splitlines()
    print(f"usage: {prog} key=value ...\n{about[0] if about else ''}\n")
    print_keys(cls=schema)
    sys.exit(0)


# --- train.py, prepare.py: Hydra overrides of conf/train.yaml ---------------------------------------------
OVERRIDE = re.compile(r"(~|\+\+|\+)?([\w.@/-]+)(?:=(.*))?", re.S)


def _hydra_quoted(text: str) -> str:
    """`text` as a Hydra quoted string, which Hydra takes as it is (but `${...}`, which it resolves):
    a quote, and backslashes before a quote or at the end, are escaped."""
    return "'" + re.sub(r"(\\*)('|$)", lambda m: m.group(1) * 2 + ("\\'" if m.group(2) else ""), text) + "'"


def hydra_overrides(argv: list[str]) -> list[str]:
    """The overrides as Hydra should read them: every key checked against the schema (raises a
    one-line ConfigError naming an unknown one), string values quoted. Hydra's flags and what is not
    an override pass as they are (Hydra says what is wrong with them)."""
    from trainer.config import ConfigError, describe

    keys = {key: default for key, default, _ in describe()}
    groups = {"conf", *(p.name for p in CONF_DIR.iterdir() if p.is_dir())}
    known = {*keys, *groups, *(key.split(".", 1)[0] for key in keys)}
    out = []
    for arg in argv:
        m = None if arg.startswith("-") else OVERRIDE.fullmatch(arg)
        if m is None or (m[3] is None and m[1] != "~"):
            out.append(arg)
            continue
        key = m[2].split("@", 1)[0]
        if key not in known and not key.startswith(("hydra.", "hydra/")):
            raise ConfigError(unknown("key", key, known, "python -m trainer.config"))
        # a key whose default is a string is a str field (the schema's optional strings default to null)
        verbatim = m[3] is not None and m[1] != "~" and isinstance(keys.get(key), str)
        out.append(f"{m[1] or ''}{m[2]}={_hydra_quoted(m[3])}" if verbatim else arg)
    return out


def compose(overrides: list[str]):
    """conf/train.yaml composed with `key=value` overrides (trainer.config.compose), every preset
    selectable as conf=NAME."""
    from trainer.config import compose as compose_config, register_presets

    register_presets(CONF_DIR)
    return compose_config(CONF_DIR, overrides)


def compose_config(argv: list[str], world_size: int | None = None):
    """The run's typed Config from `key=value` arguments; any mistake raises a one-line ConfigError."""
    from omegaconf import OmegaConf

    from trainer.config import to_config

    return to_config(OmegaConf.to_container(compose(hydra_overrides(argv)), resolve=True), world_size)


def load_config(argv: list[str], world_size: int | None = None):
    """compose_config, or exit with its one line."""
    from trainer.config import ConfigError

    try:
        return compose_config(argv, world_size)
    except ConfigError as e:
        config_exit(e)


def run_with_config(prog: str, run, world_size: int | None = None) -> None:
    """train.py's and prepare.py's `__main__`: `--help` lists every key; Hydra's own flags (`--cfg job`,
    `--info`, `-m`) go through @hydra.main, after the same checks; otherwise `run(config)`."""
    from trainer.config import ConfigError, register_presets, to_config

    register_presets(CONF_DIR)  # for @hydra.main and --help too
    argv = strip_launcher_args(sys.argv[1:])
    if any(arg in HELP for arg in argv):
        print_train_help(prog, [arg for arg in argv if arg not in HELP])
    if not any(arg.startswith("-") for arg in argv):
        return run(load_config(argv, world_size))
    import hydra
    from omegaconf import OmegaConf

    @hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="train")
    def hydra_main(cfg) -> None:
        try:
            config = to_config(OmegaConf.to_container(cfg, resolve=True), world_size)
        except ConfigError as e:
            config_exit(e)
        run(config)

    try:
        sys.argv = [sys.argv[0], *hydra_overrides(argv)]
    except ConfigError as e:
        config_exit(e)
    hydra_main()


def print_train_help(prog: str, argv: list[str]) -> typing.NoReturn:
    """The keys with their docs; with overrides (`conf=NAME ... --help`), the values that run would use."""
    from trainer.config import ConfigError, print_keys

    groups = ", ".join(f"{p.name}=" for p in sorted(CONF_DIR.iterdir()) if p.is_dir())
    print(f"usage: {prog} [conf=PRESET] [GROUP=OPTION] key=value ...\npresets: conf/*.yaml; groups: {groups} "
          "(conf/GROUP/*.yaml)\n")
    try:
        print_keys(overrides=hydra_overrides(argv))
    except ConfigError as e:
        config_exit(e)
    sys.exit(0)


def load_checkpoint_or_exit(run_dir: str, prog: str):
    """(model, client state) of the newest checkpoint under run_dir, or exit with one line saying why."""
    from trainer.checkpoint import CheckpointError, load_for_inference

    try:
        return load_for_inference(run_dir)
    except (FileNotFoundError, CheckpointError) as e:
        sys.exit(f"{prog}: run_dir: {e}")
