"""DAVIS-2017 J&F: the official evaluator's figures on real results, and the edge cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dulearn import davis, metrics


def naive_f_measure(gt: np.ndarray, pred: np.ndarray, bound_th: float = 0.008) -> float:
    """One frame's boundary F-measure in plain numpy (per-frame loops; the official recipe)."""

    def bmap(m):
        e, s, se = np.zeros_like(m), np.zeros_like(m), np.zeros_like(m)
        e[:, :-1], s[:-1, :], se[:-1, :-1] = m[:, 1:], m[1:, :], m[1:, 1:]
        b = (m ^ e) | (m ^ s) | (m ^ se)
        b[-1, :], b[:, -1] = m[-1, :] ^ e[-1, :], m[:, -1] ^ s[:, -1]
        b[-1, -1] = False
        return b

    def dil(b, r):
        out = np.zeros_like(b)
        h, w = b.shape
        for dy in range(-r, r + 1):
            for dx in range(-r, r + 1):
                if dy * dy + dx * dx <= r * r:
                    out[max(0, -dy) : h - max(0, dy), max(0, -dx) : w - max(0, dx)] |= b[max(0, dy) : h - max(0, -dy), max(0, dx) : w - max(0, -dx)]
        return out

    r = math.ceil(bound_th * math.hypot(*gt.shape))
    gb, pb = bmap(gt), bmap(pred)
    n_g, n_p = gb.sum(), pb.sum()
    if n_p == 0 and n_g == 0:
        return 1.0
    if n_p == 0 or n_g == 0:
        return 0.0
    precision, recall = (pb & dil(gb, r)).sum() / n_p, (gb & dil(pb, r)).sum() / n_g
    return 0.0 if precision + recall == 0 else float(2 * precision * recall / (precision + recall))


def _csv(path):
    return path.read_text().strip().splitlines()


def test_reproduces_official_osvos_figures(shared_data, tmp_path, capsys):
    out = tmp_path / "osvos.csv"
    assert metrics.main(["--davis", str(shared_data / "davis-mini"), "--results", str(shared_data / "davis-mini-osvos"), "--csv", str(out)]) == 0
    assert _csv(out) == _csv(shared_data / "davis-mini" / "golden-osvos.csv")
    assert "J&F-Mean: 0.791132" in capsys.readouterr().out


def test_reproduces_official_multi_object_figures(shared_data, tmp_path):
    out = tmp_path / "multi.csv"
    metrics.main(["--davis", str(shared_data / "davis-multi"), "--results", str(shared_data / "davis-multi-results"), "--csv", str(out)])
    got, want = _csv(out), _csv(shared_data / "davis-multi" / "golden-results.csv")
    assert got[0] == want[0]
    for g, w in zip(got[1:], want[1:], strict=True):
        g, w = g.split(","), w.split(",")
        assert g[0] == w[0]
        assert np.allclose([float(x) for x in g[1:]], [float(x) for x in w[1:]], atol=1e-6, rtol=0)


def test_ground_truth_against_itself_is_perfect(shared_data):
    root = shared_data / "davis-multi"
    scores = metrics.score_davis(root, root / "Annotations" / "480p")
    summary = scores.summary()
    assert len(scores.rows) == 2
    for key in ("J&F-Mean", "J-Mean", "J-Recall", "F-Mean", "F-Recall"):
        assert summary[key] == 1.0
    assert summary["J-Decay"] == 0.0 and summary["F-Decay"] == 0.0


def test_vectorised_f_matches_naive_per_frame(shared_data):
    seq = "motocross-jump"
    gt = metrics.load_ids(davis.sequence_masks(shared_data / "davis-multi", seq))[:6]
    pred = metrics.load_ids(sorted((shared_data / "davis-multi-results" / seq).glob("*.png")))[:6]
    for obj in (1, 2):
        g, p = gt == obj, pred == obj
        fast = metrics.f_measure(g, p).numpy()
        slow = [naive_f_measure(g[i].numpy(), p[i].numpy()) for i in range(len(g))]
        assert np.allclose(fast, slow, atol=1e-12, rtol=0)


def _seq(*frames):
    return torch.tensor(np.stack(frames), dtype=torch.uint8)


def test_edge_cases():
    h, w = 24, 32
    empty = np.zeros((h, w), np.uint8)
    one = empty.copy()
    one[4:12, 5:15] = 1
    two = one.copy()
    two[14:20, 20:30] = 2
    # frames 0 and 4 are never scored; frame 0 decides the number of objects
    gt = _seq(two, two, one, empty, two)
    # object 2 missing in frame 1 of the prediction; both empty in frame 3 (J = F = 1)
    pred = _seq(empty, one, one, empty, empty)
    j, f = metrics.score_sequence(gt, pred)
    assert j.shape == (2, 3)
    assert np.allclose(j[0], [1, 1, 1]) and np.allclose(f[0], [1, 1, 1])
    assert np.allclose(j[1], [0, 1, 1]) and np.allclose(f[1], [0, 1, 1])
    # void (255) in the ground truth is background, not excluded
    void = two.copy()
    void[0:2] = 255
    j, _ = metrics.score_sequence(_seq(two, void, void), _seq(two, two, two))
    assert np.allclose(j, 1.0)
    j, _ = metrics.score_sequence(_seq(two, void, void), _seq(two, np.where(void == 255, 1, two), two))
    assert j[0, 0] < 1.0
    # an id the ground truth lacks
    with pytest.raises(ValueError, match="object id 3"):
        metrics.score_sequence(_seq(two, two, two), _seq(two, np.full((h, w), 3, np.uint8), two))
    with pytest.raises(ValueError, match="differs"):
        metrics.score_sequence(_seq(two, two, two), _seq(two, two))


def test_statistics_recall_decay_nan_aware():
    # 8 frames: bin edges round(linspace(1, 8, 5)) - 1 = [0, 2, 3, 5, 7] (4.5 rounds to even),
    # so the first bin is frames 0..2 (mean 2/3) and the last frames 5..7 (mean 0)
    mean, recall, decay = metrics.statistics(np.array([1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]))
    assert mean == 0.25 and recall == 0.25 and decay == pytest.approx(2 / 3, abs=1e-15)
    mean, _, _ = metrics.statistics(np.array([1.0, np.nan, 0.0]))
    assert mean == 0.5


def test_missing_result_frame_is_a_clear_error(shared_data, tmp_path):
    res = tmp_path / "res" / "motocross-jump"
    res.mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="00001.png"):
        metrics.score_davis(shared_data / "davis-multi", tmp_path / "res")
