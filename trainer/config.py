"""The typed run configuration: Hydra composes YAML, `to_config` checks it once against these classes."""
from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from data.config import DataConfig
from model.config import GPTConfig


@dataclass
class TrainConfig:
    max_steps: int = 2000
    micro_batch: int = 12      # sequences per rank per micro-step
    grad_accum: int = 1        # micro-steps per optimizer step (at full batch size)
    lr: float = 1e-3           # peak learning rate
    min_lr: float = 1e-4       # end of the cosine decay (GPT-3: 10% of lr)
    warmup_tokens: int = 76_800          # linear warmup (tokens trained, all ranks together)
    decay_tokens: int | None = None      # where the cosine reaches min_lr; None = the run's end
    batch_ramp_tokens: int = 0           # grow the global batch over this many tokens; 0 = no ramp
    batch_start_tokens: int = 0          # global batch (tokens) at the start of the ramp
    weight_decay: float = 0.1  # on matrices only
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    eval_every: int = 250
    eval_steps: int = 50       # val batches per rank at each evaluation
    ckpt_every: int = 500
    keep_ckpts: int = 3        # newest checkpoints kept (older ones deleted once a newer is complete); 0 = all
    log_every: int = 10
    seed: int = 1337
    sample_tokens: int = 300   # printed at the end of training (0: none)
    progress: bool = True      # tqdm bar on rank 0
    cost_per_hour: float = 0.0  # $/h of all nodes together (set by vast_cluster.sh): logs tokens per $
    global_batch: int | None = None  # sequences per optimizer step, if you want it checked against
                                     # micro_batch x grad_accum x world size
    record_batches: bool = False  # audit trail: a hash of every training window, per rank, in run_dir
    compile: bool = False      # torch.compile the model (DeepSpeed's engine.compile)
    activation_checkpointing: bool = False  # recompute block activations in backward: less memory
    fused_adamw: bool = True   # fused AdamW (CPU, CUDA); false: torch's default (CPU: a loop per tensor; CUDA: foreach)
    profile_steps: int = 0     # torch.profiler over this many steps after the first 6: run_dir/profile/
    collective_timeout_s: float = 1800.0  # a collective waiting longer for a peer fails the job (a stuck or
                                          # lost node), instead of hanging; long enough for a slow save


@dataclass
class DeepSpeedConfig:
    stage: int = 0             # ZeRO stage 0..3
    overlap_comm: bool = False
    contiguous_gradients: bool = True
    reduce_bucket_size: int | None = None  # elements per gradient bucket (a buffer this big is kept);
                                           # None: parameters / 16, within [5e5, 5e8]
    stage3_prefetch_bucket_size: int | None = None  # ZeRO-3: elements of parameters fetched ahead; None: as above
    stage3_param_persistence_threshold: int = 100_000  # ZeRO-3: tensors smaller than this stay whole


@dataclass
class TrackingConfig:
    tensorboard: bool = True   # run_dir/tensorboard
    wandb: bool = False        # Weights & Biases too (pip install -e '.[wandb]'; the key from `wandb login`
                               # or WANDB_API_KEY, never from here)
    project: str = "shakespeare-transformer"
    entity: str = ""           # team or user; "": wandb's default
    name: str = ""             # "": the run dir's name
    tags: list[str] = field(default_factory=list)
    group: str = ""
    mode: str = "online"       # online | offline (`wandb sync` uploads later)
    init_timeout_s: float = 60.0  # how long wandb may take to start before the run logs offline


@dataclass
class Config:
    model: GPTConfig = field(default_factory=GPTConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    precision: str = "fp32"    # fp32 | bf16
    run_dir: str = "outputs/run"
    resume: str = "auto"       # auto | never | PATH of a checkpoint dir
    preset: str = ""           # name of the preset that was chosen with conf=...


class ConfigError(ValueError):
    """A bad setting, named by its key."""


def to_config(cfg: DictConfig | dict, world_size: int | None = None) -> Config:
    """Merge Hydra's output into the typed schema (wrong keys or types fail here) and validate."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(f"config: {e.msg if hasattr(e, 'msg') else e} (key: {getattr(e, 'full_key', '?')})") from None
    config: Config = OmegaConf.to_object(merged)
    validate(config, world_size)
    return config


def validate(c: Config, world_size: int | None = None) -> None:
    """Every check that needs no data; world_size (when known, e.g. from the launcher's WORLD_SIZE)
    is checked against train.global_batch."""
    try:
        c.data.validate()
        vocab = c.model.vocab_size
        c.model.vocab_size = vocab or 1  # the real size comes from the manifest later
        c.model.validate()
        c.model.vocab_size = vocab
    except ValueError as e:
        raise ConfigError(str(e)) from None
    t = c.train
    for key in ("max_steps", "micro_batch", "grad_accum", "eval_steps", "log_every"):
        if getattr(t, key) < 1:
            raise ConfigError(f"train.{key} must be >= 1, got {getattr(t, key)}")
    for key in ("eval_every", "ckpt_every", "keep_ckpts", "warmup_tokens", "sample_tokens", "batch_ramp_tokens",
                "batch_start_tokens", "profile_steps"):
        if getattr(t, key) < 0:
            raise ConfigError(f"train.{key} must be >= 0, got {getattr(t, key)}")
    if not t.collective_timeout_s > 0:
        raise ConfigError(f"train.collective_timeout_s must be > 0, got {t.collective_timeout_s}")
    if t.cost_per_hour < 0:
        raise ConfigError(f"train.cost_per_hour must be >= 0, got {t.cost_per_hour}")
    if t.lr <= 0 or not 0 <= t.min_lr <= t.lr:
        raise ConfigError(f"train.lr={t.lr} and train.min_lr={t.min_lr}: need 0 <= min_lr <= lr and lr > 0")
    if t.decay_tokens is not None and t.decay_tokens <= t.warmup_tokens:
        raise ConfigError(f"train.decay_tokens={t.decay_tokens} must be > train.warmup_tokens={t.warmup_tokens}")
    if t.batch_ramp_tokens and not 0 < t.batch_start_tokens:
        raise ConfigError("train.batch_ramp_tokens is set: train.batch_start_tokens must be > 0")
    if c.deepspeed.stage not in (0, 1, 2, 3):
        raise ConfigError(f"deepspeed.stage={c.deepspeed.stage}: ZeRO stages are 0, 1, 2, 3")
    if c.precision not in ("fp32", "bf16"):
        raise ConfigError(f"precision={c.precision!r}: choose fp32 or bf16")
    if c.tracking.mode not in ("online", "offline"):
        raise ConfigError(f"tracking.mode={c.tracking.mode!r}: choose online or offline")
    if c.tracking.wandb:
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            raise ConfigError("tracking.wandb=true, but the wandb package is not installed: pip install -e '.[wandb]'")
    if not c.run_dir:
        raise ConfigError("run_dir must not be empty")
    if t.global_batch is not None and world_size is not None:
        got = t.micro_batch * t.grad_accum * world_size
        if got != t.global_batch:
            raise ConfigError(
                f"train.global_batch={t.global_batch} but train.micro_batch={t.micro_batch} x "
                f"train.grad_accum={t.grad_accum} x {world_size} ranks = {got}"
            )


def register_presets(conf_dir) -> list[str]:
    """Register the typed schema, and make every conf/NAME.yaml (but train.yaml) selectable as `conf=NAME`.

    Hydra names a config group after its folder; registering the top-level preset files under the
    group `conf` keeps them beside the groups they override (conf/model/, conf/data/, ...).
    """
    from pathlib import Path

    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(name="schema", node=Config)  # every key typed and present, even if no YAML sets it
    names = []
    for path in sorted(Path(conf_dir).glob("*.yaml")):
        if path.stem != "train":
            store.store(group="conf", name=path.stem, node=OmegaConf.load(path), package="_global_")
            names.append(path.stem)
    return names
