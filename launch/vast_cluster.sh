#!/usr/bin/env bash
# Rent vast.ai nodes in one physical cluster, train detached on them, bring the run home, and destroy
# what was rented: on success, on error, on any signal; the nodes guard the money without the laptop.
#
#   bash launch/vast_cluster.sh [run] --nodes N --gpus G --gpu-name NAME --max-dph P --conf NAME
#        [--run NAME] [--timeout S] [--detach] [--resume outputs/RUN] [--max-hours H] [--max-usd D]
#        [--grace-minutes M] [--interruptible [--bid P] [--nodes-min N]]
#        [--ckpt-minutes M] [--yes] [-- hydra overrides...]
#   bash launch/vast_cluster.sh plan ... (the flags of run: the cost, renting nothing)
#   bash launch/vast_cluster.sh up|train|status|logs [-f]|fetch|down [--force]|watch --run NAME
#
# The work is done by launch/vast/ (--help lists every flag; docs/clusters.md lists the environment
# variable each one reads: NODES, GPUS, GPU_NAME, MAX_DPH, CONF, RUN, SSH_KEY, WAIT_TIMEOUT, ...).
# The API key comes from VAST_API_KEY or the file `vastai set api-key` writes; it is never printed,
# written or put on a command line. docs/clusters.md: every step, its cost, and troubleshooting.
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 1
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
exec "$PY" -m launch.vast "$@"
