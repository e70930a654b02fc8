"""DAVIS-2017 semi-supervised metrics (docs/method.md, Metrics), as the official evaluator computes them.

J (region IoU) and F (boundary F-measure) per object and frame, then per object the mean,
recall and decay, and dataset means over objects. Vectorised over objects and frames in
torch; the boundary dilation is a convolution with a disk kernel (CPU or GPU).

CLI: `python -m dulearn.metrics --davis ROOT --results DIR [--sequences a,b] [--csv OUT]`.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dulearn import davis

COLUMNS = ("J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay")
VOID = 255


Mask = torch.Tensor | np.ndarray  # boolean [...,H,W]; numpy on the CPU, where its slicing ORs are much faster


def _copy(x: Mask) -> Mask:
    return x.copy() if isinstance(x, np.ndarray) else x.clone()


def _count(x: Mask) -> torch.Tensor:
    """Number of set pixels per map [...,H,W] -> float64 [...] (a torch tensor)."""
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x.sum(axis=(-2, -1), dtype=np.int64)).double()
    return x.count_nonzero((-2, -1)).double()


def _fast(x: torch.Tensor) -> Mask:
    """CPU tensors as numpy views (no copy), device tensors as they are."""
    return x.numpy() if x.device.type == "cpu" else x


def jaccard(gt: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """IoU of boolean masks [...,H,W] -> [...] (float64); 1 where both are empty."""
    g, p = _fast(gt), _fast(pred)
    inter, union = _count(g & p), _count(g | p)
    return torch.where(union == 0, torch.ones_like(union), inter / union.clamp(min=1)).to(gt.device)


def seg2bmap(mask: Mask) -> Mask:
    """Boundary map of boolean masks [...,H,W]: XOR with the east, south and south-east neighbours."""
    east, south, se = _copy(mask), _copy(mask), _copy(mask)
    east[..., :, :-1], east[..., :, -1] = mask[..., :, 1:], False
    south[..., :-1, :], south[..., -1, :] = mask[..., 1:, :], False
    se[..., :-1, :-1], se[..., -1, :], se[..., :, -1] = mask[..., 1:, 1:], False, False
    b = (mask ^ east) | (mask ^ south) | (mask ^ se)
    b[..., -1, :] = mask[..., -1, :] ^ east[..., -1, :]
    b[..., :, -1] = mask[..., :, -1] ^ south[..., :, -1]
    b[..., -1, -1] = False
    return b


def dilate(mask: Mask, radius: int) -> Mask:
    """Binary dilation of boolean masks [...,H,W] by the disk of `radius` (dy^2 + dx^2 <= r^2).

    The disk is a union of horizontal runs: row offset dy ORs in the mask dilated
    horizontally by a = floor(sqrt(r^2 - dy^2)), shifted by dy. The runs of every width
    grow by two shifted ORs each, so a map costs about 4r+1 vectorised ORs, not (2r+1)^2.
    """
    h = mask.shape[-2]
    runs = [mask]
    for a in range(1, radius + 1):
        run = _copy(runs[-1])
        run[..., a:] |= mask[..., :-a]
        run[..., :-a] |= mask[..., a:]
        runs.append(run)
    out = _copy(runs[radius])
    for dy in range(1, radius + 1):
        row = runs[math.isqrt(radius * radius - dy * dy)]
        out[..., : h - dy, :] |= row[..., dy:, :]
        out[..., dy:, :] |= row[..., : h - dy, :]
    return out


def _crop(gb: Mask, pb: Mask, margin: int) -> tuple[Mask, Mask]:
    """Crop both boundary batches to the box around all their pixels plus `margin` (counts are unchanged)."""
    both = gb | pb
    rows = both.any(-1).any(0) if isinstance(both, np.ndarray) else both.any(-1).any(0).cpu().numpy()
    cols = both.any(-2).any(0) if isinstance(both, np.ndarray) else both.any(-2).any(0).cpu().numpy()
    if not rows.any():
        return gb[..., :1, :1], pb[..., :1, :1]
    (y0, y1), (x0, x1) = (np.flatnonzero(rows)[[0, -1]], np.flatnonzero(cols)[[0, -1]])
    box = (..., slice(max(0, y0 - margin), y1 + margin + 1), slice(max(0, x0 - margin), x1 + margin + 1))
    return gb[box], pb[box]


def f_measure(gt: torch.Tensor, pred: torch.Tensor, bound_th: float = 0.008, chunk: int = 16) -> torch.Tensor:
    """Boundary F-measure of boolean masks [B,H,W] -> [B] (float64), in chunks of B (numpy on the CPU)."""
    h, w = gt.shape[-2:]
    r = int(bound_th if bound_th >= 1 else math.ceil(bound_th * math.hypot(h, w)))
    out = []
    for i in range(0, gt.shape[0], chunk):
        gb, pb = _crop(seg2bmap(_fast(gt[i : i + chunk])), seg2bmap(_fast(pred[i : i + chunk])), r)
        n_gt, n_pr = _count(gb), _count(pb)
        pr_match, gt_match = _count(pb & dilate(gb, r)), _count(gb & dilate(pb, r))
        # an empty boundary scores 1; matches against an empty boundary are 0 by construction
        precision = torch.where(n_pr == 0, torch.ones_like(n_pr), pr_match / n_pr.clamp(min=1))
        recall = torch.where(n_gt == 0, torch.ones_like(n_gt), gt_match / n_gt.clamp(min=1))
        denom = precision + recall
        out.append(torch.where(denom == 0, torch.zeros_like(denom), 2 * precision * recall / denom.clamp(min=1e-300)))
    return torch.cat(out).to(gt.device)


def statistics(values: np.ndarray) -> tuple[float, float, float]:
    """Mean, recall (fraction > 0.5) and decay (first minus last quarter) of per-frame values."""
    values = np.asarray(values, dtype=np.float64)
    ids = (np.round(np.linspace(1, len(values), 5) + 1e-10) - 1).astype(np.uint8)  # uint8 as the official code
    bins = [values[ids[i] : ids[i + 1] + 1] for i in range(4)]
    with warnings.catch_warnings():  # empty or all-NaN inputs give NaN, as in the official code
        warnings.simplefilter("ignore", RuntimeWarning)
        mean, recall = np.nanmean(values), np.nanmean(values > 0.5)
        decay = np.nanmean(bins[0]) - np.nanmean(bins[3])
    return float(mean), float(recall), float(decay)


def object_masks(ids: torch.Tensor, n_objects: int) -> torch.Tensor:
    """Id maps [T,H,W] -> boolean object masks [O,T,H,W] for ids 1..O."""
    objs = torch.arange(1, n_objects + 1, device=ids.device).view(-1, 1, 1, 1)
    return ids[None] == objs.to(ids.dtype)


def score_sequence(gt: torch.Tensor, pred: torch.Tensor, *, name: str = "sequence") -> tuple[np.ndarray, np.ndarray]:
    """Ground truth and prediction ids [T,H,W] (all frames) -> J and F [O,T-2] (first/last skipped)."""
    gt = torch.where(gt == VOID, torch.zeros_like(gt), gt)
    if gt.shape != pred.shape:
        raise ValueError(f"{name}: prediction shape {tuple(pred.shape)} differs from ground truth {tuple(gt.shape)}")
    n_obj = int(gt[0].max())
    gt, pred = gt[1:-1], pred[1:-1]
    if pred.numel() and int(pred.max()) > n_obj:
        raise ValueError(f"{name}: the prediction has object id {int(pred.max())} but the ground truth has only {n_obj} object(s)")
    g, p = object_masks(gt, n_obj), object_masks(pred, n_obj)  # [O,T,H,W]
    j = jaccard(g, p)
    f = f_measure(g.flatten(0, 1), p.flatten(0, 1)).view(j.shape)
    return j.cpu().numpy(), f.cpu().numpy()


@dataclass
class Scores:
    """Per-object rows {object: {column: value}} and the dataset means."""

    rows: dict[str, dict[str, float]] = field(default_factory=dict)

    def add(self, sequence: str, j: np.ndarray, f: np.ndarray) -> None:
        """Add one sequence's per-object J and F curves [O,T]."""
        for o in range(j.shape[0]):
            jm, jr, jd = statistics(j[o])
            fm, fr, fd = statistics(f[o])
            self.rows[f"{sequence}_{o + 1}"] = dict(zip(COLUMNS, (jm, jr, jd, fm, fr, fd)))

    def summary(self) -> dict[str, float]:
        """Dataset means over objects, with J&F-Mean = (J-Mean + F-Mean) / 2."""
        if not self.rows:
            raise ValueError("no objects were scored")
        means = {c: float(np.nanmean([r[c] for r in self.rows.values()])) for c in COLUMNS}
        return {"J&F-Mean": (means["J-Mean"] + means["F-Mean"]) / 2, **means}

    def write_csv(self, path: str | Path) -> None:
        """Per-object rows and a last `ALL` row, with the columns of the official per-object CSV."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as fh:
            out = csv.writer(fh, lineterminator="\n")
            out.writerow(("object", *COLUMNS))
            for name, row in [*self.rows.items(), ("ALL", self.summary())]:
                out.writerow((name, *(f"{row[c]:.6f}" for c in COLUMNS)))

    def table(self) -> str:
        """A printable table of the rows and the means."""
        lines = [f"{'object':<28}" + "".join(f"{c:>10}" for c in COLUMNS)]
        for name, row in [*self.rows.items(), ("ALL", self.summary())]:
            lines.append(f"{name:<28}" + "".join(f"{row[c]:>10.4f}" for c in COLUMNS))
        lines.append(f"J&F-Mean: {self.summary()['J&F-Mean']:.6f}")
        return "\n".join(lines)


def load_ids(paths: Sequence[Path], device: torch.device | str = "cpu") -> torch.Tensor:
    """Palette PNGs -> ids [T,H,W] (uint8); a clear error when sizes differ."""
    masks = [davis.load_mask(p) for p in paths]
    for p, m in zip(paths, masks):
        if m.shape != masks[0].shape:
            raise ValueError(f"mask {p} has size {m.shape}, expected {masks[0].shape} like {paths[0]}")
    return torch.from_numpy(np.stack(masks)).to(device)


def score_davis(
    root: str | Path,
    results: str | Path,
    *,
    sequences: Sequence[str] | None = None,
    split: str = "val",
    resolution: str = "480p",
    device: torch.device | str = "cpu",
) -> Scores:
    """Score a results folder (`<results>/<seq>/<frame>.png`) against a DAVIS root."""
    scores = Scores()
    for seq in sequences or davis.list_sequences(root, split, resolution):
        gt_paths = davis.sequence_masks(root, seq, resolution)
        if not gt_paths:
            raise FileNotFoundError(f"sequence {seq!r}: no ground-truth masks in {Path(root) / 'Annotations' / resolution / seq}")
        res_dir = davis.result_masks(results, seq)
        res_paths = [res_dir / p.name for p in gt_paths]
        missing = [p for p in res_paths[1:-1] if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"sequence {seq!r}: result mask {missing[0]} is missing ({len(missing)} missing)")
        gt = load_ids(gt_paths, device)
        pred = torch.zeros_like(gt)  # first and last frame are not scored: no file needed
        if len(gt_paths) > 2:
            res = load_ids(res_paths[1:-1], device)
            if res.shape[1:] != gt.shape[1:]:
                raise ValueError(f"sequence {seq!r}: result {res_paths[1]} has size {tuple(res.shape[1:])}, the ground truth {tuple(gt.shape[1:])}")
            pred[1:-1] = res
        j, f = score_sequence(gt, pred, name=seq)
        scores.add(seq, j, f)
    return scores


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: score a DAVIS results folder, print the table and J&F-Mean, optionally write a CSV."""
    ap = argparse.ArgumentParser(prog="python -m dulearn.metrics", description=__doc__.splitlines()[0])
    ap.add_argument("--davis", required=True, help="DAVIS-2017 root (JPEGImages/, Annotations/, ImageSets/)")
    ap.add_argument("--results", required=True, help="results folder: <results>/<sequence>/<frame>.png")
    ap.add_argument("--sequences", default=None, help="comma-separated sequence names (default: the split)")
    ap.add_argument("--split", default="val")
    ap.add_argument("--resolution", default="480p")
    ap.add_argument("--csv", default=None, help="write per-object rows + ALL here")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    seqs = args.sequences.split(",") if args.sequences else None
    scores = score_davis(args.davis, args.results, sequences=seqs, split=args.split, resolution=args.resolution, device=args.device)
    print(scores.table())
    if args.csv:
        scores.write_csv(args.csv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
