"""Shard builder on H.264 video and JPEG frame folders (synthetic): counts, fidelity, determinism,
resume after a kill, verify."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from dulearn.shard_format import iter_samples, parse_samples, read_index, video_of_key
from shards.build import main as build_main
from shards.verify import verify
from dulearn.synthetic import write_mp4
from synthetic_data import VIDEO_SIZE, write_frame_folders, write_jpegs

ROOT = Path(__file__).resolve().parents[1]
VIDEOS = ["synth-2-0000.mp4", "synth-2-0001.mp4", "synth-2-0004.mp4", "synth-2-0006.mp4"]  # 82, 75, 91, 70 frames
SHORT = 96


def _build(kind: str, root: Path, out: Path, *extra: str) -> dict:
    assert build_main([kind, str(root), "--out", str(out), "--short-side", str(SHORT), *extra]) == 0
    return json.loads((out / "index.json").read_text())


def _tars(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * np.log10(255.0 ** 2 / mse)


def _decoded(jpg: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(jpg)).convert("RGB"))


@pytest.fixture(scope="module")
def video_list(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("lists") / "videos.txt"
    path.write_text("\n".join(VIDEOS) + "\n")
    return path


@pytest.fixture(scope="module")
def mp4_build(tmp_path_factory, video_folder, video_list) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("mp4") / "shards"
    return out, _build("videos", video_folder, out, "--file-list", str(video_list), "--shard-clips", "2",
                       "--clip-len", "30", "--workers", "1")


def test_mp4_counts_match_a_direct_decode(mp4_build, video_folder):
    out, index = mp4_build
    frames = {}
    for name in VIDEOS:
        with av.open(str(video_folder / name)) as c:
            frames[name] = sum(1 for _ in c.decode(video=0))
    assert index["totals"]["videos"] == len(VIDEOS) and index["skipped"] == []
    assert index["totals"]["frames"] == sum(frames.values())  # clips cover every frame
    assert index["totals"]["clips"] == sum(max(1, n // 30) for n in frames.values())
    assert [s["name"] for s in index["shards"]] == [f"videos-{i:06d}.tar" for i in range(len(index["shards"]))]
    seen = {}
    for shard in index["shards"]:
        samples = list(iter_samples(str(out / shard["name"])))
        assert len(samples) == shard["clips"]
        for key, sample in samples:
            assert "." not in key
            meta = json.loads(sample["json"])
            assert meta["dataset"] == "videos" and meta["fps"] == pytest.approx(24.0)
            h, w = VIDEO_SIZE
            assert meta["orig_size"] == [h, w] and meta["size"] == [SHORT, round(w * SHORT / h)]
            assert len([k for k in sample if k.endswith(".jpg")]) == meta["num_frames"] >= 10
            seen.setdefault(meta["video_id"], []).extend(meta["frame_indices"])
    assert {k: sorted(v) for k, v in seen.items()} == {Path(n).stem: list(range(frames[n])) for n in VIDEOS}


def test_mp4_frames_match_source_psnr(tmp_path, large_video):
    """At the default short side (320) and JPEG quality (90), from a 360x640 H.264 video."""
    (tmp_path / "videos").mkdir()
    write_mp4(tmp_path / "videos" / "large.mp4", large_video.frames)
    out = tmp_path / "shards"
    assert build_main(["videos", str(tmp_path / "videos"), "--out", str(out), "--workers", "1"]) == 0
    key, sample = next(iter_samples(str(out / "videos-000000.tar")))
    meta = json.loads(sample["json"])
    with av.open(str(tmp_path / "videos" / "large.mp4")) as c:
        source = [f.to_image() for f in c.decode(video=0)]
    h, w = meta["size"]
    assert (h, w) == (320, 569)
    for pos in (0, meta["num_frames"] // 2, meta["num_frames"] - 1):
        ref = np.asarray(source[meta["frame_indices"][pos]].resize((w, h), Image.BILINEAR))
        assert _psnr(_decoded(sample[f"{pos:04d}.jpg"]), ref) > 35.0


def test_frame_folders_counts_and_psnr(tmp_path, frame_folders, large_video):
    root = frame_folders
    index = _build("frames", root, tmp_path / "all", "--clip-len", "40", "--shard-size", "600KB", "--workers", "1")
    counts = {d.name: len(list(d.glob("*.jpg"))) for d in root.iterdir()}
    assert index["totals"]["frames"] == sum(counts.values()) == 249
    assert index["totals"]["clips"] == sum(max(1, n // 40) for n in counts.values())
    sizes = [s["bytes"] for s in index["shards"]]  # ~6 KB frames, whole videos per shard
    assert 2 <= len(sizes) <= 4 and min(sizes[:-1]) > 300_000 and max(sizes) < 1_500_000
    assert verify(tmp_path / "all", decode=True) == []
    root = write_jpegs(tmp_path / "large" / "synth-4-0000", large_video.frames).parent  # 360x640, at the defaults
    assert build_main(["frames", str(root), "--out", str(tmp_path / "one"), "--workers", "1"]) == 0
    key, sample = next(iter_samples(str(tmp_path / "one" / "frames-000000.tar")))
    meta = json.loads(sample["json"])
    h, w = meta["size"]
    for pos in (0, meta["num_frames"] - 1):
        src = root / meta["video_id"] / f"{meta['frame_indices'][pos]:05d}.jpg"
        ref = np.asarray(Image.open(src).convert("RGB").resize((w, h), Image.BILINEAR))
        assert _psnr(_decoded(sample[f"{pos:04d}.jpg"]), ref) > 35.0


def test_deterministic_across_worker_counts(tmp_path, mp4_build, video_folder, video_list):
    out, index = mp4_build
    again = _build("videos", video_folder, tmp_path, "--file-list", str(video_list), "--shard-clips", "2",
                   "--clip-len", "30", "--workers", "2")
    assert again == index
    assert _tars(tmp_path) == _tars(out)
    assert (tmp_path / "index.json").read_bytes() == (out / "index.json").read_bytes()


def test_resume_after_killed_build(tmp_path, one_thread):
    root = tmp_path / "frames"
    write_frame_folders(root, lengths=(20,) * 24)  # 24 one-clip videos: 24 shards to be killed among
    opts = ["--short-side", str(SHORT), "--clip-len", "20", "--shard-clips", "1", "--workers", "1"]
    ref = tmp_path / "ref"
    assert build_main(["frames", str(root), "--out", str(ref), *opts]) == 0
    out = tmp_path / "killed"
    cmd = [sys.executable, str(ROOT / "shards" / "build.py"), "frames", str(root), "--out", str(out), *opts]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while not list(out.glob("frames-000002.tar")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = {p.name for p in out.glob("*.tar")}
    assert 3 <= len(done_before) < len(_tars(ref)), "the build must be killed part-way"
    assert not (out / "index.json").exists()
    (out / ".frames-000009.tar.part").write_bytes(b"half a shard")  # a partial shard left behind
    assert build_main(["frames", str(root), "--out", str(out), *opts]) == 0
    assert _tars(out) == _tars(ref)
    assert (out / "index.json").read_bytes() == (ref / "index.json").read_bytes()
    assert not list(out.glob(".*.part"))


def test_rerun_refuses_a_different_build_and_verify_finds_damage(tmp_path, frame_folders, capsys):
    root = frame_folders
    index = _build("frames", root, tmp_path, "--clip-len", "40", "--shard-clips", "4", "--workers", "1")
    with pytest.raises(SystemExit, match="different build"):
        build_main(["frames", str(root), "--out", str(tmp_path), "--short-side", "64"])
    first, last = (tmp_path / s["name"] for s in (index["shards"][0], index["shards"][-1]))
    first.write_bytes(first.read_bytes()[: first.stat().st_size // 2])
    last.unlink()
    problems = verify(tmp_path)
    assert any(first.name in p and "truncated" in p for p in problems)
    assert any(last.name in p and "missing" in p for p in problems)
    assert build_main(["verify", str(tmp_path)]) == 1
    assert "problems" in capsys.readouterr().out


def test_help_lists_sources_and_verify(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_main(["--help"])
    text = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert all(name in text for name in ("kinetics", "trackingnet", "ytvos", "oxuva", "videos", "frames", "verify"))
    assert build_main(["nosuchsource", "/tmp", "--out", "/tmp/x"]) == 2


def _video_order(out: Path) -> list[int]:
    """The build's video index of each clip, in shard order (the dealing order)."""
    order = []
    for entry in read_index(out / "index.json").shards:
        for key, _ in iter_samples(str(out / entry.name)):
            video = video_of_key(key)
            if not order or order[-1] != video:
                order.append(video)
    return order


def test_videos_are_dealt_in_a_seeded_order(tmp_path):
    """A seeded permutation of the source, recorded in index.json; the same for any --workers; -1 keeps it."""
    spec = "seed=4,videos=24,frames=6,size=32x32,objects=1"
    opts = ["--clip-len", "6", "--min-clip-len", "6", "--shard-clips", "5"]
    _build("synthetic", spec, tmp_path / "a", *opts, "--workers", "1")
    _build("synthetic", spec, tmp_path / "b", *opts, "--workers", "2")
    _build("synthetic", spec, tmp_path / "c", *opts, "--workers", "1", "--shuffle-seed", "7")
    _build("synthetic", spec, tmp_path / "d", *opts, "--workers", "1", "--shuffle-seed", "-1")
    a, c, d = (_video_order(tmp_path / x) for x in "acd")
    assert sorted(a) == sorted(c) == d == list(range(24))  # every video once; -1: the source's order
    assert a != d and a != c  # shuffled, and by the seed
    assert read_index(tmp_path / "a" / "index.json").params["shuffle_seed"] == 0
    assert read_index(tmp_path / "c" / "index.json").params["shuffle_seed"] == 7
    for name in sorted(p.name for p in (tmp_path / "a").iterdir() if p.is_file()):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert verify(tmp_path / "a") == []
    samples = parse_samples((tmp_path / "a" / "samples.json").read_bytes(), "samples.json")
    first = read_index(tmp_path / "a" / "index.json").shards[0].name
    assert samples[first].video[:1] == a[:1] and len(samples[first].video) == 5
