import json
import random

import numpy as np
import pytest

from data.prepare import write_shards
from data.shards import ShardError, ShardReader, load_manifest
from data.sources import Document
from data.tokenizer import CharTokenizer


def _corpus(n_docs=12, seed=0):
    rng = random.Random(seed)
    words = ["thou", "art", "king", "night", "speak", "o", "my", "lord", "be", "not"]
    return [Document(f"doc{i}", " ".join(rng.choice(words) for _ in range(rng.randint(50, 400))) + ".\n")
            for i in range(n_docs)]


def _write(tmp_path, docs=None, **kw):
    tok = CharTokenizer()
    kw.setdefault("frame_tokens", 256)
    kw.setdefault("shard_frames", 4)
    return write_shards(docs or _corpus(), tmp_path, tok, **kw), tok


def test_round_trip_and_document_split(tmp_path):
    docs = _corpus()
    manifest, tok = _write(tmp_path, docs, val_fraction=0.25)
    val_names = set(manifest["val_documents"])
    assert len(val_names) == 3
    for split, names in (("train", [d for d in docs if d.name not in val_names]),
                         ("val", [d for d in docs if d.name in val_names])):
        expected = "".join(tok.normalize(d.text).strip("\n") + "\n\n" for d in names)
        reader = ShardReader(tmp_path, split)
        assert tok.decode(reader.read_all()) == expected
        assert manifest["splits"][split]["documents"] == len(names)
    assert len(manifest["splits"]["train"]["shards"]) > 1  # several shards of 4 frames each
    assert manifest["vocab"] == tok.vocab


def test_any_window_is_read_through_one_frame(tmp_path):
    _write(tmp_path)
    reader = ShardReader(tmp_path, "train")
    everything = reader.read_all()
    starts = np.cumsum([0] + [f.tokens for f in reader.frames])
    rng = random.Random(1)
    for _ in range(50):
        frame = rng.randrange(len(reader.frames))
        lo = rng.randrange(reader.frames[frame].tokens - 20)
        fresh = ShardReader(tmp_path, "train")
        window = fresh.read_frame(frame)[lo:lo + 20]
        assert bytes(window) == bytes(everything[starts[frame] + lo:starts[frame] + lo + 20])


def test_single_document_is_split_by_position(tmp_path):
    text = "".join(f"line {i}\n" for i in range(1000))
    manifest, tok = _write(tmp_path, [Document("only", text)], val_fraction=0.1)
    val = tok.decode(ShardReader(tmp_path, "val").read_all())
    train = tok.decode(ShardReader(tmp_path, "train").read_all())
    assert train + val == text.strip("\n") + "\n\n"
    assert 0.08 < len(val) / len(text) < 0.12


def test_checksum_detects_a_changed_byte(tmp_path):
    manifest, _ = _write(tmp_path)
    shard = manifest["splits"]["train"]["shards"][0]
    path = tmp_path / shard["file"]
    ShardReader(tmp_path, "train").verify()
    blob = bytearray(path.read_bytes())
    offset = shard["frames"][1][0] + 7
    blob[offset] ^= 0x01
    path.write_bytes(bytes(blob))
    with pytest.raises(ShardError, match=f"{shard['file']}: sha256"):
        ShardReader(tmp_path, "train").verify()
    with pytest.raises(ShardError, match="checksum"):
        ShardReader(tmp_path, "train").read_frame(1)
    assert ShardReader(tmp_path, "train").read_frame(0) is not None  # other frames still readable


def test_truncated_and_missing_shards_and_manifest_are_named(tmp_path):
    manifest, _ = _write(tmp_path)
    first = tmp_path / manifest["splits"]["train"]["shards"][0]["file"]
    first.write_bytes(first.read_bytes()[:-5])
    with pytest.raises(ShardError, match=f"{first.name}: size .*truncated"):
        ShardReader(tmp_path, "train")
    first.unlink()
    with pytest.raises(ShardError, match=f"{first.name}: shard listed in the manifest is missing"):
        ShardReader(tmp_path, "train")
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(ShardError, match="no manifest"):
        load_manifest(tmp_path)


def test_empty_corpus_is_an_error(tmp_path):
    with pytest.raises(ShardError, match="empty corpus"):
        _write(tmp_path, [Document("a", "  \n")])


def test_manifest_is_plain_json_with_frame_table(tmp_path):
    _write(tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    shard = manifest["splits"]["train"]["shards"][0]
    assert sum(f[2] for f in shard["frames"]) == shard["tokens"]
    assert shard["frames"][-1][0] + shard["frames"][-1][1] == shard["bytes"]
