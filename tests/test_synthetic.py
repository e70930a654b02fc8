"""The procedural video generator: determinism, exact masks, occlusion and exits, writers."""

from __future__ import annotations

import dataclasses

import av
import numpy as np
import pytest
import torch

from dulearn import davis, synthetic

SMALL = dict(frames=40, size=(72, 96))


@pytest.fixture(scope="module")
def scenes() -> list[synthetic.Scene]:
    """A dozen small scenes (as drawn for videos 0..11 of seed 5)."""
    return [synthetic.sample_scene(synthetic.video_rng(5, i), **SMALL) for i in range(12)]


def test_same_seed_same_bytes_other_seed_other_video():
    a = synthetic.make_video(3, 1, **SMALL)
    b = synthetic.make_video(3, 1, **SMALL)
    assert a.frames.dtype == np.uint8 and a.frames.shape == (40, 72, 96, 3)
    assert a.masks.dtype == np.uint8 and a.masks.shape == (40, 72, 96)
    assert a.frames.tobytes() == b.frames.tobytes() and a.masks.tobytes() == b.masks.tobytes()
    c = synthetic.make_video(4, 1, **SMALL)
    assert not np.array_equal(a.frames, c.frames)
    # video i of a dataset does not depend on how many videos are drawn
    names, listed = zip(*synthetic.videos(3, 2, **SMALL))
    assert names == ("synth-3-0000", "synth-3-0001")
    assert listed[1].frames.tobytes() == a.frames.tobytes()


def test_masks_are_exactly_the_object_pixels(scenes):
    """With flat colours (one code per object, black background) frame colour == code[mask] x light[t]."""
    codes = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, 0, 1], [0, 1, 1]], np.float32)
    for scene in scenes[:4]:
        k = len(scene.sprites)
        sprites = scene.sprites.copy()
        sprites[:, :3] = codes[1 : k + 1, :, None, None]
        flat = dataclasses.replace(scene, sprites=sprites, background=np.zeros_like(scene.background))
        video = synthetic.render(flat)
        lit = np.clip(codes[video.masks] * scene.light[:, None, None, :], 0, 1)  # [T,H,W,3] the drifting light
        np.testing.assert_array_equal(video.frames, (lit * 255 + 0.5).astype(np.uint8))
        # and the textured rendering carries the same masks
        assert np.array_equal(synthetic.render(scene).masks, video.masks)


def test_masks_follow_depth_order(scenes):
    """An object's id is wherever its silhouette is and no object in front of it covers it."""
    scene = scenes[0]
    sils = synthetic.silhouettes(scene)  # [K,T,H,W]
    masks = torch.from_numpy(synthetic.render(scene).masks)
    for k in range(len(sils)):
        in_front = sils[k + 1 :].any(0) if k + 1 < len(sils) else torch.zeros_like(sils[k])
        assert torch.equal(masks == k + 1, sils[k] & ~in_front)


def test_objects_occlude_each_other_and_leave_the_view(scenes):
    occluded = left = moved = 0
    for scene in scenes:
        sils = synthetic.silhouettes(scene)
        masks = torch.from_numpy(synthetic.render(scene).masks)
        for k in range(len(sils)):
            area = sils[k].flatten(1).sum(1)  # [T]
            visible = (masks == k + 1).flatten(1).sum(1)
            occluded += int(((visible < area) & (visible > 0)).any())
            left += int(area[0] > 0 and (area == 0).any())
            ys, xs = torch.nonzero(sils[k][0], as_tuple=True)
            ye, xe = torch.nonzero(sils[k][-1], as_tuple=True)
            if len(ys) and len(ye):
                moved += int(abs(ys.float().mean() - ye.float().mean()) + abs(xs.float().mean() - xe.float().mean()) > 5)
    assert occluded >= 3, f"only {occluded} partially occluded objects in 12 videos"
    assert left >= 2, f"only {left} objects left the view in 12 videos"
    assert moved >= 10, f"only {moved} objects moved more than 5 px"


def test_every_object_visible_in_the_first_frame():
    for i in range(6):
        video = synthetic.make_video(8, i, **SMALL)
        k = int(video.masks.max())
        assert k >= 2
        assert set(np.unique(video.masks[0])) == set(range(k + 1))


def test_camera_moves_the_background(scenes):
    """Background pixels change between frames because the camera pans/zooms."""
    scene = dataclasses.replace(scenes[1], sprites=scenes[1].sprites[:0], pose=scenes[1].pose[:0], wobble=scenes[1].wobble[:0])
    frames = synthetic.render(scene).frames.astype(np.float32)
    assert np.abs(frames[-1] - frames[0]).mean() > 5


def test_davis_writer_gives_a_readable_davis_root(tmp_path):
    names = synthetic.write_davis(tmp_path, sequences=2, frames=6, size=(64, 96), seed=11)
    assert davis.list_sequences(tmp_path, "val") == names
    for i, name in enumerate(names):
        video = synthetic.make_video(11, i, frames=6, size=(64, 96))
        frames = davis.sequence_frames(tmp_path, name)
        masks = davis.sequence_masks(tmp_path, name)
        assert [p.name for p in frames] == [f"{t:05d}.jpg" for t in range(6)]
        assert [p.stem for p in masks] == [p.stem for p in frames]
        for t in range(6):
            np.testing.assert_array_equal(davis.load_mask(masks[t]), video.masks[t])
            img = davis.load_frame(frames[t]).astype(np.float32)
            assert img.shape == (64, 96, 3) and np.abs(img - video.frames[t]).mean() < 6  # JPEG loss only


def test_video_writer_and_cli(tmp_path):
    assert synthetic.main(["videos", str(tmp_path), "--videos", "2", "--frames", "7", "--size", "48x64", "--seed", "2"]) == 0
    paths = sorted(tmp_path.glob("*.mp4"))
    assert [p.name for p in paths] == ["synth-2-0000.mp4", "synth-2-0001.mp4"]
    expected = synthetic.make_video(2, 1, frames=7, size=(48, 64)).frames.astype(np.float32)
    with av.open(str(paths[1])) as container:
        decoded = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)]).astype(np.float32)
    assert decoded.shape == expected.shape and np.abs(decoded - expected).mean() < 10
    with pytest.raises(SystemExit):
        synthetic.main(["davis", str(tmp_path), "--size", "64"])


def test_shard_source_builds_clips_of_the_generated_videos(tmp_path):
    """`shards/build.py synthetic SPEC` packs the generator's videos; the shards verify."""
    import io
    import json
    import tarfile

    from PIL import Image

    from shards import build
    from shards.sources import synthetic as synthetic_source

    out = tmp_path / "shards"
    spec = "seed=4,videos=3,frames=16,size=48x64,objects=2"
    assert build.main(["synthetic", spec, "--out", str(out), "--clip-len", "8", "--short-side", "48", "--workers", "1"]) == 0
    index = json.loads((out / "index.json").read_text())
    assert index["totals"]["videos"] == 3 and index["totals"]["clips"] == 6 and index["totals"]["frames"] == 48
    assert build.main(["verify", str(out)]) == 0
    with tarfile.open(out / index["shards"][0]["name"]) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    meta = json.loads(members["v00000001_c0001.json"])
    assert meta["video_id"] == "synth-4-0001" and meta["frame_indices"][0] == 8
    expected = synthetic.make_video(4, 1, frames=16, size=(48, 64), objects=(2, 2)).frames[8 + 2].astype(np.float32)
    got = np.array(Image.open(io.BytesIO(members["v00000001_c0001.0002.jpg"])).convert("RGB"), np.float32)
    assert got.shape == expected.shape and np.abs(got - expected).mean() < 6
    with pytest.raises(ValueError, match="bad item 'vidoes=3'"):
        list(synthetic_source(tmp_path / "vidoes=3"))
