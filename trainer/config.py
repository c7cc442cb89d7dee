"""The typed run configuration: Hydra composes YAML, `to_config` checks it once against these classes.

Every key's default and doc live here (and in data/config.py, model/config.py), as the docstring
under its field; the YAML in conf/ holds only what a preset changes. `python -m trainer.config`
prints every key with its default and doc; `python launch/train.py conf=NAME --cfg job` prints the
values a preset resolves to.
"""
from __future__ import annotations

import ast
import importlib.util
import inspect
import sys
import textwrap
import typing
from collections.abc import Iterator
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path, PurePath

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from data.config import DataConfig
from model.config import GPTConfig


@dataclass
class TrainConfig:
    """`train.*`: the optimizer, its schedule, and when to evaluate, save and log. The defaults are the
    GPT-3 recipe at the baby preset's size (a CPU); conf/recipe/fast.yaml and the presets change only
    what differs."""

    max_steps: int = 2000
    """Optimizer steps of the whole run (a resumed run continues to the same step)."""
    micro_batch: int = 12
    """Sequences per rank per micro-step."""
    grad_accum: int = 1
    """Micro-steps per optimizer step (at full batch size, after any ramp)."""
    lr: float = 1e-3
    """Peak learning rate, reached at the end of the warmup."""
    min_lr: float = 1e-4
    """End of the decay (GPT-3: 10% of lr)."""
    warmup_tokens: int = 76_800
    """Linear warmup, in tokens trained by all ranks together."""
    decay_tokens: int | None = None
    """Where the decay reaches min_lr, in tokens; null: the run's end."""
    schedule: str = "cosine"
    """cosine (from lr after the warmup to min_lr) | wsd (warmup, stable at lr, then a linear
    cooldown to min_lr over the last train.cooldown of the decay span)."""
    cooldown: float = 0.5
    """wsd: the fraction of the span after the warmup spent cooling down."""
    batch_ramp_tokens: int = 0
    """Grow the global batch (by accumulation) over this many tokens; 0: no ramp."""
    batch_start_tokens: int = 0
    """Global batch, in tokens, at the start of the ramp."""
    optimizer: str = "adamw"
    """adamw | muon (Muon, momentum-orthogonalized updates, for the blocks' matrices; AdamW for the
    embeddings, the head, norms and biases; ZeRO-0 only). One lr drives both: Muon's is scaled to
    match AdamW's update size."""
    muon_momentum: float = 0.95
    """Muon's momentum (Nesterov)."""
    weight_decay: float = 0.1
    """Weight decay (decoupled), on matrices only."""
    beta1: float = 0.9
    """AdamW's first-moment decay."""
    beta2: float = 0.95
    """AdamW's second-moment decay (GPT-3: 0.95; the small presets use 0.99)."""
    eps: float = 1e-8
    """AdamW's epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0: no clipping."""
    eval_every: int = 250
    """Steps between evaluations of the val split (one more at the end); 0: only at the end."""
    eval_steps: int = 50
    """Val batches per rank at each evaluation."""
    ckpt_every: int = 500
    """Steps between checkpoints (one more at the end); 0: only at the end."""
    keep_ckpts: int = 3
    """Newest checkpoints kept (older ones deleted once a newer is complete); 0: all."""
    log_every: int = 10
    """Steps between logged metrics (metrics.jsonl, TensorBoard, wandb)."""
    seed: int = 1337
    """Model initialization and the data order, which is a function of (seed, epoch, index)."""
    sample_tokens: int = 300
    """Characters sampled and printed at the end of training; 0: none."""
    progress: bool = True
    """A tqdm bar on rank 0."""
    cost_per_hour: float = 0.0
    """$/h of all nodes together (set by vast_cluster.sh): logs tokens per $."""
    global_batch: int | None = None
    """Sequences per optimizer step, checked against micro_batch x grad_accum x world size when set."""
    record_batches: bool = False
    """Audit trail: a hash of every training window, per rank, in run_dir."""
    compile: bool = False
    """torch.compile the model (DeepSpeed's engine.compile)."""
    activation_checkpointing: bool = False
    """Recompute block activations in backward: less memory, more compute."""
    fused_adamw: bool = True
    """Torch's fused AdamW (CPU, CUDA); false: its default (CPU: a loop per tensor; CUDA: foreach)."""
    profile_steps: int = 0
    """torch.profiler over this many steps after the first 6, into run_dir/profile/; 0: none."""
    collective_timeout_s: float = 1800.0
    """A collective waiting longer for a peer fails the job (a stuck or lost node) instead of hanging;
    long enough for a slow save."""

    def validate(self) -> None:
        """Raise ValueError naming the offending `train.*` key(s)."""
        for key in ("max_steps", "micro_batch", "grad_accum", "eval_steps", "log_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"train.{key} must be >= 1, got {getattr(self, key)}")
        for key in ("eval_every", "ckpt_every", "keep_ckpts", "warmup_tokens", "sample_tokens", "batch_ramp_tokens",
                    "batch_start_tokens", "profile_steps"):
            if getattr(self, key) < 0:
                raise ValueError(f"train.{key} must be >= 0, got {getattr(self, key)}")
        if not self.collective_timeout_s > 0:
            raise ValueError(f"train.collective_timeout_s must be > 0, got {self.collective_timeout_s}")
        if self.cost_per_hour < 0:
            raise ValueError(f"train.cost_per_hour must be >= 0, got {self.cost_per_hour}")
        if self.lr <= 0 or not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"train.lr={self.lr} and train.min_lr={self.min_lr}: need 0 <= min_lr <= lr and lr > 0")
        if self.decay_tokens is not None and self.decay_tokens <= self.warmup_tokens:
            raise ValueError(f"train.decay_tokens={self.decay_tokens} must be > "
                             f"train.warmup_tokens={self.warmup_tokens}")
        if self.schedule not in ("cosine", "wsd"):
            raise ValueError(f"train.schedule={self.schedule!r}: choose cosine or wsd")
        if not 0 < self.cooldown <= 1:
            raise ValueError(f"train.cooldown must be in (0, 1], got {self.cooldown}")
        if self.optimizer not in ("adamw", "muon"):
            raise ValueError(f"train.optimizer={self.optimizer!r}: choose adamw or muon")
        if not 0 <= self.muon_momentum < 1:
            raise ValueError(f"train.muon_momentum must be in [0, 1), got {self.muon_momentum}")
        for key, needs, value in (("cooldown", "schedule", "wsd"), ("muon_momentum", "optimizer", "muon")):
            if getattr(self, key) != getattr(TrainConfig, key) and getattr(self, needs) != value:
                raise ValueError(f"train.{key} is set, but applies only with train.{needs}={value} "
                                 f"(this run: {getattr(self, needs)})")
        if self.batch_ramp_tokens and not 0 < self.batch_start_tokens:
            raise ValueError("train.batch_ramp_tokens is set: train.batch_start_tokens must be > 0")


@dataclass
class DeepSpeedConfig:
    """`deepspeed.*`: the ZeRO stage and its buffers (pick a stage with deepspeed=zero0..zero3)."""

    stage: int = 0
    """ZeRO stage: 0 data parallel, 1 optimizer state, 2 and gradients, 3 and parameters partitioned."""
    overlap_comm: bool = False
    """ZeRO 1-3: overlap the gradient reduction with backward."""
    contiguous_gradients: bool = True
    """ZeRO 1-3: copy gradients into one contiguous buffer as they are produced."""
    reduce_bucket_size: int | None = None
    """ZeRO 1-3: elements per gradient bucket (a buffer this big is kept); null: parameters / 16,
    within [5e5, 5e8]."""
    stage3_prefetch_bucket_size: int | None = None
    """ZeRO-3: elements of parameters fetched ahead; null: as reduce_bucket_size's null."""
    stage3_param_persistence_threshold: int = 100_000
    """ZeRO-3: tensors smaller than this many elements stay whole on every rank."""

    def validate(self) -> None:
        if self.stage not in (0, 1, 2, 3):
            raise ValueError(f"deepspeed.stage={self.stage}: ZeRO stages are 0, 1, 2, 3")


@dataclass
class TrackingConfig:
    """`tracking.*`: where the metrics go besides metrics.jsonl (rank 0 only)."""

    tensorboard: bool = True
    """Event files in run_dir/tensorboard."""
    wandb: bool = False
    """Weights & Biases too (pip install -e '.[wandb]'; the key from `wandb login` or WANDB_API_KEY,
    never from here)."""
    project: str = "shakespeare-transformer"
    """wandb project."""
    entity: str = ""
    """wandb team or user; "": wandb's default."""
    name: str = ""
    """wandb run name; "": the run dir's name."""
    tags: list[str] = field(default_factory=list)
    """wandb tags."""
    group: str = ""
    """wandb group."""
    mode: str = "online"
    """online | offline (`wandb sync` uploads later)."""
    init_timeout_s: float = 60.0
    """How long wandb may take to start before the run logs offline."""

    def validate(self) -> None:
        if self.mode not in ("online", "offline"):
            raise ValueError(f"tracking.mode={self.mode!r}: choose online or offline")
        if self.wandb and importlib.util.find_spec("wandb") is None:
            raise ValueError("tracking.wandb=true, but the wandb package is not installed: pip install -e '.[wandb]'")


@dataclass
class Config:
    """A run: conf/train.yaml composed with a preset (conf=NAME) and command-line overrides."""

    model: GPTConfig = field(default_factory=GPTConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    precision: str = "fp32"
    """fp32 | bf16 (at ZeRO-0: torch autocast over fp32 weights; ZeRO 1-3: DeepSpeed's bf16)."""
    run_dir: str = "outputs/run"
    """Holds config.yaml, metrics.jsonl, tensorboard/ and checkpoints/ (conf/train.yaml: outputs/PRESET;
    outputs/PRESET-NAME for data.source=text, NAME the name of data.dir)."""
    resume: str = "auto"
    """auto (the run_dir's latest checkpoint, when there is one) | never | PATH of a checkpoint dir."""
    init_from: str = ""
    """Fine-tuning: a run dir (or checkpoint) whose weights this run starts from, with a fresh optimizer
    and data order, when run_dir has no checkpoint of its own; "": random weights."""
    preset: str = ""
    """The preset chosen with conf=NAME (set by conf/train.yaml)."""

    def validate(self, world_size: int | None = None) -> None:
        """Every check that needs no data, each section's own first; raises ValueError naming the key.
        world_size (when known, e.g. from the launcher's WORLD_SIZE) is checked against train.global_batch."""
        self.data.validate()
        self.model.validate(vocab_from_data=True)
        self.train.validate()
        self.deepspeed.validate()
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision={self.precision!r}: choose fp32 or bf16")
        self.tracking.validate()
        if self.train.optimizer == "muon" and self.deepspeed.stage != 0:
            raise ValueError(f"train.optimizer=muon runs at deepspeed.stage=0 only (got {self.deepspeed.stage}): ZeRO "
                             "1-3 hand the optimizer flat slices of the weights, and Muon orthogonalizes whole "
                             "matrices; use deepspeed=zero0 or train.optimizer=adamw")
        if not self.run_dir:
            raise ValueError("run_dir must not be empty")
        t = self.train
        if t.global_batch is not None and world_size is not None:
            got = t.micro_batch * t.grad_accum * world_size
            if got != t.global_batch:
                raise ValueError(f"train.global_batch={t.global_batch} but train.micro_batch={t.micro_batch} x "
                                 f"train.grad_accum={t.grad_accum} x {world_size} ranks = {got}")


def default_run_dir(preset: str, source: str, data_dir: str) -> str:
    """conf/train.yaml's run_dir: outputs/PRESET on the preset's own data; on your own text,
    outputs/PRESET-NAME (NAME: data.dir's folder), so that it never continues another run."""
    return f"outputs/{preset}" if source != "text" else f"outputs/{preset}-{PurePath(data_dir).name}"


def corpus_name(path: str) -> str:
    """conf/data/text.yaml's data.dir: shards/NAME, NAME the file's stem or the folder's name."""
    return PurePath(path).stem or "text"


OmegaConf.register_new_resolver("default_run_dir", default_run_dir, replace=True)
OmegaConf.register_new_resolver("corpus_name", corpus_name, replace=True)


class ConfigError(ValueError):
    """A bad setting, named by its key."""


def to_config(cfg: DictConfig | dict, world_size: int | None = None) -> Config:
    """Merge Hydra's output into the typed schema (wrong keys or types fail here) and validate."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(f"config: {e.msg if hasattr(e, 'msg') else e} (key: {getattr(e, 'full_key', '?')})") from None
    config: Config = OmegaConf.to_object(merged)
    try:
        config.validate(world_size)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return config


def _one_line(error: Exception) -> str:
    """Hydra's and OmegaConf's multi-line messages as one line that names the key or the option."""
    from hydra.errors import MissingConfigException
    from omegaconf.errors import OmegaConfBaseException

    cause = error.__cause__ if isinstance(error.__cause__, OmegaConfBaseException) else error
    if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
        return f"{cause.full_key}: {str(cause.msg).splitlines()[0]}"
    if isinstance(error, MissingConfigException) and error.missing_cfg_file and error.options:
        group, _, name = error.missing_cfg_file.rpartition("/")
        return f"{group}={name}: no such option; choose one of {', '.join(error.options)}"
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return "; ".join(line for line in lines[:2] if not line.startswith("See http"))


def compose(conf_dir, overrides: list[str]):
    """conf/train.yaml composed with `key=value` overrides as @hydra.main composes it, `${hydra:...}`
    resolvable, the `hydra` node removed. Any Hydra or OmegaConf error (an unknown key, preset or
    option, a wrong type, bad syntax) is raised as a ConfigError of one line naming the key."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from hydra.errors import HydraException
    from omegaconf import open_dict
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base=None):
            cfg = hydra_compose("train", overrides=list(overrides), return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            del cfg["hydra"]
        return cfg
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(_one_line(e)) from None


def register_presets(conf_dir) -> list[str]:
    """Register the typed schema, and make every conf/NAME.yaml (but train.yaml) selectable as `conf=NAME`.

    Hydra names a config group after its folder; registering the top-level preset files under the
    group `conf` keeps them beside the groups they override (conf/model/, conf/data/, ...).
    """
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(name="schema", node=Config)  # every key typed and present, even if no YAML sets it
    names = []
    for path in sorted(Path(conf_dir).glob("*.yaml")):
        if path.stem != "train":
            store.store(group="conf", name=path.stem, node=OmegaConf.load(path), package="_global_")
            names.append(path.stem)
    return names


def field_docs(cls) -> dict[str, str]:
    """{field name: the docstring right under it} of a dataclass, read from its source."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    return {node.target.id: inspect.cleandoc(doc.value.value) for node, doc in zip(body, body[1:])
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(doc, ast.Expr)
            and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str)}


def describe(cls=Config, prefix: str = "") -> Iterator[tuple[str, object, str]]:
    """(dotted key, default, doc) of every key of the schema, in declaration order."""
    docs, types = field_docs(cls), typing.get_type_hints(cls)
    for f in fields(cls):
        default = f.default_factory() if f.default is MISSING else f.default
        if is_dataclass(types[f.name]):
            yield from describe(types[f.name], f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", default, docs.get(f.name, "")


def print_keys(out=None, overrides: list[str] = (), cls=Config) -> None:
    """Every key, its value and its doc: `python -m trainer.config [conf=NAME key=value ...]` (no
    overrides: the dataclasses' defaults; with them: the values that run would use). cls: another
    dataclass's keys (the entry points' `--help`)."""
    out = out or sys.stdout
    values = None
    if overrides:
        conf_dir = Path(__file__).resolve().parents[1] / "conf"
        register_presets(conf_dir)
        values = OmegaConf.to_container(compose(conf_dir, list(overrides)), resolve=True)
    for key, default, doc in describe(cls):
        value = default
        if values is not None:
            value = values
            for part in key.split("."):
                value = value.get(part, default) if isinstance(value, dict) else default
        shown = repr(value) if isinstance(value, str) and value != value.strip() else \
            OmegaConf.to_yaml({"v": value}).strip()[3:]  # YAML hides a string's edge spaces and newlines
        print(f"{key} = {shown}", file=out)
        for line in textwrap.wrap(" ".join(doc.split()), 96):
            print(f"    {line}", file=out)


if __name__ == "__main__":
    try:
        print_keys(overrides=sys.argv[1:])
    except ConfigError as e:
        sys.exit(f"config error: {e}")
