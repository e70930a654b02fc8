"""`dulearn segment` on synthetic video with exact masks: outputs, J&F equal to the evaluation path, bad input, memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from dulearn import cli, davis, evaluate, metrics, synthetic
from dulearn.checkpoint import save_checkpoint
from dulearn.model import DenseNet

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--device", "cpu", "--no-progress"]


def _run_dir(tmp: Path) -> Path:
    """A run directory holding a random-init network, as the training loop writes checkpoints."""
    torch.manual_seed(0)
    save_checkpoint(tmp / "run", {"model": DenseNet().state_dict(), "config": {}, "step": 0}, keep=1)
    return tmp / "run"


def _decode(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def _segment(*args: str) -> int:
    return cli.main(["segment", *FAST, *map(str, args)])


def test_frame_folder_gives_the_evaluation_paths_masks_and_videos(tmp_path):
    root = tmp_path / "davis"
    seq = synthetic.write_davis(root, sequences=1, frames=16, size=(96, 128), seed=11)[0]
    frames_dir, gt_dir = root / "JPEGImages/480p" / seq, root / "Annotations/480p" / seq
    run_dir, out = _run_dir(tmp_path), tmp_path / "out"
    assert _segment(frames_dir, "--mask", gt_dir / "00000.png", "--checkpoint", run_dir, "--out", out, "--input-size", "0") == 0

    pngs = sorted((out / "masks").glob("*.png"))
    assert [p.stem for p in pngs] == [f"{t:05d}" for t in range(16)]
    with Image.open(pngs[5]) as im:
        assert im.mode == "P" and im.size == (128, 96) and im.getpalette()[:768] == davis.DAVIS_PALETTE[:768]
    overlay, side = _decode(out / "overlay.mp4"), _decode(out / "side-by-side.mp4")
    assert overlay.shape == (16, 96, 128, 3) and side.shape == (16, 96, 256, 3)
    frames = np.stack(list(evaluate.frame_source(evaluate.davis_videos(root)[0]).frames())).astype(float)
    assert np.abs(side[:, :, :128] - frames).mean() < 8, "the left half of side-by-side is not the video"
    assert np.abs(side[:, :, 128:].astype(float) - overlay).mean() < 8, "the right half of side-by-side is not the overlay"
    summary = json.loads((out / "segment.json").read_text())
    assert summary["frames"] == 16 and summary["settings"]["context"] == 20

    # the evaluation path on the same frames with the same network: the same masks, the same J&F
    result = evaluate.evaluate_davis(evaluate.build_model(run_dir), root, out_dir=tmp_path / "eval")
    ours = metrics.Scores()
    ours.add(seq, *metrics.score_sequence(metrics.load_ids(davis.sequence_masks(root, seq)), metrics.load_ids(pngs)))
    assert 0 < ours.summary()["J&F-Mean"] < 1
    assert ours.summary()["J&F-Mean"] == result["J&F-Mean"]
    for p in pngs:
        assert np.array_equal(davis.load_mask(p), davis.load_mask(tmp_path / "eval/Annotations" / seq / p.name)), p.name


def test_mp4_with_a_later_object_a_resized_and_a_binary_mask(tmp_path, capsys):
    video = synthetic.make_video(4, 0, frames=20, size=(64, 96), objects=(2, 2))
    synthetic.write_mp4(tmp_path / "clip.mp4", video.frames, fps=10)
    first = np.where(video.masks[0] == 2, 0, video.masks[0])  # object 2 is annotated only at frame 6 ...
    big = np.kron(first, np.ones((2, 2), np.uint8))  # ... and the first mask is twice the frame size
    davis.save_mask(tmp_path / "first.png", big)
    Image.fromarray(np.where(video.masks[6] == 2, 255, 0).astype(np.uint8), mode="L").save(tmp_path / "later.png")
    out = tmp_path / "out"
    assert _segment(tmp_path / "clip.mp4", "--mask", tmp_path / "first.png", "--mask", f"6:{tmp_path / 'later.png'}",
                    "--checkpoint", "random", "--out", out, "--input-size", "0") == 0
    err = capsys.readouterr().err
    assert "warning: mask" in err and "128x192, the frames 64x96: resized (nearest neighbour)" in err
    masks = np.stack([davis.load_mask(p) for p in sorted((out / "masks").glob("*.png"))])
    assert masks.shape == (20, 64, 96)
    # the binary 0/255 later mask is one new object, id 2: placed at frame 6, absent before, propagated after
    assert (masks[6][video.masks[6] == 2] == 2).mean() > 0.7, "the later object is not placed at its frame"
    assert not (masks[:6] == 2).any() and (masks[7:] == 2).any(axis=(1, 2)).all()
    assert set(np.unique(masks).tolist()) <= {0, 1, 2} and (masks[0][video.masks[0] == 1] == 1).mean() > 0.5
    assert _decode(out / "overlay.mp4").shape == (20, 64, 96, 3)
    assert json.loads((out / "segment.json").read_text())["fps"] == 10


def _errors(capsys, *args: str) -> str:
    """Run `dulearn segment` expecting bad input: exit 2 and one line on stderr; returns the line."""
    assert _segment(*args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("dulearn segment: error: "), err
    return err


def test_bad_input_gives_one_line_errors(tmp_path, capsys):
    root = tmp_path / "davis"
    seq = synthetic.write_davis(root, sequences=1, frames=6, size=(32, 48), seed=2)[0]
    frames, mask = root / "JPEGImages/480p" / seq, root / "Annotations/480p" / seq / "00000.png"
    run_dir, out = _run_dir(tmp_path), tmp_path / "out"
    ok = ["--checkpoint", run_dir, "--out", out]

    (tmp_path / "broken.mp4").write_bytes(b"this is not a video")
    assert "broken.mp4" in _errors(capsys, tmp_path / "broken.mp4", "--mask", mask, *ok)
    assert "video not found" in _errors(capsys, tmp_path / "missing.mp4", "--mask", mask, *ok)
    (tmp_path / "empty").mkdir()
    assert "has no .jpg" in _errors(capsys, tmp_path / "empty", "--mask", mask, *ok)

    davis.save_mask(tmp_path / "zeros.png", np.zeros((32, 48), np.uint8))
    assert "has no object" in _errors(capsys, frames, "--mask", tmp_path / "zeros.png", *ok)
    Image.new("RGB", (48, 32)).save(tmp_path / "rgb.png")
    assert "mode RGB" in _errors(capsys, frames, "--mask", tmp_path / "rgb.png", *ok)
    assert "mask not found" in _errors(capsys, frames, "--mask", tmp_path / "nope.png", *ok)
    assert "has 6 frames" in _errors(capsys, frames, "--mask", mask, "--mask", f"9:{mask}", *ok)
    assert "no frame 'frame9'" in _errors(capsys, frames, "--mask", f"00000:{mask}", "--mask", f"frame9:{mask}", *ok)

    wrong = tmp_path / "wrong.pt"
    torch.save({"model": {"encoder.conv.weight": torch.zeros(1)}}, wrong)
    line = _errors(capsys, frames, "--mask", mask, "--checkpoint", wrong, "--out", out)
    assert "encoder.conv.weight" in line and "does not match the dulearn model" in line
    (tmp_path / "text.pth").write_text("not a checkpoint")
    assert "cannot load checkpoint" in _errors(capsys, frames, "--mask", mask, "--checkpoint", tmp_path / "text.pth", "--out", out)
    if not torch.cuda.is_available():
        assert "CUDA is not available" in _errors(capsys, frames, "--mask", mask, *ok, "--device", "cuda")
    assert not (out / "masks").exists(), "bad input must fail before anything is written"


def _peak_rss_mb(video: Path, mask: Path, run_dir: Path, out: Path) -> float:
    """Peak resident memory (MB) of one `dulearn segment` run in a fresh process.

    VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss across exec, so a child
    would report the larger RSS of this test process.
    """
    code = ("import sys; from dulearn import cli; assert cli.main(sys.argv[1:]) == 0; "
            "print(next(int(line.split()[1]) for line in open('/proc/self/status') if line.startswith('VmHWM:')) / 1024)")
    args = ["segment", str(video), "--mask", str(mask), "--checkpoint", str(run_dir), "--out", str(out), "--input-size", "0", *FAST]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=1200)
    assert done.returncode == 0, done.stderr[-2000:]
    return float(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_memory_does_not_grow_with_the_video(tmp_path):
    """600 frames peak within 40 MB of 150 (holding all features would add 450 x 0.5 MB = 236 MB at this size)."""
    if not Path("/proc/self/status").is_file():
        pytest.skip("needs /proc/self/status (Linux) to read a process's peak memory")
    video = synthetic.make_video(7, 0, frames=600, size=(128, 128), objects=(2, 2))
    for n in (150, 600):
        synthetic.write_mp4(tmp_path / f"v{n}.mp4", video.frames[:n])
    davis.save_mask(tmp_path / "first.png", video.masks[0])
    run_dir = _run_dir(tmp_path)
    peak = {n: _peak_rss_mb(tmp_path / f"v{n}.mp4", tmp_path / "first.png", run_dir, tmp_path / f"out{n}") for n in (150, 600)}
    assert len(list((tmp_path / "out600" / "masks").glob("*.png"))) == 600
    assert peak[600] < peak[150] + 40, peak
