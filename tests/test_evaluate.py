"""The evaluation CLI end to end on a synthetic DAVIS-layout set with exact masks (random-init model,
CPU), YouTube-VOS mode, bad input. The official evaluator's figures are tested in test_metrics.py."""

from __future__ import annotations

import argparse
import json
import re
import shutil
import zipfile
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from dulearn import davis, evaluate, metrics
from dulearn.checkpoint import save_checkpoint
from dulearn.model import CheckpointMismatch, DenseNet

SMALL = ["--input-size", "64", "--no-progress", "--device", "cpu"]  # 8x14 feature grid: fast on CPU
SEQUENCES = ["synth-3-0000", "synth-3-0001", "synth-3-0002"]  # the davis_set fixture: 24 frames, 1 object each


def _jf(text: str) -> str:
    found = re.findall(r"J&F-Mean: ([0-9.]+)", text)
    assert found, f"no J&F-Mean line in:\n{text}"
    return found[-1]


def _mini_tree(src: Path, dst: Path, seq: str, n: int) -> Path:
    """A DAVIS tree with the first n frames and masks of one sequence of `src`."""
    for kind, ext in (("JPEGImages", ".jpg"), ("Annotations", ".png")):
        out = dst / kind / "480p" / seq
        out.mkdir(parents=True)
        for p in sorted((src / kind / "480p" / seq).glob(f"*{ext}"))[:n]:
            shutil.copy(p, out / p.name)
    return dst


@pytest.mark.slow
def test_cli_on_davis_set_matches_metrics_and_writes_valid_results(davis_set, tmp_path, capsys):
    out = tmp_path / "out"
    seq = SEQUENCES[0]
    assert evaluate.main(["--davis", str(davis_set), "--sequences", seq, "--out", str(out), *SMALL]) == 0
    printed = capsys.readouterr().out
    assert seq + "_1" in printed

    # the printed J&F equals dulearn.metrics run on the written folder
    assert metrics.main(["--davis", str(davis_set), "--results", str(out / "Annotations"), "--sequences", seq]) == 0
    assert _jf(printed) == _jf(capsys.readouterr().out)

    # valid DAVIS results: one palette PNG per frame, same names and size, DAVIS palette, ids {0,1}
    frames = davis.sequence_frames(davis_set, seq)
    pngs = sorted((out / "Annotations" / seq).glob("*.png"))
    assert [p.stem for p in pngs] == [f.stem for f in frames]
    with Image.open(davis.sequence_masks(davis_set, seq)[0]) as gt:
        gt_palette, gt_size = gt.getpalette()[:768], gt.size
    for p in pngs[:: len(pngs) // 4]:
        with Image.open(p) as im:
            assert im.mode == "P" and im.size == gt_size and im.getpalette()[:768] == gt_palette
            assert set(np.unique(np.array(im))) <= {0, 1}

    summary = json.loads((out / "summary.json").read_text())
    assert f"{summary['J&F-Mean']:.6f}" == _jf(printed)
    assert summary["frames"] == len(frames) and summary["frames/s"] > 0
    assert {"J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay"} <= set(summary)
    rows = (out / "per-object.csv").read_text().splitlines()
    assert rows[0] == "object,J-Mean,J-Recall,J-Decay,F-Mean,F-Recall,F-Decay"
    assert rows[1].startswith(seq + "_1,") and rows[-1].startswith("ALL,")
    with av.open(str(out / "videos" / f"{seq}.mp4")) as container:
        assert sum(1 for _ in container.decode(video=0)) == len(frames)


def test_evaluate_davis_for_the_training_loop(davis_set, tmp_path):
    root = _mini_tree(davis_set, tmp_path / "davis", SEQUENCES[1], 6)
    model = DenseNet().train()
    summary = evaluate.evaluate_davis(model, root, sequences=[SEQUENCES[1]], input_size=64)
    assert model.training, "the model's train mode was not restored"
    assert 0.0 <= summary["J&F-Mean"] <= 1.0 and summary["frames"] == 6
    assert summary["J&F-Mean"] == pytest.approx((summary["J-Mean"] + summary["F-Mean"]) / 2)


def _ytvos_tree(davis_set: Path, root: Path, n: int = 12, start: int = 5) -> tuple[Path, np.ndarray]:
    """A YouTube-VOS valid tree from a DAVIS sequence: object 1 from frame 0, object 2 first annotated at `start`."""
    vid = "car"
    (root / "JPEGImages" / vid).mkdir(parents=True)
    (root / "Annotations" / vid).mkdir(parents=True)
    for p in davis.sequence_frames(davis_set, SEQUENCES[0])[:n]:
        shutil.copy(p, root / "JPEGImages" / vid / p.name)
    first = davis.load_mask(davis.sequence_masks(davis_set, SEQUENCES[0])[0])
    davis.save_mask(root / "Annotations" / vid / "00000.png", first)
    new = np.zeros_like(first)
    h, w = first.shape
    new[h * 5 // 8 : h * 49 // 50, w * 7 // 12 : w * 49 // 50] = 2  # a second object, annotated only where it first appears
    davis.save_mask(root / "Annotations" / vid / f"{start:05d}.png", new)
    sparse = [f"{i:05d}" for i in range(0, n, 5)]
    meta = {"videos": {vid: {"objects": {"1": {"category": "car", "frames": sparse}, "2": {"category": "box", "frames": [f for f in sparse if int(f) >= start]}}}}}
    (root / "meta.json").write_text(json.dumps(meta))
    return root, new == 2


@pytest.mark.slow
def test_ytvos_mode_later_object_sparse_frames_and_zip(davis_set, tmp_path):
    root, box = _ytvos_tree(davis_set, tmp_path / "ytvos")
    out = tmp_path / "out"
    assert evaluate.main(["--ytvos", str(root), "--out", str(out), "--video", "gif", *SMALL]) == 0
    written = sorted(p.relative_to(out).as_posix() for p in (out / "Annotations").rglob("*.png"))
    assert written == ["Annotations/car/00000.png", "Annotations/car/00005.png", "Annotations/car/00010.png"]
    with zipfile.ZipFile(out / "Annotations.zip") as zf:
        assert sorted(zf.namelist()) == written
        assert zf.testzip() is None
    masks = {p.split("/")[-1][:5]: davis.load_mask(out / p) for p in written}
    assert (masks["00000"] == 1).any() and not (masks["00000"] == 2).any()
    assert (masks["00005"][box] == 2).mean() > 0.5, "the later object is not placed at its first frame"
    assert (masks["00010"] == 2).any(), "the later object was not propagated from its first frame"
    assert (out / "videos" / "car.gif").is_file()
    assert "zip" in json.loads((out / "summary.json").read_text())


def test_bad_input_is_a_clear_error(davis_set, tmp_path):
    out = str(tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="no-such-sequence"):
        evaluate.main(["--davis", str(davis_set), "--sequences", "no-such-sequence", "--out", out, *SMALL])

    seq = SEQUENCES[2]
    wrong = _mini_tree(davis_set, tmp_path / "wrong", seq, 3)
    first = wrong / "Annotations" / "480p" / seq / "00000.png"
    mask = davis.load_mask(first)
    davis.save_mask(first, mask[: mask.shape[0] // 2, : mask.shape[1] // 2])
    with pytest.raises(ValueError, match=r"00000\.png has size"):
        evaluate.main(["--davis", str(wrong), "--sequences", seq, "--out", out, *SMALL])

    nomask = _mini_tree(davis_set, tmp_path / "nomask", seq, 3)
    for p in (nomask / "Annotations" / "480p" / seq).glob("*.png"):
        p.unlink()
    with pytest.raises(FileNotFoundError, match="first frame 00000.jpg"):
        evaluate.main(["--davis", str(nomask), "--sequences", seq, "--out", out, *SMALL])

    bad = tmp_path / "bad.pt"
    torch.save({"model": {"encoder.conv.weight": torch.zeros(1)}}, bad)
    with pytest.raises(CheckpointMismatch, match="encoder.conv.weight"):
        evaluate.build_model(bad)
    torch.save({"weights": [1, 2]}, bad)
    with pytest.raises(KeyError, match="no 'model'"):
        evaluate.build_model(bad)


def test_checkpoints_dulearn_and_original_layouts(tmp_path):
    torch.manual_seed(3)
    src = DenseNet(feat_dim=64)
    ours = tmp_path / "ours.pt"
    torch.save({"model": src.state_dict(), "config": {"model": {"feat_dim": 64, "output_stride": 8}}, "step": 5}, ours)
    original = tmp_path / "original.pth"
    renamed = {("fast_net.backbone." + k[len("backbone."):]) if k.startswith("backbone.") else "fast_net.emb_q." + k[len("head."):]: v for k, v in src.state_dict().items()}
    torch.save({"model": {"module." + k: v for k, v in renamed.items()}, "args": argparse.Namespace(lr=1e-4)},
               original)  # the original release pickles more than tensors
    run_dir = tmp_path / "run"
    save_checkpoint(run_dir, {"model": src.state_dict(), "config": {"model": {"feat_dim": 64}}, "step": 7}, keep=2)
    for path in (ours, original, run_dir):
        model = evaluate.build_model(path)
        assert model.feat_dim == 64 and not model.training
        for k, v in src.state_dict().items():
            assert torch.equal(model.state_dict()[k], v), f"{path.name}: {k} differs"
