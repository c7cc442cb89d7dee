"""enwik8 and text8 as distributed: a zip holding one file of raw bytes, prepared byte for byte into
train, val and test at byte offsets, and refused whole (before anything is written) when it is not
the archive expected. The files here are small ones in the exact format (data/synthetic.py)."""
import zipfile
from pathlib import Path

import pytest

from data.archives import ARCHIVES, ArchiveError, read_archive, split_offsets
from data.config import DataConfig
from data.prepare import check_matches, prepare
from data.shards import ShardReader, load_manifest
from data.synthetic import enwik8_bytes, text8_bytes, write_archive

SIZE = 60_000
MAKE = {"enwik8": enwik8_bytes, "text8": text8_bytes}


def _config(source: str, zip_path: Path, data_dir: Path, **kw) -> DataConfig:
    cfg = DataConfig(**{"source": source, "path": str(zip_path), "dir": str(data_dir), "tokenizer": "bytes",
                        "split": [0.9, 0.05, 0.05], "expect_bytes": SIZE, **kw})
    cfg.validate()
    return cfg


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())} if folder.is_dir() else {}


def test_the_split_offsets_are_the_benchmarks_exactly_and_a_small_file_in_proportion():
    assert split_offsets(10**8, [0.9, 0.05, 0.05]) == [0, 90_000_000, 95_000_000, 100_000_000]
    assert split_offsets(SIZE, [0.9, 0.05, 0.05]) == [0, 54_000, 57_000, 60_000]
    assert split_offsets(1001, [0.9, 0.05, 0.05]) == [0, 901, 951, 1001]  # round(900.9), round(950.95)
    assert split_offsets(round(10**8 * 0.05), [0.9, 0.05, 0.05]) == [0, 4_500_000, 4_750_000, 5_000_000]
    assert all(spec.size == 10**8 for spec in ARCHIVES.values())


@pytest.mark.parametrize("source", ["enwik8", "text8"])
def test_prepare_keeps_every_byte_and_cuts_at_the_offsets(tmp_path, source):
    raw = MAKE[source](SIZE, seed=1)
    cfg = _config(source, write_archive(tmp_path / f"{source}.zip", source, raw), tmp_path / "shards",
                  frame_tokens=4096, shard_tokens=8192)  # several frames and shards a split
    manifest = prepare(cfg)
    cuts = split_offsets(SIZE, cfg.split)
    for split, lo, hi in zip(("train", "val", "test"), cuts, cuts[1:]):
        reader = ShardReader(cfg.dir, split)
        assert bytes(reader.read_all()) == raw[lo:hi]
        assert reader.tokenizer.decode(reader.read_all()) == raw[lo:hi]
    assert len(manifest["splits"]["train"]["shards"]) > 1 and manifest["vocab"] == "".join(map(chr, range(256)))
    assert manifest["tokenizer"] == {"kind": "bytes", "lowercase": False}
    assert load_manifest(cfg.dir)["source"]["cuts"] == "0 54000 57000 60000"
    if source == "enwik8":  # raw bytes beyond ASCII: multi-byte UTF-8, a 4-byte emoji
        assert max(raw) >= 0xF0 and b"<page>" in raw
    else:
        assert set(raw) == set(b"abcdefghijklmnopqrstuvwxyz ")


def test_a_fraction_uses_the_start_of_the_file_and_another_split_needs_another_data_dir(tmp_path):
    raw = enwik8_bytes(SIZE)
    archive = write_archive(tmp_path / "enwik8.zip", "enwik8", raw)
    cfg = _config("enwik8", archive, tmp_path / "shards", fraction=0.5)
    prepare(cfg)
    assert bytes(ShardReader(cfg.dir, "test").read_all()) == raw[28_500:30_000]  # 5% of the first 30,000
    check_matches(cfg)
    with pytest.raises(ValueError, match=r"cut at byte offsets 0 27000 28500 30000, but data\.split=\[0\.8, 0\.1, "
                                         r"0\.1\] and data\.fraction=0\.5 cut at 0 24000 27000 30000"):
        check_matches(_config("enwik8", archive, tmp_path / "shards", fraction=0.5, split=[0.8, 0.1, 0.1]))


def _truncated(path: Path, raw: bytes, source: str) -> Path:
    whole = write_archive(path.with_name("whole.zip"), source, raw).read_bytes()
    path.write_bytes(whole[:len(whole) // 2])
    return path


def _member_cut_short(path: Path, raw: bytes, source: str) -> Path:
    return write_archive(path, source, raw[:-1000])


def _two_files(path: Path, raw: bytes, source: str) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(source, raw)
        archive.writestr("readme.txt", b"hello")
    return path


def _flipped_byte(path: Path, raw: bytes, source: str) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr(source, raw)
    blob = bytearray(path.read_bytes())
    blob[blob.index(raw[:40]) + 20] ^= 1  # in the member's data: only its CRC32 tells
    path.write_bytes(bytes(blob))
    return path


@pytest.mark.parametrize("damage, line", [
    (_truncated, "{zip}: not a whole zip archive (File is not a zip file); expected {src}.zip as distributed "
                 "(http://mattmahoney.net/dc/{src}.zip): a zip holding one file {src} of 60,000 bytes"),
    (_member_cut_short, "{zip}: {src} is 59,000 bytes, expected {src}.zip as distributed "
                        "(http://mattmahoney.net/dc/{src}.zip): a zip holding one file {src} of 60,000 bytes "
                        "(data.expect_bytes=N reads a smaller file in this format)"),
    (_two_files, "{zip}: holds 2 file(s) ('{src}', 'readme.txt'); expected {src}.zip as distributed "
                 "(http://mattmahoney.net/dc/{src}.zip): a zip holding one file {src}"),
    (_flipped_byte, "{zip}: not a whole zip archive (Bad CRC-32 for file '{src}'); expected {src}.zip as "
                    "distributed (http://mattmahoney.net/dc/{src}.zip): a zip holding one file {src} of 60,000 bytes"),
], ids=["truncated zip", "member cut short", "two files", "flipped byte"])
@pytest.mark.parametrize("source", ["enwik8", "text8"])
def test_a_damaged_archive_is_refused_in_one_line_and_the_prepared_data_is_kept(tmp_path, source, damage, line):
    """A data dir already prepared from the good archive: preparing again from a bad one is refused
    before anything is written, and every file of the data dir is as it was."""
    raw = MAKE[source](SIZE)
    cfg = _config(source, write_archive(tmp_path / "good.zip", source, raw), tmp_path / "shards")
    prepare(cfg)
    before = _files(tmp_path / "shards")
    bad = damage(tmp_path / f"{source}.zip", raw, source)
    with pytest.raises(ArchiveError) as refused:
        prepare(_config(source, bad, tmp_path / "shards"))
    assert str(refused.value) == line.format(zip=bad, src=source)
    assert _files(tmp_path / "shards") == before
    assert bytes(ShardReader(cfg.dir, "test").read_all()) == raw[57_000:]


def test_the_wrong_archive_or_size_or_alphabet_is_named(tmp_path):
    enwik8 = write_archive(tmp_path / "enwik8.zip", "enwik8", enwik8_bytes(SIZE))
    with pytest.raises(ArchiveError, match=r"enwik8\.zip: holds 1 file\(s\) \('enwik8'\); expected text8\.zip"):
        read_archive(enwik8, "text8", SIZE)
    with pytest.raises(ArchiveError, match=r"enwik8\.zip: enwik8 is 60,000 bytes, expected enwik8\.zip as distributed "
                                           r"\(http://mattmahoney\.net/dc/enwik8\.zip\): a zip holding one file enwik8 "
                                           r"of 100,000,000 bytes"):
        read_archive(enwik8, "enwik8")  # by default, the distributed size
    capital = write_archive(tmp_path / "text8.zip", "text8", text8_bytes(SIZE)[:-6] + b" Paris")
    with pytest.raises(ArchiveError, match=r"text8\.zip: text8 holds byte b'P' at offset 59,995; expected text8\.zip "
                                           r"as distributed .* of only a-z and space$"):
        read_archive(capital, "text8", SIZE)
    with pytest.raises(ArchiveError, match=r"nowhere\.zip: no such file; expected enwik8\.zip as distributed"):
        read_archive(tmp_path / "nowhere.zip", "enwik8", SIZE)
    assert not (tmp_path / "shards").exists()


@pytest.mark.parametrize("change, line", [
    ({"tokenizer": "char"}, "data.source=enwik8 is modelled as raw bytes: set data.tokenizer=bytes"),
    ({"split": [0.9, 0.1]}, "data.split=[0.9, 0.1]: three shares (train, val, test), each > 0, summing to 1 "
                            "(the benchmarks: [0.9, 0.05, 0.05])"),
    ({"split": [0.9, 0.1, 0.0]}, "data.split=[0.9, 0.1, 0.0]: three shares (train, val, test), each > 0, summing "
                                 "to 1 (the benchmarks: [0.9, 0.05, 0.05])"),
    ({"fraction": 0.0}, "data.fraction must be in (0, 1], got 0.0"),
    ({"source": "text", "path": "book.txt"}, "data.split applies to data.source=enwik8 or text8 only (this run: "
                                             "data.source=text)"),
])
def test_byte_offset_settings_are_checked_naming_the_key(change, line):
    cfg = DataConfig(**{"source": "enwik8", "path": "enwik8.zip", "tokenizer": "bytes",
                        "split": [0.9, 0.05, 0.05], **change})
    with pytest.raises(ValueError) as bad:
        cfg.validate()
    assert str(bad.value) == line
