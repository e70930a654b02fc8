"""DAVIS-2017 and YouTube-VOS folder layouts: palette PNG masks, sequence and frame listing.

One place knows the on-disk conventions (`JPEGImages/<res>/<seq>/*.jpg`,
`Annotations/<res>/<seq>/*.png`, `ImageSets/2017/<split>.txt`, YouTube-VOS `meta.json`),
so propagation, metrics and the evaluation CLI never build paths themselves.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image


def _voc_palette(n: int = 256) -> list[int]:
    """The PASCAL VOC / DAVIS colour map (bit-interleaved label ids), flattened RGB."""
    out: list[int] = []
    for label in range(n):
        r = g = b = 0
        c = label
        for shift in range(7, -1, -1):
            r |= ((c >> 0) & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        out += [r, g, b]
    return out


DAVIS_PALETTE: list[int] = _voc_palette()
IMAGE_EXTS = (".jpg", ".jpeg", ".png")


def load_mask(path: str | Path) -> np.ndarray:
    """A label-id PNG (palette or greyscale) -> np.uint8 [H,W]; a clear error for other modes."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"mask not found: {path}")
    with Image.open(path) as im:
        if im.mode not in ("P", "L"):
            raise ValueError(f"mask {path} has mode {im.mode}; expected a palette (P) or greyscale (L) PNG of object ids")
        return np.array(im, dtype=np.uint8)


def save_mask(path: str | Path, mask: np.ndarray) -> None:
    """Write object ids [H,W] (0..255) as a DAVIS palette PNG, creating parent folders."""
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.min(initial=0) < 0 or mask.max(initial=0) > 255:
        raise ValueError(f"save_mask({path}): expected [H,W] ids in 0..255, got shape {mask.shape}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(mask.astype(np.uint8), mode="P")
    im.putpalette(DAVIS_PALETTE)
    im.save(path)


def load_frame(path: str | Path) -> np.ndarray:
    """An RGB frame -> np.uint8 [H,W,3]."""
    with Image.open(path) as im:
        return np.array(im.convert("RGB"), dtype=np.uint8)


def _sorted_files(folder: Path, exts: tuple[str, ...]) -> list[Path]:
    """Files of `folder` with one of `exts`, sorted by name (DAVIS names are zero-padded)."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in exts)


def list_sequences(root: str | Path, split: str = "val", resolution: str = "480p") -> list[str]:
    """Sequence names of a DAVIS root from `ImageSets/2017/<split>.txt` (or all frame folders)."""
    root = Path(root)
    listing = root / "ImageSets" / "2017" / f"{split}.txt"
    if listing.is_file():
        return [line.strip() for line in listing.read_text().splitlines() if line.strip()]
    frames = root / "JPEGImages" / resolution
    if not frames.is_dir():
        raise FileNotFoundError(f"not a DAVIS root: neither {listing} nor {frames} exists")
    return sorted(p.name for p in frames.iterdir() if p.is_dir())


def sequence_frames(root: str | Path, sequence: str, resolution: str = "480p") -> list[Path]:
    """The frame images of one DAVIS sequence, in order."""
    folder = Path(root) / "JPEGImages" / resolution / sequence
    if not folder.is_dir():
        raise FileNotFoundError(f"sequence {sequence!r}: frame folder {folder} does not exist")
    frames = _sorted_files(folder, IMAGE_EXTS)
    if not frames:
        raise FileNotFoundError(f"sequence {sequence!r}: no frames in {folder}")
    return frames


def sequence_masks(root: str | Path, sequence: str, resolution: str = "480p") -> list[Path]:
    """The annotation PNGs of one DAVIS sequence, in order (may be only the first frame)."""
    folder = Path(root) / "Annotations" / resolution / sequence
    if not folder.is_dir():
        raise FileNotFoundError(f"sequence {sequence!r}: annotation folder {folder} does not exist")
    return _sorted_files(folder, (".png",))


def result_masks(results: str | Path, sequence: str) -> Path:
    """Folder of a results tree holding one sequence's PNGs (official layout `<results>/<seq>/`)."""
    return Path(results) / sequence


def load_meta(root: str | Path) -> dict[str, dict[str, list[str]]]:
    """YouTube-VOS `meta.json` -> {video: {object id: [frame names]}}."""
    path = Path(root) / "meta.json"
    if not path.is_file():
        raise FileNotFoundError(f"YouTube-VOS root {root} has no meta.json")
    meta = json.loads(path.read_text())
    if "videos" not in meta:
        raise KeyError(f"{path} lacks the key 'videos'")
    return {
        video: {oid: list(obj["frames"]) for oid, obj in entry.get("objects", {}).items()}
        for video, entry in meta["videos"].items()
    }


def ytvos_frames(root: str | Path, video: str) -> list[Path]:
    """The frame images of one YouTube-VOS video (`<root>/JPEGImages/<video>/`), in order."""
    folder = Path(root) / "JPEGImages" / video
    if not folder.is_dir():
        raise FileNotFoundError(f"video {video!r}: frame folder {folder} does not exist")
    return _sorted_files(folder, IMAGE_EXTS)


def ytvos_masks(root: str | Path, video: str) -> list[Path]:
    """The annotation PNGs of one YouTube-VOS video (first appearances of its objects)."""
    folder = Path(root) / "Annotations" / video
    if not folder.is_dir():
        raise FileNotFoundError(f"video {video!r}: annotation folder {folder} does not exist")
    return _sorted_files(folder, (".png",))
