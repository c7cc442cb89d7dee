"""Reads the records of a wandb offline run (its run-ID.wandb file) with wandb's own protobuf schema.

wandb 0.31 writes the file from its Go core and ships no Python reader for it any more, so this
walks the file's framing (a 7-byte `:W&B` header, then LevelDB-log records in 32 KiB blocks) and
hands each record to `wandb.proto.wandb_internal_pb2.Record`: what is checked is the file wandb
wrote, decoded by wandb's own message definitions.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK, HEADER = 32768, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a wandb run file"
    out, pos, pending = [], HEADER, b""
    while pos + HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < HEADER:  # a block's zero-padded tail
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        payload = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind == 0 and length == 0:
            continue
        pending = payload if kind in (FULL, FIRST) else pending + payload
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
    return out


def history(path: Path) -> dict[int, dict]:
    """step -> {key: value} of every history record."""
    rows = {}
    for r in records(path):
        if r.WhichOneof("record_type") == "history":
            row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
            rows[row["_step"]] = row
    return rows


def config(path: Path) -> dict:
    """The run's config as logged (the run record's, then every update)."""
    out = {}
    for r in records(path):
        kind = r.WhichOneof("record_type")
        items = r.run.config.update if kind == "run" else r.config.update if kind == "config" else []
        for i in items:
            out[i.key or "/".join(i.nested_key)] = json.loads(i.value_json)
    return out
