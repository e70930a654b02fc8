"""Bad inputs (damaged copies of synthetic H.264 videos and JPEG frames) are skipped, counted and
listed with a reason; the build always finishes."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import av
import numpy as np
from PIL import Image

from shards.build import main as build_main
from synthetic_data import frame_count

BUILD = ["--short-side", "64", "--clip-len", "20", "--min-clip-len", "10", "--workers", "2"]


def _write_video(path: Path, frames: list[np.ndarray]) -> None:
    """Encode frames [H,W,3] uint8 (possibly none: a video stream without frames)."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=24)
        stream.height, stream.width = frames[0].shape[:2] if frames else (96, 128)
        stream.pix_fmt = "yuv420p"
        out.start_encoding()
        for f in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        out.mux(stream.encode())


def _index(out: Path) -> dict:
    return json.loads((out / "index.json").read_text())


def _reasons(index: dict) -> dict[str, str]:
    return {Path(s["input"]).name: s["reason"] for s in index["skipped"]}


def test_bad_videos_are_skipped_and_listed(tmp_path, video_folder):
    root = tmp_path / "videos"
    root.mkdir()
    shutil.copy(video_folder / "synth-2-0000.mp4", root / "good.mp4")
    data = (video_folder / "synth-2-0004.mp4").read_bytes()
    (root / "truncated.mp4").write_bytes(data[: len(data) * 6 // 10])  # moov atom lost, as in a cut download
    (root / "garbage.webm").write_bytes(np.random.default_rng(0).bytes(50_000))
    with av.open(str(video_folder / "synth-2-0001.mp4")) as c:
        decoded = [f.to_ndarray(format="rgb24")[:96, :128] for _, f in zip(range(5), c.decode(video=0))]
    _write_video(root / "short.avi", decoded)
    _write_video(root / "zero.avi", [])
    out = tmp_path / "out"
    assert build_main(["videos", str(root), "--out", str(out), *BUILD]) == 0
    index = _index(out)
    reasons = _reasons(index)
    assert set(reasons) == {"truncated.mp4", "garbage.webm", "short.avi", "zero.avi"}
    assert reasons["truncated.mp4"].startswith("unreadable")
    assert reasons["garbage.webm"].startswith("unreadable")
    assert reasons["short.avi"].startswith("too short: 5 frames")
    assert reasons["zero.avi"] == "no frames"
    assert index["totals"]["skipped"] == 4
    assert index["totals"]["videos"] == 1 and index["totals"]["clips"] == frame_count(root / "good.mp4") // 20


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def test_bad_frame_folders_are_skipped_and_listed(tmp_path, frame_folders):
    frames = sorted((frame_folders / "synth-1-0002").glob("*.jpg"))[:12]
    root = tmp_path / "frames"
    for name in ("good", "corrupt", "gray", "rgba", "short", "empty"):
        (root / name).mkdir(parents=True)
    for i, f in enumerate(frames):
        for name in ("good", "corrupt", "gray", "rgba"):
            shutil.copy(f, root / name / f"{i:05d}.jpg")
    for f in frames[:4]:
        shutil.copy(f, root / "short" / f.name)
    good = (root / "corrupt" / "00005.jpg").read_bytes()
    (root / "corrupt" / "00005.jpg").write_bytes(good[: len(good) // 3])
    (root / "gray" / "00003.jpg").write_bytes(_jpeg(Image.open(frames[3]).convert("L")))
    (root / "rgba" / "00007.jpg").unlink()
    Image.open(frames[7]).convert("RGBA").save(root / "rgba" / "00007.png")
    out = tmp_path / "out"
    assert build_main(["frames", str(root), "--out", str(out), *BUILD]) == 0
    index = _index(out)
    reasons = _reasons(index)
    assert set(reasons) == {"corrupt", "gray", "rgba", "short", "empty"}
    assert "corrupt image" in reasons["corrupt"] and "00005.jpg" in reasons["corrupt"]
    assert "non-RGB image" in reasons["gray"] and "00003.jpg" in reasons["gray"]
    assert "non-RGB image" in reasons["rgba"] and "00007.png" in reasons["rgba"]
    assert reasons["short"].startswith("too short: 4 frames")
    assert reasons["empty"] == "no frames"
    assert index["totals"] == {**index["totals"], "videos": 1, "clips": 1, "frames": 12, "skipped": 5}
