"""Label propagation for semi-supervised video object segmentation (DESIGN.md section 5).

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
"""

from __future__ import annotations

import math
from collections.abc import Mapping
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


def _neighbours(feats: torch.Tensor, t0: int, t1: int, start: int, cfg: PropSettings, near: _Windows | _Dense | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax weights [T,hw,k] and flat label indices (frame*hw + pos) [T,hw,k] for query frames t0..t1-1.

    The context of frame t has slot 0 = `start` (unrestricted) and slot d = max(t-d, start)
    for d = 1..context (radius-restricted). Each key frame is scored once against all query
    frames that use it, and its candidates are copied into every slot it fills (frames
    repeated by the clamping count once per slot, as in the original).
    """
    n_t, hw, k = t1 - t0, feats.shape[-2] * feats.shape[-1], cfg.topk
    q = feats[t0:t1]  # [T,K,h,w]
    vals = torch.full((n_t, hw, cfg.context + 1, k), float("-inf"), dtype=feats.dtype, device=feats.device)  # [T,hw,slots,k]
    idx = torch.zeros(vals.shape, dtype=torch.long, device=feats.device)
    v, p = _global_topk(q, feats[start], cfg)
    vals[:, :, 0], idx[:, :, 0] = v, start * hw + p
    if near is not None:
        tiles = near.prepare(q)
        block = max(1, cfg.max_elems // near.elems)
        for c in range(max(start, t0 - cfg.context), t1 - 1):
            ta, tb = max(t0, c + 1), min(t1, c + cfg.context + 1)  # query frames with c in their context
            if ta >= tb:
                continue
            v, p = near.local_topk(tiles, ta - t0, tb - t0, feats[c], cfg.temperature, k, block)  # [T',hw,k]
            for j, t in enumerate(range(ta, tb)):
                slots = slice(t - c, t - c + 1) if c > start else slice(t - start, cfg.context + 1)
                vals[t - t0, :, slots] = v[j, :, None]
                idx[t - t0, :, slots] = c * hw + p[j, :, None]
    best, sel = vals.flatten(2).topk(k, dim=-1)  # joint top-k over all context positions [T,hw,k]
    return F.softmax(best, dim=-1), idx.flatten(2).gather(-1, sel)


def _frame_chunk(feats: torch.Tensor, cfg: PropSettings) -> int:
    """Query frames per batch: their context candidates [T,hw,context+1,k] fit `max_elems`.

    Larger batches share each key frame's window copy among more query frames.
    """
    per_frame = feats.shape[-2] * feats.shape[-1] * (cfg.context + 1) * cfg.topk
    return max(1, min(32, cfg.max_elems // per_frame))


def _one_hot(ids: torch.Tensor, channels: torch.Tensor, m: int, dtype: torch.dtype) -> torch.Tensor:
    """Id map [H,W] -> [1,M,H,W] one-hot restricted to `channels` (other channels zero)."""
    out = torch.zeros((1, m, *ids.shape), dtype=dtype, device=ids.device)
    for c in channels.tolist():
        out[0, c] = (ids == c).to(dtype)
    return out


def _starts(first_mask: torch.Tensor, later: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """Frame -> the ids first seen in that frame's annotation (frame 0 first, then in order)."""
    known: set[int] = set()
    out = {}
    for t, ids in sorted({0: first_mask, **dict(later)}.items()):
        new = sorted(set(torch.unique(ids).tolist()) - known)
        if new:
            out[t] = torch.tensor(new, device=ids.device)
            known.update(new)
    return out


def propagate(
    features: torch.Tensor,
    first_mask: torch.Tensor,
    *,
    context: int = 20,
    radius: float = 12,
    temperature: float = 0.05,
    topk: int = 10,
    later_masks: Mapping[int, torch.Tensor] | None = None,
    max_elems: int = 2**26,
) -> torch.Tensor:
    """Propagate the first frame's ids [H,W] through features [N,K,h,w] -> ids [N,H,W] (uint8).

    `later_masks` maps a frame index to its annotation [H,W]; ids first seen there start
    their own propagation from that frame (YouTube-VOS). Computed in the features' dtype.
    """
    cfg = PropSettings(context, float(radius), temperature, topk, max_elems)
    n, _, h, w = features.shape
    if first_mask.dim() != 2:
        raise ValueError(f"first_mask must be [H,W] ids, got shape {tuple(first_mask.shape)}")
    if topk > h * w:
        raise ValueError(f"topk={topk} exceeds the {h}x{w} feature grid")
    later = {int(t): m.to(features.device) for t, m in (later_masks or {}).items()}
    for t, m in later.items():
        if not 0 < t < n or m.shape != first_mask.shape:
            raise ValueError(f"later mask for frame {t}: expected 0 < t < {n} and shape {tuple(first_mask.shape)}")
    starts = _starts(first_mask.to(features.device), later)
    masks = {0: first_mask.to(features.device), **later}
    dtype, size = features.dtype, tuple(first_mask.shape)
    m = int(max(int(ids.max()) for ids in starts.values())) + 1
    if m > 256:
        raise ValueError(f"object ids must be < 256 (palette PNGs), got {m - 1}")
    near = _restriction(h, w, cfg, features.device, dtype)

    hw = h * w
    labels = torch.zeros((n * hw, m), dtype=dtype, device=features.device)  # [N*hw,M] soft labels
    init0 = _resize(_one_hot(masks[0], starts[0], m, dtype), (h, w))[0]  # [M,h,w]
    labels[:hw] = init0.flatten(1).T
    valid = {0: (init0.flatten(1).sum(-1) > 0).to(dtype)}  # stream start -> [M] channels it predicts
    chunk = _frame_chunk(features, cfg)
    t0 = 1
    while t0 < n:
        # a chunk ends at the next start frame, so a new stream predicts from the frame after it
        t1 = min(n, t0 + chunk, min((s + 1 for s in starts if s >= t0), default=n))
        neigh = {s: _neighbours(features, t0, t1, s, cfg, near) for s in valid}
        for j, t in enumerate(range(t0, t1)):
            pred = sum(valid[s] * (wts[j, :, :, None] * labels[idx[j]]).sum(1) for s, (wts, idx) in neigh.items())
            labels[t * hw : (t + 1) * hw] = pred  # [hw,M]
            if t in starts:
                new = _one_hot(masks[t], starts[t], m, dtype)  # [1,M,H,W]
                new_dn = _resize(new, (h, w))[0].flatten(1).T  # [hw,M]
                cover = new_dn.sum(1, keepdim=True)  # [hw,1]
                labels[t * hw : (t + 1) * hw] = (1 - cover) * pred + cover * new_dn
                valid[t] = (new.flatten(2).sum(-1) > 0).to(dtype)[0]
        t0 = t1
    return _upsample_argmax(labels.view(n, h, w, m).permute(0, 3, 1, 2), size, cfg)


def _upsample_argmax(labels: torch.Tensor, size: tuple[int, int], cfg: PropSettings) -> torch.Tensor:
    """Soft labels [N,M,h,w] -> ids [N,H,W] (uint8) by bilinear upsampling and argmax, in chunks."""
    n, m = labels.shape[:2]
    step = max(1, cfg.max_elems // (m * size[0] * size[1]))
    out = [_resize(labels[i : i + step], size).argmax(1).to(torch.uint8) for i in range(0, n, step)]
    return torch.cat(out)
