#!/usr/bin/env bash
# Rent NODES vast.ai machines in one physical cluster, train on all of them, copy the run back, and
# destroy every instance this script created: on success, on error, and on Ctrl-C.
#
#   bash launch/vast_cluster.sh [flags] [-- hydra overrides...]
#
# Settings (flag, or environment variable of the same name in capitals):
#   --nodes N          NODES=2               machines
#   --gpus G           GPUS=8                GPUs per machine
#   --gpu-name NAME    GPU_NAME=H100_SXM     vastai's gpu_name (RTX_4090, A100_SXM4, H100_SXM, ...)
#   --max-dph P        MAX_DPH=25            most $/hour per machine
#   --image IMG        IMAGE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-devel
#   --disk GB          DISK=100
#   --conf NAME        CONF=shakespeare      preset (conf=NAME)
#   --run NAME         RUN=st-<date>         label of the instances, overlay name, run_dir outputs/NAME
#   --ssh-key PATH     SSH_KEY=~/.ssh/id_ed25519   the key vast.ai knows (add it on the website first)
#   --timeout S        WAIT_TIMEOUT=1200     how long instances may take to run and answer ssh
#   --dry-run                                print every vastai/ssh/rsync command instead of running it
# The API key is the vastai CLI's business (`vastai set api-key`, or VAST_API_KEY): this script never
# reads, prints or writes it.
set -euo pipefail

NODES=${NODES:-2}
GPUS=${GPUS:-8}
GPU_NAME=${GPU_NAME:-H100_SXM}
MAX_DPH=${MAX_DPH:-25}
IMAGE=${IMAGE:-pytorch/pytorch:2.5.1-cuda12.4-cudnn9-devel}
DISK=${DISK:-100}
CONF=${CONF:-shakespeare}
RUN=${RUN:-st-$(date +%Y%m%d-%H%M%S)}
SSH_KEY=${SSH_KEY:-$HOME/.ssh/id_ed25519}
WAIT_TIMEOUT=${WAIT_TIMEOUT:-1200}
POLL=${POLL:-10}
DRY_RUN=${DRY_RUN:-0}
VASTAI=${VASTAI:-vastai}
SSH=${SSH:-ssh}
RSYNC=${RSYNC:-rsync}
SSH_KEYGEN=${SSH_KEYGEN:-ssh-keygen}
PYTHON=${PYTHON:-python3}
REMOTE_DIR=/workspace/shakespeare
OVERRIDES=()

usage() { sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; }
need_value() { [ "$#" -ge 2 ] || { echo "vast_cluster.sh: $1 needs a value" >&2; exit 2; }; }
while [ "$#" -gt 0 ]; do
  case "$1" in
    --nodes) need_value "$@"; NODES=$2; shift 2 ;;
    --gpus) need_value "$@"; GPUS=$2; shift 2 ;;
    --gpu-name) need_value "$@"; GPU_NAME=$2; shift 2 ;;
    --max-dph) need_value "$@"; MAX_DPH=$2; shift 2 ;;
    --image) need_value "$@"; IMAGE=$2; shift 2 ;;
    --disk) need_value "$@"; DISK=$2; shift 2 ;;
    --conf) need_value "$@"; CONF=$2; shift 2 ;;
    --run) need_value "$@"; RUN=$2; shift 2 ;;
    --ssh-key) need_value "$@"; SSH_KEY=$2; shift 2 ;;
    --timeout) need_value "$@"; WAIT_TIMEOUT=$2; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; OVERRIDES=("$@"); break ;;
    *) echo "vast_cluster.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
for setting in NODES GPUS DISK WAIT_TIMEOUT; do
  case "${!setting}" in ''|*[!0-9]*|0) echo "vast_cluster.sh: $setting must be a whole number >= 1, got '${!setting}'" >&2; exit 2 ;; esac
done
case "$RUN" in *[!A-Za-z0-9_.-]*) echo "vast_cluster.sh: RUN '$RUN' may hold only letters, digits, '.', '_', '-'" >&2; exit 2 ;; esac

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
WORK="$ROOT/outputs/$RUN/cluster"
mkdir -p "$WORK"
CREATED=()

log() { echo "[vast_cluster] $*" >&2; }
show() { { printf '+'; printf ' %q' "$@"; printf '\n'; } >&2; }
# run CMD...: print it (on stderr) in a dry run, else run it.
run() { if [ "$DRY_RUN" = 1 ]; then show "$@"; else "$@"; fi; }
remote() { local node=$1; shift; run "$SSH" -F "$WORK/ssh_config" "$node" "$@"; }

destroy_all() {
  local status=$?
  trap - EXIT INT TERM
  if [ "${#CREATED[@]}" -gt 0 ]; then
    log "destroying ${#CREATED[@]} instance(s): ${CREATED[*]}"
    for id in "${CREATED[@]}"; do
      for attempt in 1 2 3; do
        if run "$VASTAI" destroy instance "$id" -y >/dev/null; then break; fi
        log "destroy $id failed (attempt $attempt)"; sleep 2
      done
    done
  fi
  exit "$status"
}
trap destroy_all EXIT
trap 'log "interrupted"; exit 130' INT TERM

# 1. offers in one physical cluster ----------------------------------------------------------------
QUERY="cluster_id!=None num_gpus=$GPUS gpu_name=$GPU_NAME dph_total<=$MAX_DPH rentable=true"
if [ "$DRY_RUN" = 1 ]; then
  show "$VASTAI" search offers "$QUERY" -o dph_total --raw
  CLUSTER="<CLUSTER_ID>"; TOTAL_DPH="<TOTAL_DPH>"
  OFFERS=(); for i in $(seq 1 "$NODES"); do OFFERS+=("<OFFER_$i>"); done
else
  "$VASTAI" search offers "$QUERY" -o dph_total --raw > "$WORK/offers.json"
  read -r CLUSTER TOTAL_DPH OFFERS_LINE < <("$PYTHON" -m launch.vast pick-offers --nodes "$NODES" < "$WORK/offers.json" || echo FAIL)
  [ "$CLUSTER" != FAIL ] || { log "no usable offers (see $WORK/offers.json)"; exit 1; }
  read -r -a OFFERS <<< "$OFFERS_LINE"
fi
log "cluster $CLUSTER: $NODES x $GPUS $GPU_NAME, total \$$TOTAL_DPH/h; offers ${OFFERS[*]}"
echo "total cost: \$$TOTAL_DPH/h for $NODES nodes ($((NODES * GPUS)) GPUs)"

# 2. overlay network, 3. instances ------------------------------------------------------------------
run "$VASTAI" create overlay "$CLUSTER" "$RUN" >/dev/null
for offer in "${OFFERS[@]}"; do
  if [ "$DRY_RUN" = 1 ]; then
    show "$VASTAI" create instance "$offer" --image "$IMAGE" --disk "$DISK" --ssh --direct --env "-n $RUN" --label "$RUN"
    CREATED+=("<ID_of_$offer>")
    continue
  fi
  out=$("$VASTAI" create instance "$offer" --image "$IMAGE" --disk "$DISK" --ssh --direct \
        --env "-n $RUN" --label "$RUN")
  id=$(echo "$out" | "$PYTHON" -m launch.vast contract-id)
  CREATED+=("$id")
  log "created instance $id from offer $offer"
done

# 4. wait until every instance runs and answers ssh -------------------------------------------------
IDS=$(IFS=,; echo "${CREATED[*]}")
if [ "$DRY_RUN" = 1 ]; then
  show "$VASTAI" show instances --raw
  show "$PYTHON" -m launch.cluster --vast-json - --label "$RUN" --out "$WORK" --identity "$SSH_KEY"
  MASTER="<overlay address of node0>"
else
  deadline=$((SECONDS + WAIT_TIMEOUT))
  until "$VASTAI" show instances --raw > "$WORK/instances.json" \
        && states=$("$PYTHON" -m launch.vast all-running --ids "$IDS" < "$WORK/instances.json"); do
    [ "$SECONDS" -lt "$deadline" ] || { log "timed out after ${WAIT_TIMEOUT}s waiting for instances: ${states:-}"; exit 1; }
    log "waiting for instances: ${states:-}"; sleep "$POLL"
  done
  "$PYTHON" -m launch.cluster --vast-json "$WORK/instances.json" --label "$RUN" --out "$WORK" \
    --identity "$SSH_KEY" --pythonpath "$REMOTE_DIR" >&2
  for i in $(seq 0 $((NODES - 1))); do
    until "$SSH" -F "$WORK/ssh_config" "node$i" true 2>/dev/null; do
      [ "$SECONDS" -lt "$deadline" ] || { log "timed out waiting for ssh to node$i"; exit 1; }
      log "waiting for ssh to node$i"; sleep "$POLL"
    done
  done
  # the rendezvous address: node0's address on the overlay network (eth0), not its public NAT address
  MASTER=$("$SSH" -F "$WORK/ssh_config" node0 "ip -4 -o addr show dev eth0" | awk '{print $4}' | cut -d/ -f1 | head -n1)
  [ -n "$MASTER" ] || { log "could not read node0's eth0 address"; exit 1; }
fi
log "master address $MASTER"

# 5. cluster files: a per-run key lets node0's launcher reach the others; the user's key stays here
HEAD_DIR="$WORK/head"
mkdir -p "$HEAD_DIR"
run "$PYTHON" -m launch.cluster --vast-json "$WORK/instances.json" --label "$RUN" --out "$HEAD_DIR" \
  --identity "~/.ssh/${RUN}_key" --master-addr "$MASTER" --pythonpath "$REMOTE_DIR" >&2
[ -f "$WORK/${RUN}_key" ] || run "$SSH_KEYGEN" -q -t ed25519 -N "" -C "$RUN" -f "$WORK/${RUN}_key"

# 6. code, set-up and data on every node ------------------------------------------------------------
QUOTED_DATA=""  # the data.* overrides reach prepare too (e.g. data.path, data.workers)
for o in "${OVERRIDES[@]+"${OVERRIDES[@]}"}"; do
  case "$o" in data.*|data=*) QUOTED_DATA+=" $(printf '%q' "$o")" ;; esac
done
for i in $(seq 0 $((NODES - 1))); do
  run "$RSYNC" -az --exclude .venv --exclude .git --exclude outputs --exclude shards --exclude .cache/torch_extensions \
    -e "$SSH -F $WORK/ssh_config" "$ROOT/" "node$i:$REMOTE_DIR/"
  run "$RSYNC" -az -e "$SSH -F $WORK/ssh_config" "$WORK/${RUN}_key.pub" "node$i:/tmp/${RUN}_key.pub"
  remote "node$i" "cat /tmp/${RUN}_key.pub >> ~/.ssh/authorized_keys && cd $REMOTE_DIR && make setup >/tmp/setup.log 2>&1 && .venv/bin/python launch/prepare.py conf=$CONF$QUOTED_DATA >/tmp/prepare.log 2>&1 || { tail -20 /tmp/setup.log /tmp/prepare.log; exit 1; }"
done
run "$RSYNC" -az -e "$SSH -F $WORK/ssh_config" "$WORK/${RUN}_key" "$HEAD_DIR/ssh_config" "$HEAD_DIR/hostfile" \
  "$HEAD_DIR/.deepspeed_env" node0:/tmp/
remote node0 "install -m 600 /tmp/${RUN}_key ~/.ssh/${RUN}_key && cat /tmp/ssh_config >> ~/.ssh/config && cp /tmp/hostfile /tmp/.deepspeed_env $REMOTE_DIR/ && (command -v pdsh >/dev/null || (apt-get update -qq && apt-get install -y -qq pdsh >/dev/null))"

# 7. train from node0, streaming its log ------------------------------------------------------------
QUOTED_OVERRIDES=""
for o in "${OVERRIDES[@]+"${OVERRIDES[@]}"}"; do QUOTED_OVERRIDES+=" $(printf '%q' "$o")"; done
TRAIN="cd $REMOTE_DIR && .venv/bin/deepspeed --hostfile hostfile --launcher pdsh --master_addr $MASTER launch/train.py conf=$CONF run_dir=outputs/$RUN train.cost_per_hour=$TOTAL_DPH$QUOTED_OVERRIDES"
log "training: $TRAIN"
set +e
remote node0 "$TRAIN" 2>&1 | tee "$WORK/train.log"
train_status=${PIPESTATUS[0]}
set -e

# 8. copy the run back from every node (each holds its own ranks' checkpoint shards) ----------------
for i in $(seq 0 $((NODES - 1))); do
  run "$RSYNC" -az -e "$SSH -F $WORK/ssh_config" "node$i:$REMOTE_DIR/outputs/$RUN/" "$ROOT/outputs/$RUN/"
done
[ "$train_status" -eq 0 ] || { log "training failed (exit $train_status); the run so far is in outputs/$RUN"; exit "$train_status"; }
log "done: outputs/$RUN (tensorboard --logdir outputs/$RUN)"
