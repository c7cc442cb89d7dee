"""Checks for every string that comes from the command line or from the provider, made before
anything is rented. Each pattern is matched against the whole string (`fullmatch`: `re.match` with
`$` lets a trailing newline through, and a newline in a run name splits a remote command)."""
from __future__ import annotations

import re
import secrets
import time
from pathlib import Path

from launch.cluster import env_problem
from trainer import rundir

RUN_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")   # the client keeps `-n NAME` only in [a-z0-9-]
CONF_NAME = re.compile(r"[a-z0-9_]{1,64}")
# Hydra overrides travel through two shells (ssh to node0, then pdsh to every node, where DeepSpeed
# quotes only arguments holding a space): these characters are refused outright; the rest are quoted.
OVERRIDE = re.compile(r"[A-Za-z0-9_+~][^\s;&|$`\\<>()!#'\"]*")
REMOTE_DIR = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_./-]*|/[A-Za-z0-9_./-]+")
GPU_NAME = re.compile(r"[A-Za-z0-9_]{1,40}")
SAFE_FILE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
# what the laptop forwards to the nodes' environment when it is set there
FORWARDED_SECRETS = ("WANDB_API_KEY",)


class UnsafeInput(ValueError):
    """A string from the provider or the command line that must not reach a shell, file or config."""


def printable(text: str) -> str:
    """`text` with control characters (terminal escapes among them) shown as \\xNN: node logs and
    provider answers are printed through this, so a host cannot drive the user's terminal."""
    return CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def new_run_name(now: float | None = None) -> str:
    return time.strftime("st-%Y%m%d-%H%M%S", time.gmtime(now)) + "-" + secrets.token_hex(3)


def check_run_name(name) -> str:
    # a letter is required: the SDK's delete_overlay reads an all-digit name as an overlay id
    if not isinstance(name, str) or not RUN_NAME.fullmatch(name) or not re.search(r"[a-z]", name):
        raise UnsafeInput(f"--run {name!r}: a run name is 1-63 of a-z, 0-9 and '-', starting with a letter or "
                          "digit and holding at least one letter (it names the overlay network, whose name the "
                          "client drops otherwise, and the folder outputs/RUN)")
    return name


def check_conf(name, root: Path) -> str:
    if not isinstance(name, str) or not CONF_NAME.fullmatch(name):
        raise UnsafeInput(f"--conf {name!r}: a preset name is made of a-z, 0-9 and '_' (see conf/*.yaml)")
    if not (root / "conf" / f"{name}.yaml").exists():
        raise UnsafeInput(f"--conf {name!r}: no conf/{name}.yaml")
    return name


def check_gpu_name(name) -> str:
    if not isinstance(name, str) or not GPU_NAME.fullmatch(name):
        raise UnsafeInput(f"--gpu-name {name!r}: a vast.ai gpu_name such as H100_SXM or RTX_4090")
    return name


def check_override(text: str) -> str:
    if not OVERRIDE.fullmatch(text) or not ("=" in text or text.startswith("~")):
        raise UnsafeInput(f"override {printable(repr(text))}: an override is KEY=VALUE without spaces or any of "
                          "; & | $ ` \\ < > ( ) ! # ' \" (it is re-read by a shell on every node)")
    if text.split("=", 1)[0].lstrip("+~") in ("run_dir", "resume"):
        raise UnsafeInput(f"override {text!r}: the driver sets run_dir and resume itself")
    return text


def check_remote_dir(path) -> str:
    """The code's folder on the nodes: a plain path (no `~`, which no quoting expands, no `..`)."""
    if not isinstance(path, str) or not REMOTE_DIR.fullmatch(path) or ".." in path.split("/"):
        raise UnsafeInput(f"--remote-dir {path!r}: a plain absolute or relative path of A-Z a-z 0-9 _ . / - "
                          "(no ~, no .., no spaces)")
    return path


def check_local_path(what: str, path: Path) -> Path:
    """A path on this machine that goes into an ssh config (which splits on spaces)."""
    text = str(path)
    if any(c.isspace() or CONTROL.match(c) for c in text) or text.startswith("-"):
        raise UnsafeInput(f"{what} {text!r}: holds a space or starts with '-'; the ssh config cannot take it "
                          "(move the checkout or the key to a path without spaces)")
    return path


def check_tag(tag) -> str:
    if not rundir.is_tag(tag):
        raise UnsafeInput(f"checkpoint tag {printable(repr(tag))} is not stepNNNNNNNN")
    return tag


def check_env(env: dict[str, str]) -> dict[str, str]:
    problem = env_problem(env)
    if problem:
        raise UnsafeInput(problem)
    return env


def check_secrets(values: dict[str, str], allowed=FORWARDED_SECRETS) -> dict[str, str]:
    for key, value in values.items():
        if key not in allowed or not re.fullmatch(r"[A-Za-z0-9_.:=+/-]{1,200}", value or ""):
            raise UnsafeInput(f"{key}: not a key this driver forwards, or its value has characters no API key has "
                              "(it is not shown)")
    return values


def instance_id(value) -> int:
    if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, str) and value.isdigit())):
        raise UnsafeInput(f"instance id {printable(repr(value))} is not a whole number")
    number = int(value)
    if number <= 0:
        raise UnsafeInput(f"instance id {value!r} is not positive")
    return number


def check_positive(flag: str, value, whole: bool = True):
    if value is None or isinstance(value, bool) or value <= 0 or (whole and int(value) != value):
        raise UnsafeInput(f"{flag} must be {'a whole number ' if whole else 'a number '}> 0, got {value!r}")
    return value
