"""Each dataset layout, as a small tree of synthetic JPEG frames and H.264 videos, builds correctly."""

from __future__ import annotations

import io
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dulearn.shard_format import iter_samples
from shards.build import main as build_main
from synthetic_data import frame_count

N = 12  # frames per fake frame-folder video
BUILD = ["--short-side", "64", "--clip-len", str(N), "--min-clip-len", "5", "--workers", "1"]


@pytest.fixture(scope="module")
def source_frames(frame_folders) -> dict[str, list[Path]]:
    """The first N frames of two videos, under the names of the fake videos below."""
    return {name: sorted((frame_folders / folder).glob("*.jpg"))[:N]
            for name, folder in (("dog", "synth-1-0002"), ("libby", "synth-1-0004"))}


def _place(frames: list[Path], folder: Path, name_of) -> None:
    folder.mkdir(parents=True)
    for i, f in enumerate(frames):
        shutil.copy(f, folder / name_of(i))


def _build(kind: str, root: Path, out: Path, *extra: str) -> tuple[dict, list[dict], dict]:
    """Build, then return index.json, every clip's json, and key -> sample."""
    assert build_main([kind, str(root), "--out", str(out), *BUILD, *extra]) == 0
    index = json.loads((out / "index.json").read_text())
    samples = {k: s for sh in index["shards"] for k, s in iter_samples(str(out / sh["name"]))}
    return index, [json.loads(s["json"]) for s in samples.values()], samples


def _gray(img: np.ndarray) -> np.ndarray:
    return img.astype(np.float64).mean(-1)


def _frame_order_is_natural(sample: dict, meta: dict, sources: list[Path]) -> bool:
    """Frame 10 of the clip is source frame 10 (not 2, as a lexicographic sort of 0..11 would give)."""
    got = _gray(np.asarray(Image.open(io.BytesIO(sample["0010.jpg"]))))
    h, w = meta["size"]
    err = [np.abs(got - _gray(np.asarray(Image.open(sources[i]).resize((w, h))))).mean() for i in (2, 10)]
    return err[1] < err[0] and meta["frame_indices"][10] == 10


def test_kinetics_class_folders_of_videos(tmp_path, video_folder):
    root = tmp_path / "k400" / "train"
    (root / "abseiling").mkdir(parents=True)
    (root / "zumba").mkdir()
    first = shutil.copy(video_folder / "synth-2-0000.mp4", root / "abseiling" / "0wR5jVB-WPk_000417_000427.mp4")
    second = shutil.copy(video_folder / "synth-2-0001.mp4", root / "zumba" / "-0bZ0Dzx9jw_000032_000042.mp4")
    index, metas, _ = _build("kinetics", root, tmp_path / "out")
    assert index["source"] == "kinetics" and index["totals"]["videos"] == 2 and index["skipped"] == []
    assert {(m["video_id"], m["label"]) for m in metas} == {
        ("abseiling/0wR5jVB-WPk_000417_000427", "abseiling"), ("zumba/-0bZ0Dzx9jw_000032_000042", "zumba")}
    assert index["totals"]["clips"] == frame_count(first) // N + frame_count(second) // N
    assert all(m["dataset"] == "kinetics" and m["fps"] == pytest.approx(24.0) for m in metas)


def test_trackingnet_frames_and_zips(tmp_path, source_frames):
    root = tmp_path / "TrackingNet"
    _place(source_frames["dog"], root / "TRAIN_0" / "frames" / "a1", lambda i: f"{i}.jpg")
    _place(source_frames["libby"], root / "TRAIN_0" / "frames" / "a2", lambda i: f"{i}.jpg")
    (root / "TRAIN_1" / "zips").mkdir(parents=True)
    with zipfile.ZipFile(root / "TRAIN_1" / "zips" / "b1.zip", "w") as zf:
        for i, f in enumerate(source_frames["dog"]):
            zf.write(f, f"b1/{i}.jpg")
    index, metas, samples = _build("trackingnet", root, tmp_path / "out")
    by_id = {m["video_id"]: (k, m) for k, m in zip(samples, metas)}
    assert set(by_id) == {"TRAIN_0/a1", "TRAIN_0/a2", "TRAIN_1/b1"}
    assert index["totals"] == {**index["totals"], "videos": 3, "clips": 3, "frames": 3 * N}
    for vid, src in (("TRAIN_0/a1", source_frames["dog"]), ("TRAIN_1/b1", source_frames["dog"])):
        key, meta = by_id[vid]
        assert _frame_order_is_natural(samples[key], meta, src)


def test_ytvos_all_frames_and_train_with_file_list(tmp_path, source_frames):
    root = tmp_path / "ytvos"
    for name, frames in source_frames.items():
        _place(frames, root / "train_all_frames" / "JPEGImages" / f"{name}0a1b", lambda i: f"{i:05d}.jpg")
        _place(frames, root / "train" / "JPEGImages" / f"{name}0a1b", lambda i: f"{5 * i:05d}.jpg")
    index, metas, _ = _build("ytvos", root, tmp_path / "all")
    assert sorted(m["video_id"] for m in metas) == ["dog0a1b", "libby0a1b"]
    assert {m["fps"] for m in metas} == {30.0} and index["totals"]["frames"] == 2 * N
    shutil.rmtree(root / "train_all_frames")
    (tmp_path / "list.txt").write_text("libby0a1b\n")
    index, metas, _ = _build("ytvos", root, tmp_path / "listed", "--file-list", str(tmp_path / "list.txt"))
    assert [(m["video_id"], m["fps"]) for m in metas] == [("libby0a1b", 6.0)]


def test_oxuva_images_dev(tmp_path, source_frames):
    root = tmp_path / "oxuva"
    for k, frames in enumerate(source_frames.values()):
        _place(frames, root / "images" / "dev" / f"vid{k:04d}", lambda i: f"{i:06d}.jpeg")
    index, metas, samples = _build("oxuva", root, tmp_path / "out", "--frame-stride", "2", "--clip-len", "6")
    assert sorted(m["video_id"] for m in metas) == ["dev/vid0000", "dev/vid0001"]
    assert all(m["frame_indices"] == list(range(0, N, 2)) for m in metas)  # temporal subsampling
    assert index["totals"] == {**index["totals"], "videos": 2, "clips": 2, "frames": N}
