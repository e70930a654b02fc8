"""Procedural video with exact masks: dulearn's embedded dataset (no download needed).

Textured objects (ellipses, boxes, polygons, stars, blobs, crescents with noise, stripe,
checker and gradient textures) move, rotate, scale and wobble non-rigidly over a textured
world canvas; a camera pans and zooms over it, and the illumination drifts in brightness and
colour. Objects occlude each other in depth order and may leave the view. Every pixel an
object's colour lands on is that object's id in the mask, so the masks are exact. One `numpy.random.Generator` per video draws every parameter in a
fixed order: the same seed gives the same bytes.

Rendering is one `grid_sample` per layer over all frames at once (torch, CPU):
64 frames of 256x256 take a fraction of a second.

CLI:
    python -m dulearn.synthetic davis OUT --sequences N --frames F --size HxW --seed S
    python -m dulearn.synthetic videos OUT --videos N --frames F --size HxW --seed S
    python -m dulearn.synthetic preview OUT.png --seed S

The shard builder packs these videos too (its `synthetic` source, in shards/sources.py):
    python shards/build.py synthetic seed=0,videos=64,frames=48,size=256x256 --out DIR
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

SHAPES = ("ellipse", "box", "polygon", "star", "blob", "crescent")
TEXTURES = ("noise", "stripes", "checker", "gradient")


@dataclass(frozen=True)
class Scene:
    """Everything needed to render one video; arrays are float32, poses in canvas pixels."""

    size: tuple[int, int]  # (H, W) of the rendered frames
    background: np.ndarray  # [3,Hc,Wc] world canvas, RGB in [0,1]
    camera: np.ndarray  # [T,3] view centre x, y (canvas px) and zoom (view px per canvas px)
    sprites: np.ndarray  # [K,4,S,S] RGB + alpha of each object in its local frame [-1,1]^2
    pose: np.ndarray  # [K,T,5] centre x, y (canvas px), angle (rad), half-extents sx, sy
    wobble: np.ndarray  # [K,4] amplitude, spatial frequency, temporal frequency, phase
    light: np.ndarray  # [T,3] per-frame RGB gain: illumination that drifts in brightness and colour

    @property
    def frames(self) -> int:
        return int(self.camera.shape[0])


@dataclass(frozen=True)
class Video:
    """A rendered video: frames, masks (0 = background, k = object k, higher k in front)."""

    frames: np.ndarray  # [T,H,W,3] uint8
    masks: np.ndarray  # [T,H,W] uint8


# ---------------------------------------------------------------------------------------
# Textures and shapes (numpy, [-1,1]^2 local coordinates)


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates of an SxS raster in [-1,1] (x right, y down)."""
    c = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
    return np.meshgrid(c, c)  # each [S,S]


def _colours(rng: np.random.Generator, n: int) -> np.ndarray:
    """n random, fairly saturated RGB colours [n,3] with distinct hues (HSV sampled)."""
    h = (rng.random() + np.arange(n) / n + rng.uniform(-0.1, 0.1, n)) % 1.0
    s = rng.uniform(0.4, 1.0, n)
    v = rng.uniform(0.25, 1.0, n)
    k = (np.array([5.0, 3.0, 1.0])[None] + h[:, None] * 6) % 6  # [n,3]
    return (v[:, None] - v[:, None] * s[:, None] * np.clip(np.minimum(k, 4 - k), 0, 1)).astype(np.float32)


def _noise(rng: np.random.Generator, channels: int, size: tuple[int, int], cells: int, octaves: int) -> np.ndarray:
    """Fractal value noise [C,H,W] in about [0,1]: bicubic-upsampled random grids, halving amplitude."""
    out = np.zeros((channels, *size), np.float32)
    total = 0.0
    for o in range(octaves):
        n = cells * 2**o
        coarse = torch.from_numpy(rng.random((1, channels, n + 1, n + 1), dtype=np.float32))
        up = F.interpolate(coarse, size=size, mode="bicubic", align_corners=True)[0]  # [C,H,W]
        out += 0.5**o * up.numpy()
        total += 0.5**o
    return np.clip(out / total, 0, 1)


def _ramp(t: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """Map t in [0,1] [S,S] through a piecewise-linear colour ramp [n,3] -> [3,S,S]."""
    pos = np.clip(t, 0, 1) * (len(colours) - 1)
    i = np.minimum(pos.astype(np.int64), len(colours) - 2)
    f = (pos - i)[None]
    return colours[i].transpose(2, 0, 1) * (1 - f) + colours[i + 1].transpose(2, 0, 1) * f


def _texture(rng: np.random.Generator, kind: str, size: int) -> np.ndarray:
    """A procedural texture [3,S,S] in [0,1] of the given kind, with a fine noise grain."""
    x, y = _grid(size)
    a = rng.uniform(0, np.pi)
    u = x * np.cos(a) + y * np.sin(a)  # rotated axes
    v = -x * np.sin(a) + y * np.cos(a)
    colours = _colours(rng, int(rng.integers(2, 4)))
    if kind == "noise":
        t = _noise(rng, 1, (size, size), int(rng.integers(2, 6)), 4)[0]
        t = (t - t.min()) / (np.ptp(t) + 1e-6)
    elif kind == "stripes":
        t = 0.5 + 0.5 * np.tanh(rng.uniform(1, 6) * np.sin(np.pi * rng.uniform(2, 7) * u + rng.uniform(0, 6.3)))
    elif kind == "checker":
        f = rng.uniform(1.5, 5)
        t = ((np.floor(f * u + 10) + np.floor(f * v + 10)) % 2).astype(np.float32)
    elif kind == "gradient":
        t = (u + 1) / 2 if rng.random() < 0.5 else np.sqrt((x - rng.uniform(-1, 1)) ** 2 + (y - rng.uniform(-1, 1)) ** 2) / 2
    else:
        raise ValueError(f"unknown texture kind {kind!r}; expected one of {TEXTURES}")
    grain = _noise(rng, 3, (size, size), size // 8, 2) - 0.5  # [3,S,S]
    return np.clip(_ramp(t, colours) + 0.2 * grain, 0, 1).astype(np.float32)


def _shape(rng: np.random.Generator, kind: str, size: int) -> np.ndarray:
    """A binary silhouette [S,S] of the given kind, inside radius ~0.75 of [-1,1]^2."""
    x, y = _grid(size)
    r, th = np.hypot(x, y), np.arctan2(y, x)
    if kind == "ellipse":
        inside = r < 0.75
    elif kind == "box":
        p = rng.uniform(3, 10)
        inside = (np.abs(x) ** p + np.abs(y) ** p) ** (1 / p) < 0.7
    elif kind == "polygon":
        n = int(rng.integers(3, 7))
        edge = np.cos(np.pi / n) * 0.75
        inside = np.all([x * np.cos(a) + y * np.sin(a) < edge for a in 2 * np.pi * np.arange(n) / n], axis=0)
    elif kind == "star":
        n = int(rng.integers(4, 8))
        inside = r < 0.5 + 0.25 * np.cos(n * th)
    elif kind == "blob":
        m = np.arange(1, 6)[:, None, None]
        c = rng.normal(0, 0.12 / m, (2, 5, 1, 1))
        inside = r < 0.55 + np.sum(c[0] * np.cos(m * th) + c[1] * np.sin(m * th), axis=0)
    elif kind == "crescent":
        d = rng.uniform(0.3, 0.5)
        inside = (r < 0.75) & (np.hypot(x - d, y) > 0.75 - d * 0.6)
    else:
        raise ValueError(f"unknown shape kind {kind!r}; expected one of {SHAPES}")
    return inside.astype(np.float32)


def _sprite(rng: np.random.Generator, size: int) -> np.ndarray:
    """An object's RGBA raster [4,S,S]: a random shape filled with a random texture."""
    shape = _shape(rng, SHAPES[rng.integers(len(SHAPES))], size)
    return np.concatenate([_texture(rng, TEXTURES[rng.integers(len(TEXTURES))], size), shape[None]])


# ---------------------------------------------------------------------------------------
# Motion


def _smooth_path(rng: np.random.Generator, t: np.ndarray, start: float, speed: float, swing: float) -> np.ndarray:
    """A 1-D trajectory [T]: constant drift plus one slow sinusoid (smooth, occasionally reversing)."""
    w = rng.uniform(0.02, 0.12)
    phase = rng.uniform(0, 2 * np.pi)
    return start + speed * t + swing * (np.sin(w * t + phase) - np.sin(phase))


def _camera(rng: np.random.Generator, t: np.ndarray, size: tuple[int, int], canvas: tuple[int, int]) -> np.ndarray:
    """Camera path [T,3] (centre x, y, zoom) that keeps the view inside the canvas."""
    h, w = size
    zoom = np.exp(rng.uniform(-0.15, 0.15) + rng.uniform(-0.2, 0.2) * np.sin(rng.uniform(0.02, 0.06) * t + rng.uniform(0, 6.3)))
    cx = _smooth_path(rng, t, canvas[1] / 2, rng.uniform(-1.0, 1.0), rng.uniform(0, 0.15 * w))
    cy = _smooth_path(rng, t, canvas[0] / 2, rng.uniform(-0.6, 0.6), rng.uniform(0, 0.15 * h))
    half_w, half_h = w / 2 / zoom, h / 2 / zoom
    cx = np.clip(cx, half_w, canvas[1] - half_w)
    cy = np.clip(cy, half_h, canvas[0] - half_h)
    return np.stack([cx, cy, zoom], 1).astype(np.float32)


def _poses(rng: np.random.Generator, t: np.ndarray, camera: np.ndarray, size: tuple[int, int], k: int) -> np.ndarray:
    """Object poses [K,T,5]: start inside the first view, drift (some fast enough to leave), spin, breathe."""
    h, w = size
    side = min(h, w)
    z0 = camera[0, 2]
    out = np.empty((k, len(t), 5), np.float32)
    for i in range(k):
        x0 = camera[0, 0] + rng.uniform(-0.35, 0.35) * w / z0
        y0 = camera[0, 1] + rng.uniform(-0.35, 0.35) * h / z0
        speed = side * rng.choice([0.002, 0.005, 0.012], p=[0.4, 0.4, 0.2]) * rng.uniform(0.5, 1.5)
        heading = rng.uniform(0, 2 * np.pi)
        x = _smooth_path(rng, t, x0, speed * np.cos(heading), rng.uniform(0, 0.15) * side)
        y = _smooth_path(rng, t, y0, speed * np.sin(heading), rng.uniform(0, 0.15) * side)
        angle = rng.uniform(0, 2 * np.pi) + rng.uniform(-0.04, 0.04) * t
        extent = side * rng.uniform(0.1, 0.24) / z0
        aspect = np.exp(rng.uniform(-0.4, 0.4))
        breathe = 1 + rng.uniform(0, 0.25) * np.sin(rng.uniform(0.03, 0.15) * t + rng.uniform(0, 6.3))
        out[i] = np.stack([x, y, angle, extent * aspect * breathe, extent / aspect * breathe], 1)
    return out


def sample_scene(rng: np.random.Generator, *, frames: int = 48, size: tuple[int, int] = (256, 256),
                 objects: tuple[int, int] = (2, 4)) -> Scene:
    """Draw one scene: canvas, camera path, `objects` (inclusive range) textured sprites and their motion."""
    h, w = size
    if frames < 1 or h < 16 or w < 16:
        raise ValueError(f"synthetic video needs frames >= 1 and size >= 16x16, got {frames} frames of {h}x{w}")
    t = np.arange(frames, dtype=np.float32)
    canvas = (int(h * 1.8), int(w * 1.8))
    background = _background(rng, canvas, max(64, min(h, w) // 2))
    camera = _camera(rng, t, size, canvas)
    k = int(rng.integers(objects[0], objects[1] + 1))
    sprite_size = max(64, min(h, w) // 2)
    sprites = np.stack([_sprite(rng, sprite_size) for _ in range(k)])
    pose = _poses(rng, t, camera, size, k)
    wobble = np.stack([rng.uniform(0, 0.08, k), rng.uniform(2, 6, k), rng.uniform(0.1, 0.4, k),
                       rng.uniform(0, 2 * np.pi, k)], 1).astype(np.float32)
    return Scene(size, background, camera, sprites, pose, wobble, _light(rng, t))


def _light(rng: np.random.Generator, t: np.ndarray) -> np.ndarray:
    """Per-frame RGB gain [T,3]: a slow brightness swing times a slower colour-cast swing."""
    brightness = rng.uniform(0.1, 0.35) * np.sin(rng.uniform(0.05, 0.2) * t + rng.uniform(0, 6.3))  # [T]
    cast = rng.uniform(0, 0.2, 3) * np.sin(rng.uniform(0.03, 0.12, 3) * t[:, None] + rng.uniform(0, 6.3, 3))  # [T,3]
    return np.exp(brightness[:, None] + cast).astype(np.float32)


def _background(rng: np.random.Generator, canvas: tuple[int, int], sprite_size: int) -> np.ndarray:
    """World canvas [3,Hc,Wc]: colour noise blended with a pattern, plus static textured shapes."""
    hc, wc = canvas
    base = _ramp(_noise(rng, 1, canvas, 3, 5)[0] * 1.6 - 0.3, _colours(rng, 3))  # [3,Hc,Wc]
    pattern = F.interpolate(torch.from_numpy(_texture(rng, TEXTURES[rng.integers(len(TEXTURES))], sprite_size))[None],
                            size=canvas, mode="bilinear", align_corners=False)[0].numpy()
    img = 0.6 * base + 0.4 * pattern
    n = int(rng.integers(2, 7))
    sprites = torch.from_numpy(np.stack([_sprite(rng, sprite_size) for _ in range(n)]))  # [n,4,S,S]
    pose = np.stack([rng.uniform(0, wc, n), rng.uniform(0, hc, n), rng.uniform(0, 2 * np.pi, n),
                     *(np.full(n, min(canvas) * 0.1) * np.exp(rng.uniform(-0.5, 0.5, (2, n))))], 1)
    ys, xs = torch.meshgrid(torch.arange(hc, dtype=torch.float32), torch.arange(wc, dtype=torch.float32), indexing="ij")
    world = torch.stack([xs, ys], -1)[None]  # [1,Hc,Wc,2]
    out = torch.from_numpy(img.astype(np.float32))[None]  # [1,3,Hc,Wc]
    for i in range(n):
        rgb, alpha = _sample(sprites[i], _local(world, torch.from_numpy(pose[i][None].astype(np.float32))))
        out = torch.where(alpha > 0.5, rgb, out)
    return out[0].numpy()


# ---------------------------------------------------------------------------------------
# Rendering (torch, vectorised over frames)


def _view_grid(camera: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Canvas coordinates [T,H,W,2] (x, y) of every view pixel centre of every frame."""
    h, w = size
    ys = torch.arange(h, dtype=torch.float32) + 0.5 - h / 2
    xs = torch.arange(w, dtype=torch.float32) + 0.5 - w / 2
    inv = (1 / camera[:, 2])[:, None, None]  # [T,1,1]
    gx = camera[:, 0, None, None] - 0.5 + xs[None, None, :] * inv  # [T,1,W]
    gy = camera[:, 1, None, None] - 0.5 + ys[None, :, None] * inv  # [T,H,1]
    return torch.stack(torch.broadcast_tensors(gx, gy), -1)  # [T,H,W,2]


def _local(world: torch.Tensor, pose: torch.Tensor, wobble: torch.Tensor | None = None,
           time: torch.Tensor | None = None) -> torch.Tensor:
    """Object-local coordinates [T,H,W,2] in [-1,1]^2 of canvas points [T,H,W,2] for poses [T,5]."""
    d = world - pose[:, None, None, :2]  # [T,H,W,2]
    cos, sin = torch.cos(pose[:, 2])[:, None, None], torch.sin(pose[:, 2])[:, None, None]
    u = (cos * d[..., 0] + sin * d[..., 1]) / pose[:, 3, None, None]  # [T,H,W]
    v = (-sin * d[..., 0] + cos * d[..., 1]) / pose[:, 4, None, None]
    if wobble is not None:
        amp, freq, speed, phase = wobble.tolist()
        tt = time[:, None, None] * speed + phase  # [T,1,1]
        u, v = u + amp * torch.sin(freq * v + tt), v + amp * torch.sin(freq * u + 1.3 * tt)
    return torch.stack([u, v], -1)


def _sample(raster: torch.Tensor, coords: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample an RGBA raster [4,S,S] at normalised coords [T,H,W,2] -> (rgb [T,3,H,W], alpha [T,1,H,W])."""
    t, h, w, _ = coords.shape
    out = F.grid_sample(raster[None], coords.reshape(1, t * h, w, 2), mode="bilinear",
                        padding_mode="zeros", align_corners=False)  # [1,4,T*H,W]
    out = out.reshape(4, t, h, w).transpose(0, 1)  # [T,4,H,W]
    return out[:, :3], out[:, 3:]


def _layers(scene: Scene, world: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Per object, back to front: full silhouette [T,H,W] bool (before occlusion) and colours [T,3,H,W]."""
    time = torch.arange(scene.frames, dtype=torch.float32)
    for k in range(len(scene.sprites)):
        coords = _local(world, torch.from_numpy(scene.pose[k]), torch.from_numpy(scene.wobble[k]), time)
        rgb, alpha = _sample(torch.from_numpy(scene.sprites[k]), coords)
        yield alpha[:, 0] > 0.5, rgb


def silhouettes(scene: Scene) -> torch.Tensor:
    """Each object's full silhouette before occlusion [K,T,H,W] bool (to measure occlusion and exits)."""
    world = _view_grid(torch.from_numpy(scene.camera), scene.size)
    sils = [sil for sil, _ in _layers(scene, world)]
    return torch.stack(sils) if sils else torch.zeros((0, scene.frames, *scene.size), dtype=torch.bool)


def render(scene: Scene) -> Video:
    """Render all frames: background through the camera, then objects back to front with their ids."""
    h, w = scene.size
    hc, wc = scene.background.shape[1:]
    world = _view_grid(torch.from_numpy(scene.camera), scene.size)  # [T,H,W,2]
    norm = (world + 0.5) / torch.tensor([wc, hc], dtype=torch.float32) * 2 - 1
    bg = torch.from_numpy(np.concatenate([scene.background, np.ones((1, hc, wc), np.float32)]))
    frame, _ = _sample(bg, norm)  # [T,3,H,W]
    mask = torch.zeros(scene.frames, h, w, dtype=torch.uint8)
    for k, (sil, colours) in enumerate(_layers(scene, world)):
        frame = torch.where(sil[:, None], colours, frame)
        mask[sil] = k + 1
    frame = frame * torch.from_numpy(scene.light)[:, :, None, None]
    rgb = (frame.clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(0, 2, 3, 1)  # [T,H,W,3]
    return Video(np.ascontiguousarray(rgb.numpy()), mask.numpy())


def video_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of video `index` of a dataset seeded `seed` (independent of how many are drawn)."""
    return np.random.default_rng(np.random.SeedSequence([seed, index]))


def make_video(seed: int, index: int = 0, *, frames: int = 48, size: tuple[int, int] = (256, 256),
               objects: tuple[int, int] = (2, 4), min_visible: float = 0.002) -> Video:
    """Video `index` of dataset `seed`; scenes where an object is (nearly) hidden in frame 0 are redrawn.

    Every object is visible in the first frame (at least `min_visible` of the frame area), as a
    DAVIS first-frame annotation needs; later it may be occluded or leave.
    """
    rng = video_rng(seed, index)
    while True:
        scene = sample_scene(rng, frames=frames, size=size, objects=objects)
        first = render(_first_frame(scene))
        areas = np.bincount(first.masks.ravel(), minlength=len(scene.sprites) + 1)[1:] / first.masks.size
        if areas.min() >= min_visible:
            return render(scene)


def _first_frame(scene: Scene) -> Scene:
    """The scene cut to its first frame (a cheap visibility check)."""
    return Scene(scene.size, scene.background, scene.camera[:1], scene.sprites, scene.pose[:, :1], scene.wobble,
                 scene.light[:1])


def video_name(seed: int, index: int) -> str:
    """The name of video `index` of dataset `seed`: `synth-<seed>-<index:04d>`."""
    return f"synth-{seed}-{index:04d}"


def videos(seed: int, count: int, **kwargs) -> Iterator[tuple[str, Video]]:
    """(name, video) for videos 0..count-1 of dataset `seed` (names from video_name)."""
    for i in range(count):
        yield video_name(seed, i), make_video(seed, i, **kwargs)


def read_frames(seed: int, index: int, frames: int, size: tuple[int, int], objects: tuple[int, int]) -> Iterator[np.ndarray]:
    """The frames [H,W,3] uint8 of one video (picklable with functools.partial: the shard builder's reader)."""
    yield from make_video(seed, index, frames=frames, size=size, objects=objects).frames


# ---------------------------------------------------------------------------------------
# Writers


def write_davis(out: Path, *, sequences: int, frames: int, size: tuple[int, int], seed: int,
                objects: tuple[int, int] = (2, 4), quality: int = 90) -> list[str]:
    """Write a DAVIS-2017 layout (JPEGImages/480p, Annotations/480p, ImageSets/2017/val.txt)."""
    from PIL import Image

    from dulearn.davis import save_mask

    out = Path(out)
    names = []
    for name, video in videos(seed, sequences, frames=frames, size=size, objects=objects):
        img_dir, ann_dir = out / "JPEGImages/480p" / name, out / "Annotations/480p" / name
        img_dir.mkdir(parents=True, exist_ok=True)
        ann_dir.mkdir(parents=True, exist_ok=True)
        for t in range(frames):
            Image.fromarray(video.frames[t]).save(img_dir / f"{t:05d}.jpg", quality=quality)
            save_mask(ann_dir / f"{t:05d}.png", video.masks[t])
        names.append(name)
    sets = out / "ImageSets/2017"
    sets.mkdir(parents=True, exist_ok=True)
    (sets / "val.txt").write_text("".join(n + "\n" for n in names))
    return names


def write_mp4(path: Path, frames: np.ndarray, fps: int = 24, crf: int = 18) -> None:
    """Encode frames [T,H,W,3] uint8 as H.264 mp4 (even H and W) with PyAV."""
    import av

    t, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"mp4 frames need an even size, got {h}x{w}")
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": str(crf)}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def write_videos(out: Path, *, count: int, frames: int, size: tuple[int, int], seed: int,
                 objects: tuple[int, int] = (2, 4), fps: int = 24) -> list[Path]:
    """Write `count` mp4 files <out>/<name>.mp4 (a folder of videos any shard source can read)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, video in videos(seed, count, frames=frames, size=size, objects=objects):
        write_mp4(out / f"{name}.mp4", video.frames, fps)
        paths.append(out / f"{name}.mp4")
    return paths


def preview(video: Video, every: int = 8) -> np.ndarray:
    """A strip image [2H, n*W, 3]: every `every`-th frame above its mask (DAVIS palette colours)."""
    from dulearn.davis import DAVIS_PALETTE

    palette = np.asarray(DAVIS_PALETTE, np.uint8).reshape(-1, 3)
    idx = np.arange(0, len(video.frames), every)
    top = np.concatenate(list(video.frames[idx]), 1)
    bottom = np.concatenate(list(palette[video.masks[idx]]), 1)
    return np.concatenate([top, bottom], 0)


# ---------------------------------------------------------------------------------------
# CLI


def parse_hw(text: str) -> tuple[int, int]:
    """Parse HxW."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size must be HxW (e.g. 256x256), got {text!r}") from None
    return h, w


def parse_objects(text: str) -> tuple[int, int]:
    """Parse N or MIN-MAX."""
    lo, _, hi = text.partition("-")
    try:
        return int(lo), int(hi or lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--objects must be N or MIN-MAX, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    """CLI: write a DAVIS-layout dataset, a folder of mp4 videos, or a preview strip."""
    p = argparse.ArgumentParser(prog="python -m dulearn.synthetic", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in (("davis", "DAVIS-2017 layout with palette masks"), ("videos", "folder of mp4 files"),
                        ("preview", "PNG strip of frames above masks")):
        s = sub.add_parser(name, help=help_)
        s.add_argument("out", type=Path)
        s.add_argument("--frames", type=int, default=48)
        s.add_argument("--size", type=parse_hw, default=(256, 256), help="HxW")
        s.add_argument("--seed", type=int, default=0)
        s.add_argument("--objects", type=parse_objects, default=(2, 4), help="N or MIN-MAX objects per video")
        if name != "preview":
            s.add_argument("--sequences", "--videos", dest="count", type=int, default=8)
        else:
            s.add_argument("--index", type=int, default=0)
            s.add_argument("--every", type=int, default=8)
    a = p.parse_args(argv)
    kw = dict(frames=a.frames, size=a.size, seed=a.seed, objects=a.objects)
    if a.command == "davis":
        names = write_davis(a.out, sequences=a.count, **kw)
        print(f"wrote {len(names)} sequences to {a.out}")
    elif a.command == "videos":
        paths = write_videos(a.out, count=a.count, **kw)
        print(f"wrote {len(paths)} videos to {a.out}")
    else:
        from PIL import Image

        video = make_video(a.seed, a.index, frames=a.frames, size=a.size, objects=a.objects)
        Image.fromarray(preview(video, a.every)).save(a.out)
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
