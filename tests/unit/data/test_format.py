"""`format.check_content`: a dataset's token files against meta.json at every training start,
hashed once per file version and cached."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from dsfm.data.format import VERIFIED_FILE, bin_path, check_content, read_meta
from dsfm.data.prepare import prepare


@pytest.fixture
def data(tmp_path):
    text = tmp_path / "a.txt"
    text.write_text("".join(f"document {i}: some words\n\n" for i in range(400)))
    out = tmp_path / "data"
    prepare(
        [str(text)],
        out,
        tokenizer="byte",
        doc_separator="\n\n",
        max_shard_bytes=4000,
        progress=False,
    )
    return out


def overwrite(path, offset: int, ids: list[int]) -> None:
    """Damage in place, size unchanged. File times tick with the kernel's clock (a few ms),
    so wait one tick: a write in the same tick as the check before it is not seen."""
    time.sleep(0.02)
    with open(path, "r+b") as f:
        f.seek(offset * 2)  # uint16 ids
        f.write(np.array(ids, dtype=np.uint16).tobytes())


def test_prepared_data_is_verified_once_then_only_stat(data):
    meta = read_meta(data)
    size = sum(bin_path(data, s["name"]).stat().st_size for s in meta["splits"]["train"]["shards"])
    assert len(meta["splits"]["train"]["shards"]) > 1
    assert check_content(data, meta) == 0  # prepare recorded the hashes it streamed
    os.remove(data / VERIFIED_FILE)  # a dataset from before the cache: hashed once
    assert check_content(data, meta) >= size
    assert check_content(data, meta) == 0


def test_out_of_vocabulary_id_names_file_and_offset(data):
    meta = read_meta(data)
    shard = meta["splits"]["train"]["shards"][1]["name"]
    overwrite(bin_path(data, shard), 37, [65535])
    with pytest.raises(ValueError) as e:
        check_content(data, meta, say=pytest.fail)
    text = str(e.value)
    assert f"{bin_path(data, shard)}: token id 65535 at token offset 37 is outside" in text
    assert f"dsfm data verify {data}" in text and "dsfm prepare" in text


def test_in_vocabulary_damage_of_the_same_size_is_caught(data):
    meta = read_meta(data)
    path = bin_path(data, meta["splits"]["train"]["shards"][0]["name"])
    ids = np.fromfile(path, dtype=np.uint16)
    overwrite(path, 5, [(int(ids[5]) + 1) % 256])
    with pytest.raises(ValueError, match="sha256 differs from meta.json: the file changed"):
        check_content(data, meta)
    overwrite(path, 5, [int(ids[5])])  # put back: verified again, and fine
    assert check_content(data, meta) > 0


def test_a_cache_that_cannot_be_written_means_hashing_each_time_and_says_so(data):
    """As in a read-only shared copy (root ignores chmod, so the cache's name is taken by a
    directory here: the same failed write)."""
    os.remove(data / VERIFIED_FILE)
    (data / VERIFIED_FILE).mkdir()
    for _ in range(2):
        said: list[str] = []
        assert check_content(data, read_meta(data), say=said.append) > 0
        assert len(said) == 1 and "not writable" in said[0]


def test_a_shard_without_a_hash_gets_its_ids_checked_once(data):
    """meta.json written by hand, without shard hashes: the id range, cached the same way."""
    meta = read_meta(data)
    for shard in meta["splits"]["train"]["shards"]:
        del shard["sha256"]
    assert check_content(data, meta) > 0 and check_content(data, meta) == 0
    shard = meta["splits"]["train"]["shards"][0]["name"]
    overwrite(bin_path(data, shard), 3, [4000])
    with pytest.raises(ValueError, match="token id 4000 at token offset 3 is outside"):
        check_content(data, meta)
