"""The sha256 list of a checkpoint's files, kept in its meta.json, and the check against it.

Standard library only: the cluster driver verifies fetched checkpoints on a laptop without torch.
A checkpoint's pickled files can run code when loaded, so nothing here opens them as anything but
bytes; they are handed to torch or DeepSpeed only once their sums match a meta.json you trust.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

META = "meta.json"  # step, vocab, model config, world size, ZeRO stage, and every file's sum
# the only names a checkpoint's file list may hold: DeepSpeed's per-rank files, flat in the tag dir
FILE_NAME = re.compile(r"[A-Za-z0-9_.-]+\.pt", re.ASCII)  # used with fullmatch


class ChecksumError(ValueError):
    """A checkpoint file is missing, of another size, or of other content than its meta.json says."""


def sha256_file(path: Path, sync: bool = False) -> str:
    """sync: also make the file durable (torch.save does not), before anything names it complete."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
        if sync:
            os.fsync(f.fileno())
    return digest.hexdigest()


def hash_files(tag_dir: Path) -> dict[str, dict]:
    """{name: {"sha256", "bytes"}} of the checkpoint files present in tag_dir (this disk's share),
    each synced to disk, and the folder too: `latest` may name them only once they are durable."""
    tag_dir = Path(tag_dir)
    files = {p.name: {"sha256": sha256_file(p, sync=True), "bytes": p.stat().st_size}
             for p in sorted(tag_dir.iterdir()) if p.is_file() and FILE_NAME.fullmatch(p.name)}
    fd = os.open(tag_dir, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return files


def merge(shares: list[dict[str, dict]]) -> dict[str, list[dict]]:
    """One file list from every node's share: {name: [every node's copy's sum]}. Nodes that each keep
    a copy of the same file (the model states at ZeRO 0-2) write different bytes, since torch.save
    stamps every file with an id of its own; any one of those copies is the file."""
    files: dict[str, list[dict]] = {}
    for share in shares:
        for name, entry in share.items():
            if entry not in files.setdefault(name, []):
                files[name].append(entry)
    return dict(sorted(files.items()))


def read_meta(tag_dir: Path) -> dict:
    path = Path(tag_dir) / META
    if not path.is_file():
        raise ChecksumError(f"{path}: missing (not a checkpoint written by this trainer, or incomplete)")
    try:
        meta = json.loads(path.read_text())
    except (ValueError, RecursionError) as e:  # bad UTF-8 or JSON, a number too long to read, deep nesting
        raise ChecksumError(f"{path}: not valid JSON ({str(e)[:200]})") from None
    if not isinstance(meta, dict):
        raise ChecksumError(f"{path}: not a JSON object")
    files = meta.get("files")
    if not isinstance(files, dict) or not files:
        raise ChecksumError(f"{path}: no `files` list of sha256 sums (not written by this trainer): its files "
                            "cannot be checked before loading, so nothing is loaded from it")
    for name, copies in files.items():
        if not (isinstance(name, str) and FILE_NAME.fullmatch(name) and isinstance(copies, list) and copies
                and all(_is_sum(entry) for entry in copies)):
            raise ChecksumError(f"{path}: files[{name[:80]!r}] is not a checkpoint file name with a list of "
                                "sha256 sums and sizes")
    return meta


def _is_sum(entry) -> bool:
    return (isinstance(entry, dict) and isinstance(entry.get("sha256"), str)
            and re.fullmatch(r"[0-9a-f]{64}", entry["sha256"]) is not None
            and isinstance(entry.get("bytes"), int) and not isinstance(entry["bytes"], bool) and entry["bytes"] >= 0)


def verify(tag_dir: Path, names: list[str] | None = None, meta: dict | None = None) -> dict:
    """Check `names` (default: every file listed) against `meta` (default: tag_dir's meta.json, read
    and checked here); returns the meta.

    Raises ChecksumError naming the first file that is missing, of another size or other content,
    and refuses a folder holding anything DeepSpeed could load that meta.json does not list: it finds
    its files by pattern, so a planted file would be unpickled beside the checked ones.
    """
    tag_dir = Path(tag_dir)
    meta = meta if meta is not None else read_meta(tag_dir)
    files = meta["files"]
    check_no_strangers(tag_dir, files)
    for name in names if names is not None else files:
        if name not in files:
            raise ChecksumError(f"{tag_dir / META}: lists no {name} (a checkpoint of another world size or stage?)")
        path, copies = tag_dir / name, files[name]
        if not path.is_file():
            raise ChecksumError(f"{path}: missing (each node holds only its own ranks' files: copy it here from "
                                "the node that wrote it)")
        size = path.stat().st_size
        if size not in {c["bytes"] for c in copies}:
            raise ChecksumError(f"{path}: {size} bytes, but {META} says {copies[0]['bytes']} (truncated or "
                                "replaced in transit?)")
        if sha256_file(path) not in {c["sha256"] for c in copies}:
            raise ChecksumError(f"{path}: sha256 differs from {META} (changed in transit or on the host that "
                                "held it): refusing to load it")
    return meta


def check_no_strangers(tag_dir: Path, files: dict) -> None:
    """Every entry of tag_dir is a plain file that meta.json lists, meta.json itself (or a temporary
    file of it), or this machine's own universal conversion (the `universal` folder and the
    `latest_universal` note that ds_to_universal leaves beside it); nothing is a link."""
    for entry in os.scandir(tag_dir):
        mode = entry.stat(follow_symlinks=False).st_mode
        listed = (entry.name in files or entry.name in (META, "latest_universal")
                  or entry.name.startswith(META + ".tmp"))
        expected = listed if stat.S_ISREG(mode) else stat.S_ISDIR(mode) and entry.name.startswith("universal")
        if not expected:  # links and anything else are never expected
            raise ChecksumError(f"{Path(tag_dir) / entry.name}: not a file {META} lists (a link, or a file "
                                "planted beside the checkpoint): refusing to load anything from this folder")


@dataclass(frozen=True)
class SizeBounds:
    """The most bytes each file of one checkpoint may legitimately take (see size_bounds)."""

    model_states: int       # mp_rank_00_model_states.pt (ZeRO 0-2; at ZeRO-0 it holds the optimizer too)
    rank_model_states: int  # zero_pp_rank_R_mp_rank_00_model_states.pt (ZeRO-3, one per rank)
    optim_partition: int    # [bf16_]zero_pp_rank_R_mp_rank_00_optim_states.pt (ZeRO 1-3, one per rank)
    meta: int               # meta.json (small and generous: the files are what a fetch must bound)
    total: int              # every file of the checkpoint, one copy of each

    def of(self, name: str) -> int:
        """The bound for one file of the checkpoint by its name; 0 for a name no checkpoint of ours has."""
        if name == META:
            return self.meta
        if name == "mp_rank_00_model_states.pt":
            return self.model_states
        if re.fullmatch(r"zero_pp_rank_[0-9]+_mp_rank_00_model_states\.pt", name):
            return self.rank_model_states
        if re.fullmatch(r"(bf16_)?zero_pp_rank_[0-9]+_mp_rank_00_optim_states\.pt", name):
            return self.optim_partition
        return 0


# Measured on our checkpoints (torch 2.13, DeepSpeed 0.19.8): the pickled non-tensor part (DeepSpeed's
# config, parameter names and shapes, our client state) is 2-6 KiB, each stored tensor adds under 300
# bytes of zip entry and pickle record, and a rank's RNG state is a 5,056-byte tensor.
FILE_OVERHEAD = 8 << 10   # bytes, plus 4 per vocabulary character (the vocab is in the client state)
TENSOR_OVERHEAD = 384     # bytes per stored tensor
RNG_BYTES = 5_200         # per rank: the CPU generator's state, and a GPU's (16 bytes)
MARGIN = 1.25             # on the whole: a checkpoint file is never larger, and one twice as large is out


def size_bounds(model: dict, world_size: int, zero_stage: int | None = None, vocab_chars: int = 256,
                precision: str = "fp32") -> SizeBounds:
    """The largest size each file of a checkpoint of this model may have, for a fetch to stop at.

    model: the `model` section of the run's config (config.yaml, or meta.json's `model_config`):
    vocab_size, n_layer, n_head, n_kv_head, d_model, block_size, bias, pos_emb, qk_norm, tie_head.
    world_size: the ranks that saved it. zero_stage: meta.json's `zero_stage` (None: the largest of
    any stage). vocab_chars: len(meta.json's `vocab`) when known. precision: the config's (meta.json's
    `precision`); bf16 at ZeRO 1-3 keeps bf16 weights in the model states.

    Every other tensor is counted at 4 bytes an element: the weights, and the optimizer's two moments
    and fp32 master copy (AdamW; Muon's one momentum is less), whole in the ZeRO-0 model states (with a
    step counter per tensor) or split over the ranks' partitions (plus up to one element of padding
    per tensor per rank). Each file adds the measured overheads above, and the total is the sum of
    every file's bound; MARGIN covers what the measurement did not see.
    """
    params, tensors = _parameters(model, vocab_chars)
    fixed = FILE_OVERHEAD + 4 * vocab_chars + RNG_BYTES * world_size
    stages = [zero_stage] if zero_stage is not None else [0, 1, 2, 3]
    per_rank = -(-params // world_size) + tensors  # a partition: its share, padded
    bounds = []
    for stage in stages:
        weight_bytes = 2 if precision == "bf16" and stage else 4  # ZeRO-0 bf16: autocast over fp32 weights
        if stage == 0:  # the optimizer is in the model states: two moments and a step per tensor
            model_states = fixed + 4 * 3 * params + TENSOR_OVERHEAD * 4 * tensors
        else:
            model_states = 0 if stage == 3 else fixed + weight_bytes * params + TENSOR_OVERHEAD * tensors
        rank_states = fixed + TENSOR_OVERHEAD * tensors if stage == 3 else 0
        optim = fixed + 4 * 3 * per_rank + TENSOR_OVERHEAD * (8 + 4 * tensors) if stage else 0
        bounds.append((int(MARGIN * model_states), int(MARGIN * rank_states), int(MARGIN * optim)))
    model_states, rank_states, optim = (max(b[i] for b in bounds) for i in range(3))
    files = 1 + 2 * world_size  # the model states (or one per rank), and one partition per rank
    # JSON: the client state's few keys, the vocab (6 bytes a character at most, escaped), a sum and a
    # size per file per node's copy (each node writes its own copy of the model states)
    meta = FILE_OVERHEAD + 6 * vocab_chars + 200 * files * world_size
    total = model_states + world_size * (rank_states + optim) + meta
    return SizeBounds(model_states, rank_states, optim, meta, total)


def _parameters(model: dict, vocab_chars: int) -> tuple[int, int]:
    """(elements, tensors) of the GPT in model/ with this config: its exact parameter count, from the
    shapes model/gpt.py and model/attention.py give each layer."""
    d, layers, heads = int(model["d_model"]), int(model["n_layer"]), int(model["n_head"])
    vocab = max(int(model.get("vocab_size") or 0), vocab_chars)
    kv_heads, bias = int(model.get("n_kv_head") or heads), bool(model.get("bias"))
    head_dim = d // heads
    norm = (2 if bias else 1, 2 if bias else 1)  # (elements per width, tensors)
    linears = [(d, heads * head_dim), (d, 2 * kv_heads * head_dim), (heads * head_dim, d), (d, 4 * d), (4 * d, d)]
    layer = sum(i * o + (o if bias else 0) for i, o in linears) + 2 * norm[0] * d
    layer_tensors = len(linears) * norm[1] + 2 * norm[1]
    if model.get("qk_norm"):
        layer, layer_tensors = layer + 2 * norm[0] * head_dim, layer_tensors + 2 * norm[1]
    top, top_tensors = vocab * d + norm[0] * d, 1 + norm[1]  # token embedding, final norm
    if model.get("pos_emb") == "learned":
        top, top_tensors = top + int(model["block_size"]) * d, top_tensors + 1
    if not model.get("tie_head", True):
        top, top_tensors = top + vocab * d, top_tensors + 1
    return layers * layer + top, layers * layer_tensors + top_tensors + 1  # + 1: the head's entry when tied
