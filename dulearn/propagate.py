"""Label propagation for semi-supervised video object segmentation (docs/method.md, Label propagation).

For every frame t the context is the start frame plus the previous `context` frames
(clamped at the start, so early frames repeat it), with their soft labels. The affinities
do not depend on the labels, so the top-k neighbours of a whole chunk of frames are found
in batched matrix products first; only the cheap weighted sum of labels runs frame by
frame. The radius restriction of the recent frames is exploited: each query tile is
compared with a window of keys around it instead of the whole frame, and frames repeated
by the clamping are scored once. The joint top-k over all context positions equals the
top-k of the per-frame top-k candidates, so the result is the original algorithm's.

Objects that first appear in a later frame (YouTube-VOS) start their own propagation
(a "stream") there; the streams' predictions are merged as the original release does.

`Propagator` takes the features a batch at a time and keeps only the frames still in
reach (stream starts and the last `context` frames), so a video of any length propagates
in bounded memory; `propagate` feeds it a whole feature tensor.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class PropSettings:
    """Propagation hyper-parameters (paper defaults) and the memory budget."""

    context: int = 20
    radius: float = 12.0
    temperature: float = 0.05
    topk: int = 10
    max_elems: int = 2**26  # largest affinity/window block, in elements

    @property
    def reach(self) -> int:
        """Largest per-axis offset inside the radius (offsets with distance < radius)."""
        return math.ceil(self.radius) - 1


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize with align_corners=True (the original's up- and downsampling)."""
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


class _Windows:
    """Tiling of an h x w grid into S x S query tiles and (S+2r) x (S+2r) key windows.

    Every query is scored against the window around its tile only (the radius is then
    applied as a -inf bias), one batched matrix product per key frame for all tiles and
    all query frames that use that key frame.
    """

    def __init__(self, h: int, w: int, reach: int, radius: float, device: torch.device, dtype: torch.dtype):
        self.h, self.w, self.r = h, w, reach
        self.s = s = _tile(reach)
        self.ny, self.nx = -(-h // s), -(-w // s)
        self.win = s + 2 * reach
        # key position (global index in the frame) of every window cell, -1 outside the frame
        pos = torch.arange(h * w, device=device, dtype=torch.float64).view(1, h, w) + 1  # [1,h,w]
        pos = self._unfold(pos)[:, 0].round().long() - 1  # [P,win^2]
        self.key_pos = pos.clamp(min=0)  # [P,win^2]
        qy, qx = torch.meshgrid(torch.arange(s, device=device), torch.arange(s, device=device), indexing="ij")
        ky, kx = torch.meshgrid(torch.arange(self.win, device=device), torch.arange(self.win, device=device), indexing="ij")
        dy = (ky.reshape(1, -1) - reach) - qy.reshape(-1, 1)  # [S^2,win^2]
        dx = (kx.reshape(1, -1) - reach) - qx.reshape(-1, 1)
        near = (dy**2 + dx**2).double().sqrt() < radius  # [S^2,win^2]
        ok = near[None] & (pos >= 0)[:, None, :]  # [P,S^2,win^2]
        self.bias = torch.zeros(ok.shape, device=device, dtype=dtype).masked_fill_(~ok, float("-inf"))[:, None]  # [P,1,S^2,win^2]
        self.elems = self.ny * self.nx * self.win**2 * s * s  # affinity elements per (query, key) frame pair

    def _unfold(self, key: torch.Tensor) -> torch.Tensor:
        """One frame [C,h,w] -> key windows [P,C,win^2] (zero outside the frame)."""
        c, r, s, win = key.shape[0], self.r, self.s, self.win
        x = F.pad(key[None], (r, r + self.nx * s - self.w, r, r + self.ny * s - self.h))[0]  # [C,Hp,Wp]
        hp, wp = x.shape[-2:]
        view = x.as_strided((self.ny, self.nx, c, win, win), (s * wp, s, hp * wp, wp, 1))  # [ny,nx,C,win,win]
        return view.reshape(self.ny * self.nx, c, win * win)  # [P,C,win^2] (one copy, rows contiguous)

    def prepare(self, q: torch.Tensor) -> torch.Tensor:
        """Query frames [T,C,h,w] -> tiles [P,T,S^2,C] (zero-padded)."""
        t, c = q.shape[:2]
        s = self.s
        x = F.pad(q, (0, self.nx * s - self.w, 0, self.ny * s - self.h))
        x = x.view(t, c, self.ny, s, self.nx, s).permute(2, 4, 0, 3, 5, 1)  # [ny,nx,T,S,S,C]
        return x.reshape(self.ny * self.nx, t, s * s, c)

    def _untile(self, x: torch.Tensor) -> torch.Tensor:
        """[P,T,S^2,k] -> [T,h*w,k], dropping the padding."""
        t, k, s = x.shape[1], x.shape[-1], self.s
        x = x.view(self.ny, self.nx, t, s, s, k).permute(2, 0, 3, 1, 4, 5)  # [T,ny,S,nx,S,k]
        x = x.reshape(t, self.ny * s, self.nx * s, k)[:, : self.h, : self.w]
        return x.reshape(t, self.h * self.w, k)

    def local_topk(self, tiles: torch.Tensor, ta: int, tb: int, key: torch.Tensor, tau: float, k: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k affinities of prepared query frames ta..tb-1 with one key frame [K,h,w], within the radius.

        Returns values [T',h*w,k] and key positions [T',h*w,k] within the key frame; `block`
        query frames at a time share one affinity block.
        """
        windows = self._unfold(key)  # [P,K,win^2], copied once for all query frames
        vals, pos = [], []
        for t_a in range(ta, tb, block):
            q = tiles[:, t_a : min(tb, t_a + block)]  # [P,T',S^2,K]
            p, t, s2, c = q.shape
            aff = torch.bmm(q.reshape(p, t * s2, c), windows).view(p, t, s2, -1)  # [P,T',S^2,win^2]
            v, sel = aff.div_(tau).add_(self.bias).topk(min(k, aff.shape[-1]), dim=-1)  # [P,T',S^2,k]
            vals.append(self._untile(v))
            pos.append(self._untile(self.key_pos[:, None, None, :].expand(-1, t, s2, -1).gather(-1, sel)))
        return torch.cat(vals), torch.cat(pos)


class _Dense:
    """Radius restriction as a full [hw,hw] bias: cheaper than windows on small grids."""

    def __init__(self, h: int, w: int, radius: float, device: torch.device, dtype: torch.dtype):
        yy, xx = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
        yy, xx = yy.reshape(-1), xx.reshape(-1)
        dist = ((yy[:, None] - yy[None]) ** 2 + (xx[:, None] - xx[None]) ** 2).double().sqrt()  # [hw,hw]
        self.bias = torch.zeros(dist.shape, device=device, dtype=dtype).masked_fill_(dist >= radius, float("-inf"))
        self.elems = h * w * h * w  # affinity elements per (query, key) frame pair

    def prepare(self, q: torch.Tensor) -> torch.Tensor:
        """Query frames [T,K,h,w] -> [T,hw,K]."""
        return q.flatten(2).transpose(1, 2)

    def local_topk(self, q: torch.Tensor, ta: int, tb: int, key: torch.Tensor, tau: float, k: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k affinities of prepared query frames ta..tb-1 with one key frame [K,h,w], within the radius."""
        out = [(q[t_a : min(tb, t_a + block)] @ key.flatten(1)).div_(tau).add_(self.bias).topk(min(k, q.shape[1]), dim=-1) for t_a in range(ta, tb, block)]
        return torch.cat([o[0] for o in out]), torch.cat([o[1] for o in out])


def _tile(reach: int) -> int:
    """Query tile side for a given reach: small tiles waste fewer keys, large ones batch better."""
    return max(4, (reach + 5) // 2)


def _restriction(h: int, w: int, cfg: PropSettings, device: torch.device, dtype: torch.dtype) -> _Windows | _Dense | None:
    """Windows around query tiles on large grids, a dense bias on small ones; None if nothing is in reach."""
    if cfg.reach < 0:
        return None
    if 2 * (_tile(cfg.reach) + 2 * cfg.reach) ** 2 >= h * w:
        return _Dense(h, w, cfg.radius, device, dtype)
    return _Windows(h, w, cfg.reach, cfg.radius, device, dtype)


def _global_topk(q: torch.Tensor, key: torch.Tensor, cfg: PropSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k affinities of queries q [T,K,h,w] over all positions of one key frame [K,h,w].

    Returns values [T,h*w,k] and key positions [T,h*w,k]; query rows are chunked to
    keep the affinity block under `cfg.max_elems`.
    """
    t, c, h, w = q.shape
    qf = q.flatten(2).transpose(1, 2)  # [T,hw,K]
    kf = key.flatten(1)  # [K,hw]
    rows = max(1, cfg.max_elems // max(1, t * h * w))
    vals, idx = [], []
    for r0 in range(0, h * w, rows):
        aff = (qf[:, r0 : r0 + rows] @ kf).div_(cfg.temperature)  # [T,rows,hw]
        v, i = aff.topk(cfg.topk, dim=-1)
        vals.append(v)
        idx.append(i)
    return torch.cat(vals, 1), torch.cat(idx, 1)


def _neighbours(q: torch.Tensor, t0: int, frames: Mapping[int, torch.Tensor], block_of: Callable[[int], int], start: int, cfg: PropSettings, near: _Windows | _Dense | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax weights [T,hw,k] and label rows (block*hw + pos) [T,hw,k] for query frames q [T,K,h,w] = t0..t0+T-1.

    The context of frame t has slot 0 = `start` (unrestricted) and slot d = max(t-d, start)
    for d = 1..context (radius-restricted). `frames` holds the features [K,h,w] of every frame
    in reach, `block_of` maps a frame to its block of rows in the label buffer. Each key frame
    is scored once against all query frames that use it, and its candidates are copied into
    every slot it fills (frames repeated by the clamping count once per slot, as in the original).
    """
    n_t, hw, k = q.shape[0], q.shape[-2] * q.shape[-1], cfg.topk
    t1 = t0 + n_t
    vals = torch.full((n_t, hw, cfg.context + 1, k), float("-inf"), dtype=q.dtype, device=q.device)  # [T,hw,slots,k]
    idx = torch.zeros(vals.shape, dtype=torch.long, device=q.device)
    v, p = _global_topk(q, frames[start], cfg)
    vals[:, :, 0], idx[:, :, 0] = v, block_of(start) * hw + p
    if near is not None:
        tiles = near.prepare(q)
        block = max(1, cfg.max_elems // near.elems)
        for c in range(max(start, t0 - cfg.context), t1 - 1):
            ta, tb = max(t0, c + 1), min(t1, c + cfg.context + 1)  # query frames with c in their context
            if ta >= tb:
                continue
            v, p = near.local_topk(tiles, ta - t0, tb - t0, frames[c], cfg.temperature, k, block)  # [T',hw,k]
            for j, t in enumerate(range(ta, tb)):
                slots = slice(t - c, t - c + 1) if c > start else slice(t - start, cfg.context + 1)
                vals[t - t0, :, slots] = v[j, :, None]
                idx[t - t0, :, slots] = block_of(c) * hw + p[j, :, None]
    best, sel = vals.flatten(2).topk(k, dim=-1)  # joint top-k over all context positions [T,hw,k]
    return F.softmax(best, dim=-1), idx.flatten(2).gather(-1, sel)


def _frame_chunk(h: int, w: int, cfg: PropSettings) -> int:
    """Query frames per batch: their context candidates [T,hw,context+1,k] fit `max_elems`.

    Larger batches share each key frame's window copy among more query frames.
    """
    per_frame = h * w * (cfg.context + 1) * cfg.topk
    return max(1, min(32, cfg.max_elems // per_frame))


def _one_hot(ids: torch.Tensor, channels: torch.Tensor, m: int, dtype: torch.dtype) -> torch.Tensor:
    """Id map [H,W] -> [1,M,H,W] one-hot restricted to `channels` (other channels zero)."""
    out = torch.zeros((1, m, *ids.shape), dtype=dtype, device=ids.device)
    for c in channels.tolist():
        out[0, c] = (ids == c).to(dtype)
    return out


def stream_starts(first_mask: torch.Tensor, later: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """Frame -> the ids first seen in that frame's annotation (frame 0 first, then in order)."""
    known: set[int] = set()
    out = {}
    for t, ids in sorted({0: first_mask, **dict(later)}.items()):
        new = sorted(set(torch.unique(ids).tolist()) - known)
        if new:
            out[t] = torch.tensor(new, device=ids.device)
            known.update(new)
    return out


class Propagator:
    """Label propagation fed with features as they are computed; hands back each frame's ids once final.

    It keeps only what later frames need: the features and soft labels of every stream's start
    frame and of the last `context` frames, plus at most one chunk of pushed frames waiting for
    a full batch of queries, so memory does not grow with the video. Frames are propagated in
    the same chunks whatever the sizes of the pushed batches, so the masks do not depend on them;
    `propagate` is this class fed with a whole feature tensor at once.
    """

    def __init__(self, first_mask: torch.Tensor, *, later_masks: Mapping[int, torch.Tensor] | None = None, settings: PropSettings = PropSettings()):
        if first_mask.dim() != 2:
            raise ValueError(f"first_mask must be [H,W] ids, got shape {tuple(first_mask.shape)}")
        later = {int(t): m for t, m in (later_masks or {}).items()}
        for t, m in later.items():
            if t <= 0 or m.shape != first_mask.shape:
                raise ValueError(f"later mask for frame {t}: expected a frame after 0 and shape {tuple(first_mask.shape)}, got shape {tuple(m.shape)}")
        self.cfg, self.size = settings, tuple(first_mask.shape)
        self.starts = stream_starts(first_mask, later)  # frame -> ids first seen there (where a stream starts)
        masks = {0: first_mask, **later}
        self._masks = {t: masks[t] for t in self.starts}
        self.m = int(max(int(ids.max()) for ids in self.starts.values())) + 1
        if self.m > 256:
            raise ValueError(f"object ids must be < 256 (palette PNGs), got {self.m - 1}")
        self.pushed = 0  # frames pushed so far
        self._next = 0  # next frame to propagate
        self._pending: list[torch.Tensor] = []  # pushed features [T,K,h,w] not propagated yet
        self._frames: dict[int, torch.Tensor] = {}  # frame -> features [K,h,w] still in reach

    def push(self, features: torch.Tensor) -> torch.Tensor:
        """Features [T,K,h,w] of the next T frames -> ids [T',H,W] (uint8) of the frames now final (T' may differ from T)."""
        out = []
        self.pushed += len(features)
        if self._next == 0 and len(features):
            out.append(self._begin(features[0]))
            features = features[1:]
        if len(features):
            self._pending.append(features)
        while self._waiting() and self._waiting() >= self._chunk_len():
            out.append(self._step(self._chunk_len()))
        return self._cat(out)

    def finish(self) -> torch.Tensor:
        """Propagate the frames still waiting -> their ids [T',H,W] (uint8); warns about annotations never reached."""
        if self.pushed == 0:
            raise ValueError("no frames to propagate")
        out = []
        while self._waiting():
            out.append(self._step(min(self._waiting(), self._chunk_len())))
        past = sorted(t for t in self._masks if t >= self.pushed)
        if past:
            warnings.warn(f"annotations of frame(s) {past} were never reached: the video has {self.pushed} frames")
        return self._cat(out)

    @property
    def held_frames(self) -> int:
        """Frames whose features are held (in reach or waiting): at most context + a chunk + the last pushed batch + the stream starts."""
        return len(self._frames) + self._waiting()

    def _begin(self, feat0: torch.Tensor) -> torch.Tensor:
        """Frame 0 [K,h,w]: set up the buffers and the first stream; returns frame 0's ids [1,H,W]."""
        _, h, w = feat0.shape
        cfg, dev, dt = self.cfg, feat0.device, feat0.dtype
        if cfg.topk > h * w:
            raise ValueError(f"topk={cfg.topk} exceeds the {h}x{w} feature grid")
        self._masks = {t: m.to(dev) for t, m in self._masks.items()}
        self.starts = {t: ids.to(dev) for t, ids in self.starts.items()}
        self._grid, self._near, self._chunk = (h, w), _restriction(h, w, cfg, dev, dt), _frame_chunk(h, w, cfg)
        self._ring = cfg.context + self._chunk  # blocks of recent frames in use at once: a chunk and its context
        self._fixed = {s: self._ring + i for i, s in enumerate(self.starts)}  # start frames keep their own block
        self._labels = torch.zeros(((self._ring + len(self.starts)) * h * w, self.m), dtype=dt, device=dev)  # [blocks*hw,M] soft labels
        init0 = _resize(_one_hot(self._masks[0], self.starts[0], self.m, dt), (h, w))[0]  # [M,h,w]
        self._set_labels(0, init0.flatten(1).T)
        self._valid = {0: (init0.flatten(1).sum(-1) > 0).to(dt)}  # stream start -> [M] channels it predicts
        self._frames[0] = feat0.clone()
        self._next = 1
        return self._output(0, 1)

    def _block(self, t: int) -> int:
        """Block of frame t in the label buffer: its own for a start frame, else a ring slot."""
        return self._fixed.get(t, t % self._ring)

    def _set_labels(self, t: int, labels: torch.Tensor) -> None:
        hw = self._grid[0] * self._grid[1]
        self._labels[self._block(t) * hw : (self._block(t) + 1) * hw] = labels  # [hw,M]

    def _waiting(self) -> int:
        return sum(len(p) for p in self._pending)

    def _chunk_len(self) -> int:
        """Frames of the next chunk: it ends at the next start frame, so a new stream predicts from the frame after it."""
        t0 = self._next
        return min(self._chunk, min((s + 1 for s in self.starts if s >= t0), default=t0 + self._chunk) - t0)

    def _take(self, n: int) -> torch.Tensor:
        """The next n pending frames' features [n,K,h,w] (a view when one pushed batch holds them)."""
        parts, got = [], 0
        while got < n:
            p = self._pending[0][: n - got]
            parts.append(p)
            got += len(p)
            self._pending[0] = self._pending[0][len(p) :]
            if not len(self._pending[0]):
                self._pending.pop(0)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _step(self, n: int) -> torch.Tensor:
        """Propagate the next n frames (one chunk) -> their ids [n,H,W]; forget frames out of reach."""
        q = self._take(n)  # [T,K,h,w]
        t0, t1 = self._next, self._next + n
        (h, w), dt, labels = self._grid, q.dtype, self._labels
        for j, t in enumerate(range(t0, t1)):
            self._frames[t] = q[j].clone() if t in self.starts else q[j]
        neigh = {s: _neighbours(q, t0, self._frames, self._block, s, self.cfg, self._near) for s in self._valid}
        for j, t in enumerate(range(t0, t1)):
            pred = sum(self._valid[s] * (wts[j, :, :, None] * labels[idx[j]]).sum(1) for s, (wts, idx) in neigh.items())  # [hw,M]
            if t in self.starts:
                new = _one_hot(self._masks[t], self.starts[t], self.m, dt)  # [1,M,H,W]
                new_dn = _resize(new, (h, w))[0].flatten(1).T  # [hw,M]
                cover = new_dn.sum(1, keepdim=True)  # [hw,1]
                pred = (1 - cover) * pred + cover * new_dn
                self._valid[t] = (new.flatten(2).sum(-1) > 0).to(dt)[0]
            self._set_labels(t, pred)
        self._next = t1
        for c in [c for c in self._frames if c < t1 - self.cfg.context and c not in self.starts]:
            del self._frames[c]
        return self._output(t0, t1)

    def _output(self, t0: int, t1: int) -> torch.Tensor:
        """Ids [T,H,W] of frames t0..t1-1 from their soft labels."""
        (h, w), hw = self._grid, self._grid[0] * self._grid[1]
        blocks = torch.tensor([self._block(t) for t in range(t0, t1)], device=self._labels.device)
        soft = self._labels.view(-1, hw, self.m)[blocks]  # [T,hw,M]
        return _upsample_argmax(soft.view(-1, h, w, self.m).permute(0, 3, 1, 2), self.size, self.cfg)

    def _cat(self, out: list[torch.Tensor]) -> torch.Tensor:
        if out:
            return torch.cat(out)
        return torch.zeros((0, *self.size), dtype=torch.uint8, device=self._labels.device if self._next else "cpu")


def propagate(
    features: torch.Tensor,
    first_mask: torch.Tensor,
    *,
    context: int = PropSettings.context,
    radius: float = PropSettings.radius,
    temperature: float = PropSettings.temperature,
    topk: int = PropSettings.topk,
    later_masks: Mapping[int, torch.Tensor] | None = None,
    max_elems: int = PropSettings.max_elems,
) -> torch.Tensor:
    """Propagate the first frame's ids [H,W] through features [N,K,h,w] -> ids [N,H,W] (uint8).

    `later_masks` maps a frame index to its annotation [H,W]; ids first seen there start
    their own propagation from that frame (YouTube-VOS). Computed in the features' dtype.
    """
    n = len(features)
    later = {int(t): m.to(features.device) for t, m in (later_masks or {}).items()}
    for t in later:
        if not 0 < t < n:
            raise ValueError(f"later mask for frame {t}: expected 0 < t < {n}")
    prop = Propagator(first_mask.to(features.device), later_masks=later, settings=PropSettings(context, float(radius), temperature, topk, max_elems))
    return torch.cat([prop.push(features), prop.finish()])


def _upsample_argmax(labels: torch.Tensor, size: tuple[int, int], cfg: PropSettings) -> torch.Tensor:
    """Soft labels [N,M,h,w] -> ids [N,H,W] (uint8) by bilinear upsampling and argmax, in chunks."""
    n, m = labels.shape[:2]
    step = max(1, cfg.max_elems // (m * size[0] * size[1]))
    out = [_resize(labels[i : i + step], size).argmax(1).to(torch.uint8) for i in range(0, n, step)]
    return torch.cat(out)
