"""Semi-supervised VOS evaluation: features -> label propagation -> masks -> J&F (docs/method.md, Label propagation, Metrics).

CLI (`python -m dulearn.evaluate --help`): a checkpoint (dulearn's own or the original
release's `.pth`; none = random init), DAVIS-2017 (`--davis ROOT`) or YouTube-VOS
(`--ytvos ROOT`, valid layout with meta.json). Writes palette PNGs in the official layout
(`OUT/Annotations/<seq>/<frame>.png`; YouTube-VOS: only the frames meta.json lists, plus
`OUT/Annotations.zip`), a per-object CSV, `summary.json`, one overlay video per sequence,
and prints a table. `evaluate_davis(model, root, ...)` is the in-process entry for
periodic evaluation from the training loop.
"""

from __future__ import annotations

import argparse
import itertools
import json
import pickle
import sys
import time
import warnings
import zipfile
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from dulearn import davis, metrics
from dulearn.checkpoint import load_latest
from dulearn.model import EVAL_LAYER, LAYERS, DenseNet, feat_dim_of, is_original_state, load_weights
from dulearn.propagate import PropSettings, Propagator
from dulearn.videoio import VideoSource, write_video
from dulearn.views import normalize

BATCH_FRAMES = 8  # frames per forward pass of the evaluated network


@dataclass
class Video:
    """One sequence to segment: its frames, annotations by frame index, what to score and write."""

    name: str
    frames: list[Path]
    annotations: dict[int, Path]  # frame index -> id PNG (frame 0, then YouTube-VOS first appearances)
    ground_truth: list[Path] | None = None  # every frame's mask (DAVIS), for scoring
    write: set[str] | None = None  # frame names (stems) to write; None = all


# ---------------------------------------------------------------- datasets


def davis_videos(root: str | Path, sequences: Sequence[str] | None = None, split: str = "val", resolution: str = "480p") -> list[Video]:
    """DAVIS-2017 sequences (the split's or the given ones); the first frame's mask is the input."""
    videos = []
    for name in sequences or davis.list_sequences(root, split, resolution):
        frames = davis.sequence_frames(root, name, resolution)
        masks = davis.sequence_masks(root, name, resolution)
        first = [m for m in masks if m.stem == frames[0].stem]
        if not first:
            raise FileNotFoundError(f"sequence {name!r}: no mask for its first frame {frames[0].name} in {Path(root) / 'Annotations' / resolution / name}")
        gt = masks if [m.stem for m in masks] == [f.stem for f in frames] else None
        videos.append(Video(name, frames, {0: first[0]}, ground_truth=gt))
    return videos


def ytvos_videos(root: str | Path, videos: Sequence[str] | None = None) -> list[Video]:
    """YouTube-VOS videos of meta.json: every annotation starts its new objects; write meta's frames."""
    meta = davis.load_meta(root)
    out = []
    for name in videos or sorted(meta):
        if name not in meta:
            raise KeyError(f"video {name!r} is not in {Path(root) / 'meta.json'}")
        frames = davis.ytvos_frames(root, name)
        index = {f.stem: i for i, f in enumerate(frames)}
        annotations = {}
        for m in davis.ytvos_masks(root, name):
            if m.stem not in index:
                raise FileNotFoundError(f"video {name!r}: annotation {m} has no frame {m.stem} in {frames[0].parent}")
            annotations[index[m.stem]] = m
        if 0 not in annotations:
            raise FileNotFoundError(f"video {name!r}: no annotation for its first frame {frames[0].name}")
        write = {f for obj_frames in meta[name].values() for f in obj_frames}
        out.append(Video(name, frames, annotations, write=write))
    return out


# ---------------------------------------------------------------- segmentation


def frame_source(video: Video) -> VideoSource:
    """The video's frame files as a source that reads them one at a time."""
    return VideoSource(video.frames[0].parent, tuple(video.frames), count=len(video.frames))


def _load_annotations(video: Video, size: tuple[int, int]) -> dict[int, torch.Tensor]:
    """Annotation PNGs -> ids [H,W] by frame index; a clear error if a mask's size differs from the frames'."""
    out = {}
    for t, path in video.annotations.items():
        mask = davis.load_mask(path)
        if mask.shape != size:
            raise ValueError(f"video {video.name!r}: mask {path} has size {mask.shape}, its frames {size}")
        out[t] = torch.from_numpy(mask)
    return out


@torch.no_grad()
def extract_features(model: DenseNet, frames: np.ndarray, *, layer: str = EVAL_LAYER, device: torch.device | str = "cpu", input_size: int = 0, batch_frames: int = BATCH_FRAMES) -> torch.Tensor:
    """uint8 frames [T,H,W,3] -> L2-normalised features [T,K,h,w] of `layer`, in batches of frames.

    input_size > 0 resizes so that the short side has that many pixels (the original's
    `scale_smallest`, bilinear with align_corners=True); 0 keeps the stored resolution.
    """
    if layer not in LAYERS:
        raise ValueError(f"layer must be one of {LAYERS}, got {layer!r}")
    feats = []
    for i in range(0, len(frames), batch_frames):
        x = torch.from_numpy(frames[i : i + batch_frames]).to(device).permute(0, 3, 1, 2)  # [B,3,H,W]
        x = normalize(x)
        if input_size > 0:
            h, w = x.shape[-2:]
            s = input_size / min(h, w)
            x = F.interpolate(x, (int(s * h), int(s * w)), mode="bilinear", align_corners=True)
        feats.append(model(x, layers=(layer,))[layer])  # [B,K,h,w]
    return torch.cat(feats)


def _batches(items: Iterable[np.ndarray], n: int) -> Iterator[list[np.ndarray]]:
    """Consecutive lists of n items (the last may be shorter)."""
    it = iter(items)
    while batch := list(itertools.islice(it, n)):
        yield batch


def segment_frames(model: DenseNet, frames: Iterable[np.ndarray], masks: Mapping[int, torch.Tensor], *, layer: str = EVAL_LAYER, device: torch.device | str = "cpu", input_size: int = 0, batch_frames: int = BATCH_FRAMES, settings: PropSettings = PropSettings()) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Segment a stream of uint8 frames [H,W,3] -> (frame, ids uint8 [H,W]) in order, each as soon as it is final.

    `masks` maps frame indices to annotations [H,W] (frame 0, then frames where new objects
    appear). Features are extracted `batch_frames` at a time and pushed into a Propagator,
    so memory holds only its context window and the frames waiting for their masks.
    """
    device = torch.device(device)
    prop = Propagator(masks[0].to(device), later_masks={t: m.to(device) for t, m in masks.items() if t > 0}, settings=settings)
    waiting: deque[np.ndarray] = deque()
    for batch in _batches(frames, batch_frames):
        waiting.extend(batch)
        feats = extract_features(model, np.stack(batch), layer=layer, device=device, input_size=input_size, batch_frames=batch_frames)
        for ids in prop.push(feats).cpu().numpy():
            yield waiting.popleft(), ids
    for ids in prop.finish().cpu().numpy():
        yield waiting.popleft(), ids


def segment(model: DenseNet, video: Video, *, layer: str = EVAL_LAYER, device: torch.device | str = "cpu", input_size: int = 0, batch_frames: int = BATCH_FRAMES, progress: bool = False, **prop_kwargs) -> tuple[np.ndarray, np.ndarray]:
    """Segment one video -> (frames uint8 [T,H,W,3], predicted ids uint8 [T,H,W]); prop_kwargs are PropSettings fields."""
    frames = frame_source(video).frames()
    first = next(frames)
    masks = _load_annotations(video, first.shape[:2])
    out_frames, out_ids = [], []
    with tqdm(total=len(video.frames), desc=video.name, unit="frame", disable=not progress, leave=False) as bar:
        for frame, ids in segment_frames(model, itertools.chain([first], frames), masks, layer=layer, device=device, input_size=input_size, batch_frames=batch_frames, settings=PropSettings(**prop_kwargs)):
            out_frames.append(frame)
            out_ids.append(ids)
            bar.update()
    return np.stack(out_frames), np.stack(out_ids)


# ---------------------------------------------------------------- outputs


def overlay(frames: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Blend the palette colours of the ids over the frames: uint8 [T,H,W,3]."""
    colours = np.asarray(davis.DAVIS_PALETTE, dtype=np.float32).reshape(-1, 3)[masks]  # [T,H,W,3]
    alpha = np.where(masks[..., None] > 0, 0.55, 0.0).astype(np.float32)
    return (frames * (1 - alpha) + colours * alpha).round().astype(np.uint8)


def write_masks(out_dir: Path, video: Video, pred: np.ndarray) -> list[Path]:
    """Palette PNGs `<out_dir>/Annotations/<video>/<frame>.png` (only `video.write` if set)."""
    written = []
    for path, mask in zip(video.frames, pred):
        if video.write is None or path.stem in video.write:
            target = out_dir / "Annotations" / video.name / f"{path.stem}.png"
            davis.save_mask(target, mask)
            written.append(target)
    return written


def write_zip(out_dir: Path) -> Path:
    """`<out_dir>/Annotations.zip` holding `Annotations/<video>/<frame>.png` (the YouTube-VOS upload)."""
    target = out_dir / "Annotations.zip"
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as zf:
        for png in sorted((out_dir / "Annotations").rglob("*.png")):
            zf.write(png, png.relative_to(out_dir).as_posix())
    return target


# ---------------------------------------------------------------- runs


def run(model: DenseNet, videos: Sequence[Video], *, out_dir: str | Path | None = None, video_format: str | None = "mp4", layer: str = EVAL_LAYER, device: torch.device | str = "cpu", input_size: int = 0, batch_frames: int = BATCH_FRAMES, progress: bool = False, **prop_kwargs) -> tuple[metrics.Scores, dict[str, float]]:
    """Segment, write and score videos; returns the per-object scores and the timing/summary dict."""
    was_training = model.training
    model.eval()
    out = Path(out_dir) if out_dir is not None else None
    scores, n_frames, busy = metrics.Scores(), 0, 0.0
    start = time.perf_counter()
    try:
        for video in videos:
            t0 = time.perf_counter()
            frames, pred = segment(model, video, layer=layer, device=device, input_size=input_size, batch_frames=batch_frames, progress=progress, **prop_kwargs)
            busy += time.perf_counter() - t0
            n_frames += len(frames)
            if video.ground_truth is not None:
                gt = metrics.load_ids(video.ground_truth)
                scores.add(video.name, *metrics.score_sequence(gt, torch.from_numpy(pred), name=video.name))
            if out is not None:
                write_masks(out, video, pred)
                if video_format:
                    write_video(out / "videos" / f"{video.name}.{video_format}", overlay(frames, pred))
    finally:
        model.train(was_training)
    wall = time.perf_counter() - start
    timing = {"frames": n_frames, "seconds": wall, "frames/s": n_frames / wall, "segment frames/s": n_frames / max(busy, 1e-9)}
    return scores, timing


def _summary(scores: metrics.Scores, timing: Mapping[str, float], videos: Sequence[Video]) -> dict:
    """Dataset means (when ground truth was available) plus timing and the sequence names."""
    summary = dict(scores.summary()) if scores.rows else {}
    return {**summary, **timing, "sequences": [v.name for v in videos], "per_object": scores.rows}


def evaluate_davis(
    model: DenseNet,
    root: str | Path,
    *,
    sequences: Sequence[str] | None = None,
    layer: str = EVAL_LAYER,
    device: torch.device | str = "cpu",
    out_dir: str | Path | None = None,
    split: str = "val",
    resolution: str = "480p",
    input_size: int = 0,
    batch_frames: int = BATCH_FRAMES,
    video_format: str | None = None,
    progress: bool = False,
    **prop_kwargs,
) -> dict:
    """Evaluate a model on DAVIS-2017 -> summary dict (J&F-Mean, J-Mean, F-Mean, recall, decay, frames/s).

    With `out_dir`, also writes the PNGs, `per-object.csv`, `summary.json` (and videos if
    `video_format`). The model's train/eval mode is restored afterwards.
    """
    videos = davis_videos(root, sequences, split, resolution)
    scores, timing = run(model, videos, out_dir=out_dir, video_format=video_format, layer=layer, device=device, input_size=input_size, batch_frames=batch_frames, progress=progress, **prop_kwargs)
    summary = _summary(scores, timing, videos)
    if out_dir is not None:
        _write_reports(Path(out_dir), scores, summary)
    return summary


def evaluate_ytvos(model: DenseNet, root: str | Path, out_dir: str | Path, *, videos: Sequence[str] | None = None, video_format: str | None = None, **kwargs) -> dict:
    """Segment a YouTube-VOS valid set into `out_dir` and zip `Annotations/` for the server."""
    vids = ytvos_videos(root, videos)
    scores, timing = run(model, vids, out_dir=out_dir, video_format=video_format, **kwargs)
    summary = _summary(scores, timing, vids)
    summary["zip"] = str(write_zip(Path(out_dir)))
    _write_reports(Path(out_dir), scores, summary)
    return summary


def _write_reports(out: Path, scores: metrics.Scores, summary: Mapping) -> None:
    """`summary.json` and, when anything was scored, `per-object.csv`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if scores.rows:
        scores.write_csv(out / "per-object.csv")


# ---------------------------------------------------------------- model and CLI


def _is_torch_file(path: Path) -> bool:
    """A torch.save file: a zip archive (torch >= 1.6) or a legacy pickle that starts with torch's magic number."""
    with open(path, "rb") as f:
        if zipfile.is_zipfile(f):
            return True
        f.seek(0)
        return f.read(4) == b"\x80\x02\x8a\n"


def _load_checkpoint_file(path: Path) -> Any:
    """A checkpoint file's contents; a run directory gives its latest usable checkpoint.

    Tensors-only loading first; an original-release file that pickles other Python objects
    is loaded in full after a warning (only load files you trust).
    """
    if path.is_dir():
        found = load_latest(path)
        if found is None:
            raise FileNotFoundError(f"no usable checkpoint in run directory {path}")
        return found[0]
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        if not _is_torch_file(path):
            raise ValueError(f"{path} is not a torch checkpoint file") from None
        warnings.warn(f"{path} holds more than tensors; loading it with weights_only=False")
        return torch.load(path, map_location="cpu", weights_only=False)


def build_model(checkpoint: str | Path | None = None, *, seed: int = 0, device: torch.device | str = "cpu") -> DenseNet:
    """A DenseNet from a dulearn or original-release checkpoint, or randomly initialised with `seed`."""
    if checkpoint is None:
        torch.manual_seed(seed)
        return DenseNet().to(device).eval()
    path = Path(checkpoint)
    ckpt = _load_checkpoint_file(path)
    if isinstance(ckpt, Mapping) and isinstance(ckpt.get("model"), Mapping):
        state, config = ckpt["model"], ckpt.get("config") or {}
    elif isinstance(ckpt, Mapping) and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        state, config = ckpt, {}
    else:
        keys = list(ckpt)[:8] if isinstance(ckpt, Mapping) else type(ckpt).__name__
        raise KeyError(f"checkpoint {path} has no 'model' state dict (found {keys})")
    model_cfg = config.get("model", {}) if isinstance(config, Mapping) else {}
    feat_dim = model_cfg.get("feat_dim") or feat_dim_of(state) or 128
    model = DenseNet(feat_dim=int(feat_dim), output_stride=int(model_cfg.get("output_stride", 8)))
    load_weights(model, state, allow_missing_head=is_original_state(state))  # an original release may lack the head
    return model.to(device).eval()


def add_prop_arguments(ap: argparse.ArgumentParser) -> None:
    """--context, --radius, --temperature, --topk with PropSettings' defaults (the paper's)."""
    ap.add_argument("--context", type=int, default=PropSettings.context, help="previous frames in the context (default: %(default)s)")
    ap.add_argument("--radius", type=float, default=PropSettings.radius, help="spatial radius (feature cells) on the previous frames (default: %(default)s)")
    ap.add_argument("--temperature", type=float, default=PropSettings.temperature, help="softmax temperature of the affinities (default: %(default)s)")
    ap.add_argument("--topk", type=int, default=PropSettings.topk, help="neighbours whose labels are averaged (default: %(default)s)")


def prop_settings(args: argparse.Namespace) -> PropSettings:
    """The PropSettings of parsed add_prop_arguments options."""
    return PropSettings(args.context, args.radius, args.temperature, args.topk)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m dulearn.evaluate", description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--checkpoint", default=None, help="dulearn checkpoint (dict with 'model', 'config'), a run directory (its latest checkpoint) or an original-release .pth; none = random init")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random init without --checkpoint")
    data = ap.add_mutually_exclusive_group(required=True)
    data.add_argument("--davis", default=None, help="DAVIS-2017 root (JPEGImages/, Annotations/, ImageSets/)")
    data.add_argument("--ytvos", default=None, help="YouTube-VOS valid root (JPEGImages/, Annotations/, meta.json)")
    ap.add_argument("--split", default="val", help="DAVIS ImageSets/2017/<split>.txt")
    ap.add_argument("--sequences", default=None, help="comma-separated sequences/videos instead of the split")
    ap.add_argument("--resolution", default="480p", help="DAVIS resolution folder")
    ap.add_argument("--input-size", type=int, default=0, help="resize frames to this short side before the network (0 = as stored)")
    ap.add_argument("--layer", default=EVAL_LAYER, choices=LAYERS)
    add_prop_arguments(ap)
    ap.add_argument("--batch-frames", type=int, default=BATCH_FRAMES, help="frames per network forward pass")
    ap.add_argument("--video", default="mp4", choices=("mp4", "gif", "none"), help="overlay video per sequence")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry: evaluate a checkpoint on DAVIS or YouTube-VOS, print the table and write the outputs."""
    args = _parser().parse_args(argv)
    model = build_model(args.checkpoint, seed=args.seed, device=args.device)
    seqs = args.sequences.split(",") if args.sequences else None
    kwargs = dict(
        layer=args.layer, device=args.device, input_size=args.input_size, batch_frames=args.batch_frames,
        video_format=None if args.video == "none" else args.video, progress=not args.no_progress,
        **asdict(prop_settings(args)),
    )
    if args.davis:
        summary = evaluate_davis(model, args.davis, sequences=seqs, split=args.split, resolution=args.resolution, out_dir=args.out, **kwargs)
        if summary["per_object"]:
            print(metrics.Scores(summary["per_object"]).table())
    else:
        summary = evaluate_ytvos(model, args.ytvos, args.out, videos=seqs, **kwargs)
    print(f"{summary['frames']} frames in {summary['seconds']:.1f} s ({summary['frames/s']:.2f} frames/s); outputs in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
