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


def _rewrite_manifest(data_dir, change) -> None:
    manifest = json.loads((data_dir / "manifest.json").read_text())
    change(manifest)
    (data_dir / "manifest.json").write_text(json.dumps(manifest))


def test_a_shard_name_reaching_outside_the_data_dir_is_refused_naming_file_field_and_value(tmp_path):
    data_dir = tmp_path / "data"
    _write(data_dir)
    (tmp_path / "secret").write_bytes(b"x" * 1234)
    for name in ("../secret", str(tmp_path / "secret"), "train_00001.zst"):
        _rewrite_manifest(data_dir, lambda m: m["splits"]["train"]["shards"][0].update(file=name))
        with pytest.raises(ShardError) as caught:
            ShardReader(data_dir, "train")
        shown = repr(name) if len(repr(name)) <= 80 else repr(name)[:77] + "..."  # long values are cut
        assert str(caught.value).startswith(f"{data_dir / 'manifest.json'}: splits.train.shards[0].file = {shown}")
        assert "1234" not in str(caught.value)  # nothing about the file it names leaks


def test_frames_claiming_more_tokens_than_a_frame_holds_are_refused_before_any_allocation(tmp_path):
    _write(tmp_path)

    def lie(manifest):  # a consistent lie: the frame, its shard and the split all claim 10**15 tokens
        shard = manifest["splits"]["train"]["shards"][0]
        extra = 10 ** 15 - shard["frames"][0][2]
        shard["frames"][0][2] += extra
        shard["tokens"] += extra
        manifest["splits"]["train"]["tokens"] += extra

    _rewrite_manifest(tmp_path, lie)
    with pytest.raises(ShardError, match=r"splits\.train\.shards\[0\]\.frames\[0\] = \[0, \d+, 1000000000000000, "
                                         r"\d+\], expected 0 < tokens <= frame_tokens=256"):
        load_manifest(tmp_path)


def test_a_frame_whose_header_declares_other_than_the_manifest_says_is_named(tmp_path):
    """The last frame of a split may be short: claiming fewer tokens than its zstd header declares passes
    the manifest's checks, and is refused by verify() and by the read, before decompressing."""
    manifest, _ = _write(tmp_path)
    last = manifest["splits"]["val"]["shards"][-1]
    claimed = last["frames"][-1][2] - 1

    def lie(manifest):
        shard = manifest["splits"]["val"]["shards"][-1]
        shard["frames"][-1][2] -= 1
        shard["tokens"] -= 1
        manifest["splits"]["val"]["tokens"] -= 1

    _rewrite_manifest(tmp_path, lie)
    reader = ShardReader(tmp_path, "val")
    message = (f"{last['file']}: frame at byte {last['frames'][-1][0]} declares {claimed + 1} tokens, "
               f"the manifest {claimed}")
    with pytest.raises(ShardError, match=message):
        reader.verify()
    with pytest.raises(ShardError, match=message):
        reader.read_frame(len(reader.frames) - 1)


def test_a_shard_that_is_a_link_is_not_followed(tmp_path):
    manifest, _ = _write(tmp_path / "data")
    first = tmp_path / "data" / manifest["splits"]["train"]["shards"][0]["file"]
    (tmp_path / "elsewhere.zst").write_bytes(first.read_bytes())
    first.unlink()
    first.symlink_to(tmp_path / "elsewhere.zst")
    with pytest.raises(ShardError, match=f"{first.name}: not a regular file"):
        ShardReader(tmp_path / "data", "train")


def test_a_manifest_that_is_a_link_is_not_followed(tmp_path):
    _write(tmp_path / "data")
    manifest = tmp_path / "data" / "manifest.json"
    manifest.rename(tmp_path / "elsewhere.json")
    manifest.symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(ShardError, match="manifest.json: not a regular file"):
        ShardReader(tmp_path / "data", "train")


def test_a_split_left_empty_is_reported_by_prepare_naming_val_fraction(tmp_path):
    with pytest.raises(ShardError, match=r"the val split is empty: none of the 12 documents went to val at "
                                         r"data\.val_fraction=0\.0; raise data\.val_fraction \(e\.g\. "
                                         r"data\.val_fraction=0\.2\)"):
        _write(tmp_path / "a", val_fraction=0.0)
    assert list((tmp_path / "a").iterdir()) == []  # no manifest, no shards, no state
    with pytest.raises(ShardError, match=r"the train split is empty: all 1 documents went to val at "
                                         r"data\.val_fraction=0\.9; lower data\.val_fraction"):
        _write(tmp_path / "b", [Document("short", "ab")], val_fraction=0.9)


def test_a_frame_holding_ids_beyond_the_vocabulary_is_refused_when_read(tmp_path):
    """A manifest consistent with its shards (sizes, crc32, sha256) whose frame holds id 200 of a
    69-character vocabulary: the read refuses it (the id would index past the model's embedding)."""
    import hashlib
    import zlib

    import zstandard

    manifest, tok = _write(tmp_path)
    shard = manifest["splits"]["train"]["shards"][0]
    path = tmp_path / shard["file"]
    blobs = [path.read_bytes()[offset:offset + nbytes] for offset, nbytes, _, _ in shard["frames"]]
    blobs[1] = zstandard.ZstdCompressor().compress(bytes([200]) * shard["frames"][1][2])
    offsets = np.cumsum([0] + [len(b) for b in blobs]).tolist()
    path.write_bytes(b"".join(blobs))

    def rewrite(m):
        m["splits"]["train"]["shards"][0].update(
            bytes=offsets[-1], sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
            frames=[[offsets[i], len(b), f[2], zlib.crc32(b)] for i, (b, f) in enumerate(zip(blobs, shard["frames"]))])

    _rewrite_manifest(tmp_path, rewrite)
    reader = ShardReader(tmp_path, "train")
    reader.verify()  # consistent: only the ids tell
    assert reader.read_frame(0) is not None
    with pytest.raises(ShardError, match=f"{shard['file']}: frame at byte {offsets[1]} holds token id 200, beyond "
                                         f"the vocabulary of {tok.vocab_size}"):
        reader.read_frame(1)


@pytest.mark.processes
def test_prepare_reports_what_normalization_changed_and_refuses_a_split_too_small(tmp_path):
    """launch/prepare.py says how many non-ASCII characters it transliterated or dropped, and a text
    too small for the preset's context and batch is refused at once, naming the minimum."""
    import subprocess
    import sys

    from helpers import ROOT, subprocess_env

    text = tmp_path / "small.txt"
    text.write_text("Straße café 東京\u200b, " * 160)  # 3.7 KB once normalized: enough for train, not for val
    proc = subprocess.run([sys.executable, "launch/prepare.py", "data=text", f"data.path={text}",
                           f"data.dir={tmp_path / 'shards'}"], cwd=ROOT, env=subprocess_env(), capture_output=True,
                          text=True)
    assert "normalized to ASCII: 640 non-ASCII characters transliterated (e.g. 'ß'->'ss', 'é'->'e', " \
           "'東'->'dong', '京'->'jing'), 160 dropped (e.g. '\\u200b')" in proc.stdout
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: data.dir={tmp_path / 'shards'}: the val split gives 4 windows of model.block_size+1=65 tokens; "
        "conf=baby needs 12 (train.micro_batch x ranks): at least 844 characters in val, about 8.4 KB of text at "
        "data.val_fraction=0.1 (or lower train.micro_batch or model.block_size)")


def test_a_test_split_is_asked_of_a_data_dir_without_one(tmp_path):
    """Only enwik8 and text8 prepare a test split: elsewhere `eval.py split=test` says so in one line."""
    _write(tmp_path)
    with pytest.raises(ShardError) as missing:
        ShardReader(tmp_path, "test")
    assert str(missing.value) == (f"{tmp_path / 'manifest.json'}: has no test split, only train and val (the "
                                  "enwik8 and text8 presets prepare a test split)")
    with pytest.raises(ShardError, match=r"has no split 'dev' \(choose train, val, test\)"):
        ShardReader(tmp_path, "dev")
