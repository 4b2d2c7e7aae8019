"""The shard writer streams rows in the exact bytes zarr-python writes for our layout."""
from __future__ import annotations

import numpy as np
import pytest
import zarr
from zarr.codecs import Crc32cCodec

from cache.shards import ShardFile, ShardLayout, ShardWriter


def _array(root, name, dtype, row_shape, shard_rows=64, chunk_rows=16):
    g = zarr.open_group(str(root), mode="a", zarr_format=3)
    return g.create_array(name, shape=(2 * shard_rows, *row_shape), dtype=dtype, chunks=(chunk_rows, *row_shape),
                          shards=(shard_rows, *row_shape), compressors=[Crc32cCodec()], fill_value=0)


@pytest.mark.parametrize("dtype,row_shape", [(np.float16, (5, 3)), (np.float32, (7,)), (np.int32, ())])
def test_streamed_shards_are_byte_identical_to_zarr_writes(tmp_path, dtype, row_shape):
    rng = np.random.default_rng(0)
    data = (rng.random((64 + 37, *row_shape)) * 100 + 1).astype(dtype)  # a full shard, then a partial one
    ours = _array(tmp_path / "ours", "a", dtype, row_shape)
    theirs = _array(tmp_path / "zarr", "a", dtype, row_shape)
    theirs[0:64] = data[:64]
    theirs[64:101] = data[64:]
    layout = ShardLayout.from_zarr(ours, tmp_path / "ours" / "a")
    for shard, (lo, hi) in enumerate([(0, 64), (64, 101)]):
        w = ShardWriter(layout, shard)
        for a, b in [(lo, lo + 10), (lo + 10, lo + 11), (lo + 11, hi)]:  # batches across chunk borders
            w.append(data[a:b])
        w.close()
        zarr_bytes = ShardLayout.from_zarr(theirs, tmp_path / "zarr" / "a").shard_path(shard).read_bytes()
        assert layout.shard_path(shard).read_bytes() == zarr_bytes
    back = zarr.open_array(str(tmp_path / "ours" / "a"), mode="r")
    np.testing.assert_array_equal(back[:101], data)
    assert not back[101:].any()  # the padded tail reads as the fill value
    ShardFile(layout, 1).verify(list(range(3)))  # checksums of every written chunk hold


def test_an_unfinished_shard_is_invisible_and_abort_leaves_nothing(tmp_path):
    arr = _array(tmp_path, "a", np.float16, (4,))
    layout = ShardLayout.from_zarr(arr, tmp_path / "a")
    w = ShardWriter(layout, 0)
    w.append(np.ones((20, 4), np.float16))
    assert not layout.shard_path(0).exists()  # only a hidden temp file so far
    assert [p.name for p in layout.shard_path(0).parent.iterdir()] == [w.tmp.name] and w.tmp.name.startswith(".")
    assert not zarr.open_array(str(tmp_path / "a"), mode="r")[:20].any()
    w.abort()
    assert list(layout.shard_path(0).parent.iterdir()) == []


def test_the_writer_refuses_rows_it_cannot_store_as_they_are(tmp_path):
    layout = ShardLayout.from_zarr(_array(tmp_path, "a", np.float16, (4,)), tmp_path / "a")
    w = ShardWriter(layout, 0)
    with pytest.raises(ValueError, match="dtype float32"):
        w.append(np.ones((2, 4), np.float32))  # no silent cast: the fingerprint names the dtype
    with pytest.raises(ValueError, match=r"shape \(5,\)"):
        w.append(np.ones((2, 5), np.float16))
    w.append(np.ones((60, 4), np.float16))
    with pytest.raises(ValueError, match="holds 64 rows"):
        w.append(np.ones((5, 4), np.float16))
    w.abort()
