"""Segment your own video: a video file or a frame folder and first-frame masks -> a mask per frame and overlay videos.

    dulearn segment VIDEO --mask FIRST.png --checkpoint CKPT --out DIR
    dulearn segment frames/ --mask first.png --mask 120:new-object.png --checkpoint runs/ytvos --out DIR

VIDEO is any file PyAV decodes (mp4, webm, mkv, avi, ...) or a folder of .jpg/.png frames
(in natural name order). A mask is a palette or greyscale PNG of object ids (0 =
background; 255 is void, except in a binary 0/255 mask, which is one new object);
`--mask FRAME:PATH` annotates a later frame (a 0-based index or a frame file stem) and
starts the objects first seen there. Writes `DIR/masks/<frame>.png` (DAVIS
palette PNGs; a folder's frames keep their names, a video file's are numbered 00000, ...),
`DIR/overlay.mp4` (masks over the frames), `DIR/side-by-side.mp4` (frame | overlay) and
`DIR/segment.json`. Frames are read, segmented and written a batch at a time and the
propagation keeps only its context window, so memory does not grow with the video's length.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from dulearn import davis
from dulearn.evaluate import BATCH_FRAMES, add_prop_arguments, build_model, overlay, prop_settings, segment_frames
from dulearn.fileio import atomic_write_bytes
from dulearn.model import EVAL_LAYER, LAYERS, DenseNet
from dulearn.propagate import PropSettings, stream_starts
from dulearn.videoio import VideoSource, VideoWriter, open_video

PROG = "dulearn segment"
VOID = 255
RANDOM = "random"  # --checkpoint value for the randomly initialised network


class InputError(ValueError):
    """Bad input found before any work starts (mask, frame reference, device, checkpoint)."""


def mask_frame(text: str, source: VideoSource) -> tuple[int, Path]:
    """A --mask value -> (frame index, PNG path): `PATH` is frame 0, `FRAME:PATH` names the frame (index or file stem)."""
    frame, sep, path = text.partition(":")
    if sep and (frame.isdigit() or frame in {f.stem for f in source.files}):
        return source.index(frame), Path(path)
    if sep and not Path(text).exists() and Path(path).is_file():
        raise InputError(f"--mask {text}: {source.path} has no frame {frame!r} (give a 0-based index or a frame file stem)")
    return 0, Path(text)


def read_mask(path: Path, size: tuple[int, int], binary_id: int = 1) -> np.ndarray:
    """A PNG of ids -> uint8 [H,W] of the frame size (nearest-neighbour resize with a warning); an error if it holds no object.

    255 is void (background), as in DAVIS, except in a binary 0/255 mask: that is one object, `binary_id`.
    """
    mask = davis.load_mask(path)
    binary = set(np.unique(mask).tolist()) == {0, VOID}
    mask = np.where(mask == VOID, binary_id if binary else 0, mask).astype(np.uint8)
    if not mask.any():
        raise InputError(f"mask {path} has no object (every pixel is 0, the background)")
    if mask.shape != size:
        warnings.warn(f"mask {path} is {mask.shape[0]}x{mask.shape[1]}, the frames {size[0]}x{size[1]}: resized (nearest neighbour)")
        mask = np.array(Image.fromarray(mask).resize((size[1], size[0]), Image.NEAREST))
        if not mask.any():
            raise InputError(f"mask {path} has no object left after resizing to {size[0]}x{size[1]}")
    return mask


def load_masks(specs: Sequence[str], source: VideoSource, size: tuple[int, int]) -> dict[int, torch.Tensor]:
    """--mask values -> ids [H,W] by frame index; frame 0 is all background when only later frames are annotated.

    A binary 0/255 mask is one new object: it gets the id after the largest of the earlier frames' masks.
    """
    given: dict[int, Path] = {}
    for text in specs:
        t, path = mask_frame(text, source)
        if t in given:
            raise InputError(f"two masks for frame {t} ({source.name(t)}): {given[t]} and {path}")
        if source.count and t >= source.count:
            raise InputError(f"mask {path} is for frame {t}, but {source.path} has {source.count} frames")
        given[t] = path
    out: dict[int, torch.Tensor] = {}
    for t in sorted(given):
        top = max((int(m.max()) for m in out.values()), default=0)
        out[t] = torch.from_numpy(read_mask(given[t], size, binary_id=top + 1))
    out.setdefault(0, torch.zeros(size, dtype=torch.uint8))
    starts = stream_starts(out[0], {t: m for t, m in out.items() if t > 0})
    for t in sorted(set(out) - set(starts) - {0}):
        warnings.warn(f"the mask of frame {t} ({source.name(t)}) has no object id that an earlier mask lacks: "
                      "it is ignored (a later mask only starts new objects)")
    return out


def segment_video(model: DenseNet, source: VideoSource, frames: Iterable[np.ndarray], masks: Mapping[int, torch.Tensor], out: Path, *,
                  settings: PropSettings = PropSettings(), layer: str = EVAL_LAYER, device: str = "cpu", input_size: int = 0,
                  batch_frames: int = BATCH_FRAMES, fps: float | None = None, progress: bool = False) -> dict:
    """Segment `frames` of `source` into `out`; every frame's PNG and video frames are written as soon as its mask is final."""
    start, n = time.perf_counter(), 0
    fps = fps or source.fps
    with (VideoWriter(out / "overlay.mp4", fps) as over, VideoWriter(out / "side-by-side.mp4", fps) as side,
          tqdm(total=source.count or None, desc=source.path.name, unit="frame", disable=not progress) as bar):
        for frame, ids in segment_frames(model, frames, masks, layer=layer, device=device, input_size=input_size,
                                         batch_frames=batch_frames, settings=settings):
            davis.save_mask(out / "masks" / f"{source.name(n)}.png", ids)
            blend = overlay(frame, ids)
            over.write(blend)
            side.write(np.concatenate([frame, blend], axis=1))
            n += 1
            bar.update()
    seconds = time.perf_counter() - start
    return {"video": str(source.path), "frames": n, "seconds": seconds, "frames/s": n / max(seconds, 1e-9), "fps": fps,
            "layer": layer, "input_size": input_size, "settings": asdict(settings),
            "outputs": {"masks": str(out / "masks"), "overlay": str(out / "overlay.mp4"), "side-by-side": str(out / "side-by-side.mp4")}}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("video", help="a video file (mp4 or anything PyAV reads) or a folder of frame images")
    ap.add_argument("--mask", action="append", required=True, metavar="MASK",
                    help="PATH: a PNG of object ids for frame 0; FRAME:PATH: for a later frame (0-based index or frame file stem; "
                         "a stem wins); repeat for objects that appear later. A mask of another size than the frames is "
                         "resized (nearest neighbour) with a warning; a mask with no object is an error")
    ap.add_argument("--checkpoint", required=True,
                    help="a dulearn run directory (its latest checkpoint), a dulearn checkpoint file or an original-release "
                         f".pth; {RANDOM!r}: the network at random initialisation (seed 0), the usual baseline")
    ap.add_argument("--out", required=True, type=Path, help="output folder")
    ap.add_argument("--input-size", type=int, default=480,
                    help="resize frames so that the short side has this many pixels before the network (0 = as stored; "
                         "masks and videos keep the video's size; default: %(default)s)")
    ap.add_argument("--layer", default=EVAL_LAYER, choices=LAYERS, help=f"feature layer (default: {EVAL_LAYER})")
    add_prop_arguments(ap)
    ap.add_argument("--batch-frames", type=int, default=BATCH_FRAMES, help=f"frames per network forward pass (default: {BATCH_FRAMES})")
    ap.add_argument("--fps", type=float, default=None, help="frame rate of the written videos (default: the video's; 24 for a folder)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or cuda:N (default: cuda if there is one)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def _model(checkpoint: str, device: str) -> DenseNet:
    """build_model with its failures (no such file, not a checkpoint, wrong keys or shapes) as one InputError line."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {device}: CUDA is not available on this machine")
    try:
        return build_model(None if checkpoint == RANDOM else checkpoint, device=device)
    except FileNotFoundError as e:
        raise InputError(str(e)) from None
    except Exception as e:  # torch.load's unpickling errors for files that are no checkpoint, load_weights' key errors
        reason = e.args[0] if isinstance(e, KeyError) and e.args else f"{e}"
        raise InputError(f"cannot load checkpoint {checkpoint}: {reason}") from None


def _warn_line(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one line each, above the progress bar."""
    tqdm.write(f"{PROG}: warning: {message}", file=sys.stderr)


def run(args: argparse.Namespace) -> dict:
    """Open the video, load masks and network (InputError on bad input), then segment into args.out."""
    source = open_video(args.video)
    frames = source.frames()
    first = next(frames)
    masks = load_masks(args.mask, source, first.shape[:2])
    model = _model(args.checkpoint, args.device)
    settings = prop_settings(args)
    summary = segment_video(model, source, itertools.chain([first], frames), masks, args.out, settings=settings,
                            layer=args.layer, device=args.device, input_size=args.input_size,
                            batch_frames=args.batch_frames, fps=args.fps, progress=not args.no_progress)
    given = (mask_frame(text, source) for text in args.mask)
    summary |= {"checkpoint": str(args.checkpoint), "masks": {source.name(t): str(path) for t, path in given}}
    atomic_write_bytes(args.out / "segment.json", (json.dumps(summary, indent=2) + "\n").encode())
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry; bad input (unreadable video, mask, checkpoint) is one line on stderr and exit status 2."""
    args = parser().parse_args(argv)
    with warnings.catch_warnings():
        warnings.showwarning = _warn_line
        try:
            summary = run(args)
        except (ValueError, OSError) as e:  # InputError, VideoError, unreadable or missing files
            print(f"{PROG}: error: {' '.join(str(e).split())}", file=sys.stderr)
            return 2
    print(f"{summary['frames']} frames in {summary['seconds']:.1f} s ({summary['frames/s']:.2f} frames/s): "
          f"masks in {summary['outputs']['masks']}, videos {summary['outputs']['overlay']} and {summary['outputs']['side-by-side']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
