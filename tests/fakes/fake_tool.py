"""Stand-ins for vastai, ssh, rsync and ssh-keygen, for testing launch/vast_cluster.sh offline.

Installed on PATH under each tool's name (the tests copy this file). Every call is appended to
$FAKE_LOG as JSON; $FAKE_STATE keeps the instances "created"; $FAKE_FAIL names one stage to fail:
search, overlay, create2 (the second create), wait (instances never run), ssh (never answers),
train, copy (rsync of the run back).
"""
import json
import os
import sys
from pathlib import Path

PROG = Path(sys.argv[0]).name
ARGS = sys.argv[1:]
FAIL = os.environ.get("FAKE_FAIL", "")
STATE = Path(os.environ["FAKE_STATE"])


def log():
    with open(os.environ["FAKE_LOG"], "a") as f:
        f.write(json.dumps({"prog": PROG, "args": ARGS}) + "\n")


def instances():
    return json.loads(STATE.read_text()) if STATE.exists() else []


def vastai():
    words = [a for a in ARGS if not a.startswith("-")]
    if words[:2] == ["search", "offers"]:
        if FAIL == "search":
            sys.exit("error: search failed")
        offers = [{"id": 101, "cluster_id": 7, "machine_id": 1, "dph_total": 10.0, "num_gpus": 8},
                  {"id": 102, "cluster_id": 7, "machine_id": 2, "dph_total": 11.0, "num_gpus": 8},
                  {"id": 103, "cluster_id": 7, "machine_id": 3, "dph_total": 12.5, "num_gpus": 8},
                  {"id": 201, "cluster_id": 9, "machine_id": 4, "dph_total": 1.0, "num_gpus": 8}]
        print(json.dumps(offers))
    elif words[:2] == ["create", "overlay"]:
        if FAIL == "overlay":
            sys.exit("error: overlay failed")
        print("overlay created")
    elif words[:2] == ["create", "instance"]:
        made = instances()
        if FAIL == "create2" and len(made) == 1:
            sys.exit("error: no capacity")
        new_id = 5000 + len(made)
        label = ARGS[ARGS.index("--label") + 1]
        made.append({"id": new_id, "label": label, "actual_status": "loading" if FAIL == "wait" else "running",
                     "public_ipaddr": "127.0.0.1", "ports": {"22/tcp": [{"HostPort": str(40000 + len(made))}]},
                     "ssh_host": "ssh5.vast.example", "ssh_port": 30000 + len(made), "num_gpus": 8,
                     "local_ipaddrs": f"10.1.0.{2 + len(made)}"})
        STATE.write_text(json.dumps(made))
        print(repr({"success": True, "new_contract": new_id}))
    elif words[:2] == ["show", "instances"]:
        print(json.dumps(instances()))
    elif words[:2] == ["destroy", "instance"]:
        print(f"destroying instance {words[2]}.")
    else:
        sys.exit(f"fake vastai: unexpected {ARGS}")


def ssh():
    command = " ".join(ARGS)
    if FAIL == "ssh":
        sys.exit(255)
    if "ip -4 -o addr show dev eth0" in command:
        print("2: eth0    inet 10.1.0.2/24 brd 10.1.0.255 scope global eth0")
    elif "launch/train.py" in command:
        print("step 5: val loss 3.1000 | 4.472 bits/char")
        if FAIL == "train":
            sys.exit(1)


def rsync():
    if FAIL == "copy" and any(a.startswith("node") and "/outputs/" in a for a in ARGS):
        sys.exit(12)


def ssh_keygen():
    key = Path(ARGS[ARGS.index("-f") + 1])
    key.write_text("PRIVATE KEY (fake)\n")
    Path(str(key) + ".pub").write_text("ssh-ed25519 AAAAfake run\n")


if __name__ == "__main__":
    log()
    {"vastai": vastai, "ssh": ssh, "rsync": rsync, "ssh-keygen": ssh_keygen}[PROG]()
