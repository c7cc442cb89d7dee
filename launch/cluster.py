"""Cluster files for multi-node runs, from a host list or from `vastai show instances --raw`.

    python -m launch.cluster --hosts hosts.txt --out cluster/ [--identity ~/.ssh/id_ed25519]
    python -m launch.cluster --vast-json instances.json --label RUN --out cluster/ --master-addr 10.0.0.2

writes, in --out:
    hostfile        DeepSpeed hostfile: `node0 slots=8` per node
    ssh_config      one Host alias per node (HostName, Port, User, IdentityFile, unattended options),
                    because DeepSpeed takes one ssh port for all hosts and rented nodes each have their own
    .deepspeed_env  KEY=VALUE lines the ssh launchers export on every node (no blank or comment lines)
    master_addr     the address ranks rendezvous at: the first node's private/overlay address

A host list has one node a line, `[user@]host[:port] slots`; `#` starts a comment.
"""
from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from launch.cli import FlagParser

DEFAULT_ENV = {
    "NCCL_SOCKET_IFNAME": "eth0",   # the overlay/private interface on rented nodes
    "GLOO_SOCKET_IFNAME": "eth0",
    "NCCL_IB_DISABLE": "1",         # overlay networks are plain TCP
    "NCCL_DEBUG": "WARN",
}
SSH_OPTIONS = {
    "IdentitiesOnly": "yes",
    "StrictHostKeyChecking": "accept-new",
    "BatchMode": "yes",              # never prompt: unattended
    # a peer gone silent (a cut overlay, a dead host) ends its session within a minute: pdsh on node0
    # waits for every node's ssh, so this bounds how long a failed job's launcher outlives its ranks
    "ServerAliveInterval": "15",
    "ServerAliveCountMax": "4",
    "ConnectTimeout": "15",
}


class ClusterError(ValueError):
    """Bad host list or instance data, naming the line or instance."""


@dataclass(frozen=True)
class Node:
    alias: str
    host: str        # how to reach it over ssh
    port: int
    user: str
    slots: int       # GPUs (ranks) on this node
    private_addr: str  # how the other nodes reach it (rendezvous, NCCL)


# what may follow `HostName` in an ssh config: a DNS name or an IPv4/IPv6 address, never a leading
# '-' (an option to ssh), a space or a newline (another config line: a ProxyCommand runs locally)
_SAFE_HOST = re.compile(r"^(?:[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?|[0-9A-Fa-f:.]+)$")
_SAFE_USER = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")
ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
ENV_VALUE = re.compile(r"[A-Za-z0-9_./:,=+@%-]*")  # DeepSpeed's ssh launchers export .deepspeed_env values unquoted


def check_host(where: str, field: str, value) -> str:
    if not isinstance(value, str) or not _SAFE_HOST.match(value.strip(" ")) or ".." in value:
        raise ClusterError(f"{where}: {field} {value!r} is not a hostname or IP address (refused: it would "
                           "reach an ssh config)")
    return value.strip(" ")


_HOST_LINE = re.compile(r"^(?:(?P<user>[^@\s]+)@)?(?P<host>[^:\s@]+)(?::(?P<port>\d+))?\s+(?P<slots>\S+)$")


def parse_host_list(text: str, source: str = "host list", default_user: str = "root") -> list[Node]:
    nodes, seen = [], {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{source} line {number}"
        m = _HOST_LINE.match(line)
        if not m:
            raise ClusterError(f"{where}: {raw.strip()!r} is not `[user@]host[:port] slots`")
        if not m["slots"].isdigit() or int(m["slots"]) < 1:
            raise ClusterError(f"{where}: slots must be a whole number >= 1, got {m['slots']!r}")
        port = int(m["port"] or 22)
        if not 0 < port < 65536:
            raise ClusterError(f"{where}: port {port} out of range")
        key = (m["host"], port)
        if key in seen:
            raise ClusterError(f"{where}: duplicate host {m['host']}:{port} (first on line {seen[key]})")
        seen[key] = number
        check_host(where, "host", m["host"])
        if m["user"] and not _SAFE_USER.match(m["user"]):
            raise ClusterError(f"{where}: user {m['user']!r} is not a user name")
        nodes.append(Node(f"node{len(nodes)}", m["host"], port, m["user"] or default_user,
                          int(m["slots"]), m["host"]))
    if not nodes:
        raise ClusterError(f"{source}: no hosts")
    return nodes


def nodes_from_vast(instances: list[dict], label: str | None = None, ids: list[int] | None = None) -> list[Node]:
    """Running instances, in id order (with `label`, if given), or exactly `ids` in that order (node0
    first; a driver that recorded the ids it created must not pick nodes by label, which anyone's
    instance can carry). Prefers the direct public port to the proxy. Every string is validated."""
    if ids is not None:
        by_id = {i.get("id"): i for i in instances}
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise ClusterError(f"instances {missing} are not in the instance list")
        chosen = [by_id[i] for i in ids]
    else:
        chosen = sorted((i for i in instances if label is None or i.get("label") == label),
                        key=lambda i: i.get("id", 0))
    if not chosen:
        raise ClusterError(f"no vast.ai instances{' labelled ' + repr(label) if label else ''}")
    nodes = []
    for inst in chosen:
        name = f"instance {inst.get('id', '?')}"
        status = inst.get("actual_status")
        if status != "running":
            raise ClusterError(f"{name}: status {status!r}, not running")
        direct = _direct_port(inst.get("ports"))
        if inst.get("public_ipaddr") and direct:
            host, port = check_host(name, "public_ipaddr", inst["public_ipaddr"]), direct
        elif inst.get("ssh_host") and inst.get("ssh_port"):
            host, port = check_host(name, "ssh_host", inst["ssh_host"]), inst["ssh_port"]
        else:
            raise ClusterError(f"{name}: no ssh address (neither ports['22/tcp'] nor ssh_host/ssh_port)")
        if not str(port).strip().isdigit() or not 0 < int(str(port).strip()) < 65536:
            raise ClusterError(f"{name}: ssh port {port!r} is not a port number")
        port = int(str(port).strip())
        slots = int(inst.get("num_gpus") or 0)
        if slots < 1:
            raise ClusterError(f"{name}: num_gpus is {inst.get('num_gpus')!r}, need >= 1")
        private = (inst.get("local_ipaddrs") or "").split()
        private_addr = check_host(name, "local_ipaddrs", private[0]) if private else host
        nodes.append(Node(f"node{len(nodes)}", host, port, "root", slots, private_addr))
    if len({(n.host, n.port) for n in nodes}) != len(nodes):
        raise ClusterError("two vast.ai instances share an ssh address")
    return nodes


def _direct_port(ports):
    """The direct route's port from `ports` when it has the documented shape
    (`{"22/tcp": [{"HostPort": "41001"}]}`); any other shape (a list, null, a string) means none."""
    mapped = ports.get("22/tcp") if isinstance(ports, dict) else None
    first = mapped[0] if isinstance(mapped, list) and mapped else None
    return first.get("HostPort") if isinstance(first, dict) else None


def hostfile(nodes: list[Node]) -> str:
    return "".join(f"{n.alias} slots={n.slots}\n" for n in nodes)


def ssh_config(nodes: list[Node], identity: str, known_hosts: str | None = None) -> str:
    """One Host block per node. `known_hosts`: a per-run UserKnownHostsFile, so a rented address reused
    with a new host key is a new entry there, not a clash with the user's own ~/.ssh/known_hosts."""
    for value in (identity, known_hosts or ""):
        if any(c.isspace() for c in value) or value.startswith("-"):
            raise ClusterError(f"ssh config: path {value!r} holds a space or starts with '-'")
    blocks = []
    for n in nodes:
        check_host(n.alias, "host", n.host)
        extra = [f"  UserKnownHostsFile {known_hosts}"] if known_hosts else []
        lines = [f"Host {n.alias}", f"  HostName {n.host}", f"  Port {n.port}", f"  User {n.user}",
                 f"  IdentityFile {identity}"] + extra + [f"  {k} {v}" for k, v in SSH_OPTIONS.items()]
        blocks.append("\n".join(lines) + "\n")
    return "\n".join(blocks)


def env_problem(env: dict[str, str]) -> str | None:
    """What makes an entry of .deepspeed_env unsafe to export, in one line; None: every entry is safe."""
    for key, value in env.items():
        if not ENV_KEY.fullmatch(key) or not isinstance(value, str) or not ENV_VALUE.fullmatch(value):
            return (f".deepspeed_env: {key}={value!r}: keys are shell names, values only letters, digits and "
                    "_ . / : , = + @ % - (DeepSpeed exports them unquoted)")
    return None


def deepspeed_env(extra: dict[str, str], pythonpath: str | None) -> str:
    env = {**DEFAULT_ENV, **({"PYTHONPATH": pythonpath} if pythonpath else {}), **extra}
    problem = env_problem(env)
    if problem:
        raise ClusterError(problem)
    return "".join(f"{k}={v}\n" for k, v in env.items())


def write(nodes: list[Node], out: Path, identity: str, master_addr: str | None = None,
          env: dict[str, str] | None = None, pythonpath: str | None = None,
          known_hosts: str | None = None) -> dict[str, Path]:
    if master_addr is not None:
        check_host("--master-addr", "address", master_addr)
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "hostfile": hostfile(nodes),
        "ssh_config": ssh_config(nodes, identity, known_hosts),
        ".deepspeed_env": deepspeed_env(env or {}, pythonpath),
        "master_addr": (master_addr or nodes[0].private_addr) + "\n",
    }
    for name, text in files.items():
        (out / name).write_text(text)
    return {name: out / name for name in files}


def _parse_env(items: list[str]) -> dict[str, str]:
    env = {}
    for item in items:
        if "=" not in item:
            raise ClusterError(f"--env {item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        env[key] = value
    return env


def main(argv: list[str] | None = None) -> int:
    p = FlagParser(prog="python -m launch.cluster", description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--hosts", type=Path, help="host list file: `[user@]host[:port] slots` per line")
    src.add_argument("--vast-json", type=Path, help="output of `vastai show instances --raw` ('-' for stdin)")
    p.add_argument("--label", help="with --vast-json: only instances with this label")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--identity", default="~/.ssh/id_ed25519", help="private key for the ssh config")
    p.add_argument("--master-addr", help="rendezvous address (default: the first node's private address)")
    p.add_argument("--pythonpath", help="PYTHONPATH on the nodes (the code's folder there)")
    p.add_argument("--env", action="append", default=[], help="extra KEY=VALUE for .deepspeed_env")
    args = p.parse_args(argv)
    try:
        if args.hosts:
            if not args.hosts.is_file():
                raise ClusterError(f"--hosts {args.hosts}: no such file")
            nodes = parse_host_list(args.hosts.read_text(), str(args.hosts))
        else:
            text = sys.stdin.read() if str(args.vast_json) == "-" else args.vast_json.read_text()
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise ClusterError(f"--vast-json {args.vast_json}: not JSON ({e})") from None
            if isinstance(data, dict):
                data = data.get("instances", [])
            nodes = nodes_from_vast(data, args.label)
        files = write(nodes, args.out, args.identity, args.master_addr, _parse_env(args.env), args.pythonpath)
    except ClusterError as e:
        print(f"launch.cluster: {e}", file=sys.stderr)
        return 2
    total = sum(n.slots for n in nodes)
    print(f"{len(nodes)} nodes, {total} ranks; master {files['master_addr'].read_text().strip()}; "
          f"wrote {', '.join(str(f) for f in files.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
