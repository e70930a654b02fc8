"""The shard format: member layout and headers, clip json validation, index.json, tolerant reading."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import replace

import pytest
import torch
from torchvision.io import encode_jpeg

from dulearn import synthetic
from dulearn.shard_format import (FORMAT, ClipMeta, ShardEntry, ShardFormatError, ShardIndex, check_sample,
                                  count_samples, iter_samples, open_shard_writer, read_index, sample_frames,
                                  json_data_offset, member_offsets, sample_key, scan_samples, shard_url,
                                  skipped_input, write_index, write_sample)

# sha256 of _shard([b"a", b"bc", b"def"], 2) since the clip json lists its frames' sizes (frame_bytes)
PINNED_SHA256 = "dcc55ccdb1cec387b8342ccccd9d4914f71b826f39b59e7a4d7452b729014bdd"


def _meta(n: int, clip: int = 0, **extras) -> ClipMeta:
    return ClipMeta("synth-0-0000", "synthetic", clip, tuple(range(10 * clip, 10 * clip + n)), 24.0, (48, 64),
                    (48, 64), extras)


def _shard(frames: list[bytes], clips: int, **extras) -> bytes:
    """A shard of `clips` clips of video 3, each holding `frames`."""
    buf = io.BytesIO()
    with open_shard_writer(buf) as tar:
        for c in range(clips):
            write_sample(tar, sample_key(3, c), _meta(len(frames), c, **extras), frames)
    return buf.getvalue()


@pytest.fixture(scope="module")
def jpegs() -> list[bytes]:
    """Four real JPEG frames of a synthetic video."""
    video = synthetic.make_video(0, 0, frames=4, size=(48, 64))
    return [encode_jpeg(torch.from_numpy(f).permute(2, 0, 1).contiguous(), quality=90).numpy().tobytes()
            for f in video.frames]


def test_members_headers_and_bytes_are_fixed(tmp_path, jpegs):
    path = tmp_path / "s.tar"
    path.write_bytes(_shard(jpegs, 2, label="zumba"))
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == [f"v00000003_c{c:04d}.{ext}" for c in range(2)
                                         for ext in ("json", "0000.jpg", "0001.jpg", "0002.jpg", "0003.jpg")]
    assert {(m.mtime, m.mode, m.uid, m.gid, m.uname, m.gname) for m in members} == {(0, 0o644, 0, 0, "", "")}
    assert hashlib.sha256(_shard([b"a", b"bc", b"def"], 2)).hexdigest() == PINNED_SHA256
    samples = list(iter_samples(str(path)))
    assert [k for k, _ in samples] == ["v00000003_c0000", "v00000003_c0001"] == [sample_key(3, c) for c in range(2)]
    assert count_samples(str(path)) == 2 and count_samples(f"pipe:cat {path}") == 2
    meta = check_sample(samples[1][1])
    assert meta == replace(_meta(4, 1, label="zumba"), frame_bytes=tuple(len(j) for j in jpegs))
    assert meta.extras == {"label": "zumba"}
    assert json.loads(samples[1][1]["json"]) == {"video_id": "synth-0-0000", "dataset": "synthetic", "clip": 1,
                                                 "num_frames": 4, "frame_indices": [10, 11, 12, 13], "fps": 24.0,
                                                 "orig_size": [48, 64], "size": [48, 64], "label": "zumba",
                                                 "frame_bytes": [len(j) for j in jpegs]}
    assert sample_frames(samples[0][1]) == jpegs
    # the json and frame_bytes locate every member without reading the tar's headers
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    json_member, frames = members[5], members[6:10]
    located = member_offsets(json_member.offset, json_member.size, meta.frame_bytes)
    assert located == [m.offset_data for m in frames] and json_data_offset(json_member.offset) == json_member.offset_data
    scanned = scan_samples(str(path))
    assert scanned.video == [3, 3] and scanned.offset[1] == json_member.offset and scanned.frames == [4, 4]
    assert scanned.frame_data[1] == [(m.offset_data, m.size) for m in frames]


def test_a_truncated_shard_yields_its_complete_samples_then_stops(tmp_path, jpegs):
    data = _shard(jpegs, 3)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        last = tar.getmembers()[-1]  # the last clip's last frame
    path = tmp_path / "cut.tar"
    path.write_bytes(data[: last.offset_data + last.size // 2])
    samples = list(iter_samples(str(path)))
    assert len(samples) == 3
    assert all(sample_frames(s) == jpegs for _, s in samples[:2])
    assert sample_frames(samples[2][1]) is None  # a frame is missing: the stream skips the clip
    with pytest.raises(ShardFormatError, match="json says 4 frames, found"):
        check_sample(samples[2][1])
    path.write_bytes(b"not a tar at all" * 100)
    assert list(iter_samples(str(path))) == []


def test_sample_frames_is_lenient_and_check_sample_strict(jpegs):
    base = {"json": _meta(2).to_json(), "0000.jpg": jpegs[0], "0001.jpg": jpegs[1]}
    assert sample_frames({"0000.jpg": jpegs[0], "0001.jpg": jpegs[1]}) == jpegs[:2]  # no json: count the frames
    assert sample_frames({"json": b'{"num_frames": 2}', "0000.jpg": jpegs[0], "0001.jpg": jpegs[1]}) == jpegs[:2]
    assert sample_frames({**base, "json": b"{not json"}) is None
    with pytest.raises(ShardFormatError, match="missing clip, dataset"):
        check_sample({**base, "json": b'{"num_frames": 2}'})
    with pytest.raises(ShardFormatError, match="not JSON"):
        check_sample({**base, "json": b"{not json"})
    with pytest.raises(ShardFormatError, match="no json member"):
        check_sample({"0000.jpg": jpegs[0]})
    with pytest.raises(ShardFormatError, match="in order"):
        check_sample({"0000.jpg": jpegs[0], "json": base["json"], "0001.jpg": jpegs[1]})


@pytest.mark.parametrize("change,message", [
    ({"num_frames": 3}, "num_frames 3 but 2 frame_indices"),
    ({"fps": "24"}, "fps must be a number or null"),
    ({"size": [48]}, "size must be 2 non-negative integers"),
    ({"frame_indices": [0, -1], "num_frames": 2}, "frame_indices must be a list"),
    ({"video_id": 7}, "video_id must be a string"),
    ({"clip": True}, "clip must be a non-negative integer"),
])
def test_clip_json_validation_names_the_field(change, message):
    raw = {**json.loads(_meta(2).to_json()), **change}
    with pytest.raises(ShardFormatError, match=message):
        ClipMeta.from_json(json.dumps(raw).encode())
    with pytest.raises(ShardFormatError, match="clip json: expected an object"):
        ClipMeta.from_json(b"[1, 2]")
    with pytest.raises(ShardFormatError, match=r"source fields \['fps'\] would overwrite"):
        _meta(2, fps=30.0)
    assert ClipMeta.from_json(_meta(2, label="x").to_json()) == _meta(2, label="x")


def test_index_round_trip_and_errors(tmp_path):
    index = ShardIndex([ShardEntry("a-000000.tar", 3, 90, 2, 10240), ShardEntry("a-000001.tar", 1, 40, 1, 5120)],
                       "frames", "/data", {"short_side": 64}, [skipped_input("/data/x", "x", "no frames")])
    path = tmp_path / "index.json"
    write_index(path, index)
    text = path.read_text()
    raw = json.loads(text)
    assert text == json.dumps(raw, indent=1, sort_keys=True) + "\n" and not list(tmp_path.glob(".*"))
    assert raw["format"] == FORMAT and raw["totals"] == {"clips": 4, "frames": 130, "videos": 3, "bytes": 15360,
                                                         "shards": 2, "skipped": 1}
    assert raw["skipped"] == [{"input": "/data/x", "video_id": "x", "reason": "no frames", "clips_kept": 0}]
    assert read_index(path) == index
    # a hand-written index of remote shards needs only names and clip counts
    (tmp_path / "remote.json").write_text('{"shards": [{"name": "pipe:cat a.tar", "clips": 3}, {"name": "b.tar", "clips": 2}]}')
    remote = read_index(tmp_path / "remote.json")
    assert [shard_url(tmp_path / "remote.json", s.name) for s in remote.shards] == ["pipe:cat a.tar",
                                                                                     str(tmp_path / "b.tar")]
    for text, message in [("{}", "no 'shards' list"), ("not json", "not JSON"),
                          ('{"format": "other/2", "shards": []}', "format 'other/2'"),
                          ('{"shards": [{"name": "a.tar"}]}', "needs a name and a clip count"),
                          ('{"shards": [{"name": "a.tar", "clips": 1, "frames": -1}]}', "frames must be")]:
        (tmp_path / "bad.json").write_text(text)
        with pytest.raises(ShardFormatError, match=message) as info:
            read_index(tmp_path / "bad.json")
        assert str(tmp_path / "bad.json") in str(info.value)


def test_write_sample_refuses_a_frame_count_other_than_the_json(jpegs):
    with open_shard_writer(io.BytesIO()) as tar, pytest.raises(ValueError, match="3 frames for a json of 2"):
        write_sample(tar, sample_key(0, 0), _meta(2), jpegs[:3])
