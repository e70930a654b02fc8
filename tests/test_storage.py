"""Shards on real servers: http.server and SeaweedFS's S3 stream the same batches as local disk;
byte-range reads join nearby ranges; failures are one-line errors naming the URL."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dulearn import storage
from dulearn.data import build_train_loader
from servers import http_server, s3_env, seaweedfs, stop, upload
from synthetic_data import synthetic_shards

KW = dict(batch_size=4, clip_len=5, frame_gap=2, short_side=40, crop=32, seed=1)


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    """12 synthetic videos of 16 frames in clips of 8, shards of 8 clips, in ROOT/shards."""
    return synthetic_shards(tmp_path_factory.mktemp("remote") / "shards", "seed=6,videos=12,frames=16,size=40x56,"
                            "objects=1", 8, 8)


def _take(source: str, n: int = 5, workers: int = 0) -> list[dict]:
    return [b for _, b in zip(range(n), build_train_loader(source, num_workers=workers, **KW))]


def _equal(a: list[dict], b: list[dict]) -> bool:
    return all(x["step"] == y["step"] and x["clips"] == y["clips"] and torch.equal(x["frames"], y["frames"])
               for x, y in zip(a, b, strict=True))


def test_http_streaming_equals_local(small):
    ref = _take(str(small / "index.json"))
    with http_server(small.parent) as (url, _):
        got = _take(f"{url}/shards/index.json")
        assert _equal(got, ref)
        # http.server ignores Range: the bytes up to each range are read too, and counted
        assert sum(b["read_bytes"] for b in got) > 10 * sum(b["read_bytes"] for b in ref)
        assert _equal(_take(f"{url}/shards/index.json", workers=2), ref)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_s3_streaming_equals_local(small, tmp_path, monkeypatch):
    ref = _take(str(small / "index.json"))
    with seaweedfs(tmp_path / "weed") as (endpoint, _):
        prefix = upload(endpoint, small, "kinetics/shards")
        for key, value in s3_env(endpoint).items():
            monkeypatch.setenv(key, value)
        monkeypatch.setitem(storage._s3, "pid", None)  # a client for this endpoint
        assert _equal(_take(f"{prefix}/index.json"), ref)
        assert _equal(_take(f"{prefix}/index.json", workers=2), ref)
        got = _take(f"{prefix}/index.json", n=3)
        assert all(b["read_requests"] <= 3 * KW["batch_size"] for b in got)  # json (2 across clips) + frames per clip


def test_read_ranges_joins_nearby_ranges_and_reads_short_past_the_end(tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(bytes(range(256)) * 64)  # 16 KiB
    before = storage.STATS.requests
    got = storage.read_ranges(str(path), [(10, 5), (100, 3), (9000, 4), (16380, 10)])
    assert got == [bytes(range(10, 15)), bytes(range(100, 103)), bytes((9000 + i) % 256 for i in range(4)),
                   bytes((16380 + i) % 256 for i in range(4))]  # the last one comes back short
    assert storage.STATS.requests - before == 3  # 10 and 100 are closer than LOCAL_GAP: one read


def test_failures_are_one_line_errors_naming_the_url(small, monkeypatch):
    monkeypatch.setattr(storage, "BACKOFF_S", 0.01)
    with http_server(small.parent) as (url, proc):
        with pytest.raises(storage.StorageError) as missing:
            storage.read_all(f"{url}/shards/nothing.tar")
        assert missing.value.missing and "nothing.tar" in str(missing.value) and "\n" not in str(missing.value)
        assert not storage.exists(f"{url}/shards/nothing.tar") and storage.exists(f"{url}/shards/index.json")
        stop(proc)
        with pytest.raises(storage.StorageError, match=f"cannot read {url}/shards/index.json after "
                                                       f"{storage.RETRIES} attempts: URLError") as down:
            storage.read_all(f"{url}/shards/index.json")
        assert not down.value.missing and "\n" not in str(down.value)
    with pytest.raises(FileNotFoundError, match="shard index not found"):
        build_train_loader(str(small / "no-index.json"), **KW)
