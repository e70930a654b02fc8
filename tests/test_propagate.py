"""Label propagation: the original implementation's masks on the golden cases, later objects, streaming."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dulearn import synthetic
from dulearn.model import DenseNet
from dulearn.propagate import PropSettings, Propagator, propagate
from dulearn.views import normalize


def _golden(golden_dir):
    cases = sorted(golden_dir.glob("prop_case_*.pt"))
    assert cases, f"no prop_case_*.pt in {golden_dir}"
    return [torch.load(c, weights_only=True) for c in cases]


def reference_propagate(features, first_mask, *, context=20, radius=12, temperature=0.05, topk=10, later_masks=None, rows=1024):
    """The original release's algorithm, frame by frame (infer_vos.step_seg + LabelPropVOS_CRW).

    Each stream (frame 0, then every frame where new ids appear) scores its context
    [start, max(t-20, start), ..., t-1] with a dense affinity, the recent frames masked by
    -1e10 outside the radius; the streams' predictions are merged as step_seg does.
    Query rows are chunked only to bound memory (the original chunks by 100).
    """
    n, _, h, w = features.shape
    dt, size, dev = features.dtype, first_mask.shape, features.device
    yy, xx = torch.meshgrid(torch.arange(h, device=dev), torch.arange(w, device=dev), indexing="ij")
    dist = ((yy.reshape(-1, 1) - yy.reshape(1, -1)) ** 2 + (xx.reshape(-1, 1) - xx.reshape(1, -1)) ** 2).double().sqrt()
    far = torch.where(dist < radius, 0.0, -1e10).to(dt)  # [hw_key, hw_query]
    annotations = {t: a.to(dev) for t, a in {0: first_mask, **(later_masks or {})}.items()}
    known, inits = set(), {}
    for t in sorted(annotations):
        new = sorted(set(annotations[t].unique().tolist()) - known)
        known.update(new)
        if new:
            inits[t] = new
    m = max(known) + 1

    def one_hot(t):
        out = torch.zeros(1, m, *size, dtype=dt, device=dev)
        for c in inits[t]:
            out[0, c] = (annotations[t] == c).to(dt)
        return out

    down = lambda x: F.interpolate(x, (h, w), mode="bilinear", align_corners=True)
    labels = [down(one_hot(0))[0]]  # [M,h,w] per frame
    valid = {0: (labels[0].flatten(1).sum(-1) > 0).to(dt)}
    for t in range(1, n):
        q = features[t].flatten(1)  # [K,hw]
        merged = 0
        for s in list(valid):
            ctx = [s] + [max(tt, s) for tt in range(t - context, t)]
            keys = torch.stack([features[c].flatten(1) for c in ctx], 1)  # [K,C,hw]
            lbl = torch.stack([labels[c].flatten(1) for c in ctx], 1).flatten(1)  # [M,C*hw]
            pred = []
            for r0 in range(0, h * w, rows):
                aff = torch.einsum("kcn,kq->cnq", keys, q[:, r0 : r0 + rows])  # [C,hw,rows]
                aff[1:] += far[:, r0 : r0 + rows]
                aff = aff.flatten(0, 1) / temperature
                wts, ids = aff.topk(topk, dim=0)
                wts = F.softmax(wts, dim=0)
                pred.append((lbl[:, ids] * wts[None]).sum(1))  # [M,rows]
            merged = merged + valid[s][:, None] * torch.cat(pred, 1)
        merged = merged.view(m, h, w)
        if t in inits:
            new = one_hot(t)
            new_dn = down(new)[0]
            cover = new_dn.sum(0, keepdim=True)
            merged = (1 - cover) * merged + cover * new_dn
            valid[t] = (new.flatten(2).sum(-1) > 0).to(dt)[0]
        labels.append(merged)
    up = F.interpolate(torch.stack(labels), size, mode="bilinear", align_corners=True)
    return up.argmax(1).to(torch.uint8)


def test_golden_cases_every_pixel(golden_dir):
    for case in _golden(golden_dir):
        kw = {k: case[k] for k in ("context", "radius", "temperature", "topk")}
        out = propagate(case["features"], case["first_mask"], **kw)
        assert out.shape == case["masks"].shape
        assert torch.equal(out, case["masks"].to(out.dtype)), f"{int((out != case['masks']).sum())} pixels differ"
        # small memory budget (query rows chunked, one frame per batch) on a causal prefix
        small = propagate(case["features"][:8], case["first_mask"], **kw, max_elems=30000)
        assert torch.equal(small, out[:8])


def test_windowed_path_matches_reference_on_a_larger_grid():
    """A grid large enough for the tiled-window path (and an odd size, padding the tiles)."""
    torch.manual_seed(0)
    n, h, w = 12, 26, 31
    feats = F.normalize(torch.randn(n, 8, h, w, dtype=torch.float64).cumsum(0), dim=1)
    mask = torch.zeros(h * 4, w * 4, dtype=torch.long)
    mask[20:60, 30:70], mask[70:100, 80:120] = 1, 2
    out = propagate(feats, mask, context=6, radius=5)
    ref = reference_propagate(feats, mask, context=6, radius=5)
    assert torch.equal(out, ref)
    assert set(out[-1].unique().tolist()) <= {0, 1, 2}


def test_later_object_starts_its_own_propagation(golden_dir):
    case = _golden(golden_dir)[0]
    feats, full = case["features"], case["first_mask"]
    first = torch.where(full == 2, 0, full)  # object 2 is absent from frame 0 ...
    start = 7
    later = {start: torch.where(case["masks"][start].long() == 2, 2, 0)}  # ... and annotated at frame 7
    out = propagate(feats, first, later_masks=later)
    assert not (out[:start] == 2).any(), "the later object leaked into frames before its annotation"
    assert (out[start] == 2).sum() >= 0.9 * (later[start] == 2).sum()
    assert (out[start + 1 : start + 6] == 2).flatten(1).any(1).all(), "the later object was not propagated"
    assert torch.equal(out, reference_propagate(feats, first, later_masks=later))
    # smaller frame batches (chunk boundaries elsewhere than at the start frame) give the same
    assert torch.equal(out[:12], propagate(feats[:12], first, later_masks=later, max_elems=120000))


def test_float32_and_many_objects():
    torch.manual_seed(1)
    feats = F.normalize(torch.randn(6, 4, 10, 12), dim=1)
    mask = torch.arange(40 * 48).view(40, 48) % 7  # 7 ids, background included
    out = propagate(feats, mask, topk=5)
    assert out.dtype == torch.uint8 and out.shape == (6, 40, 48)
    assert torch.equal(out, reference_propagate(feats, mask, topk=5))


def test_bad_arguments():
    feats = torch.zeros(3, 4, 2, 2)
    with pytest.raises(ValueError, match="topk"):
        propagate(feats, torch.zeros(8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="later mask"):
        propagate(feats, torch.zeros(8, 8, dtype=torch.long), topk=2, later_masks={1: torch.zeros(4, 4, dtype=torch.long)})


def _streamed(feats, first, batches, **kw):
    """Propagator fed with consecutive batches of the given sizes (the rest in the last one)."""
    prop = Propagator(first, later_masks=kw.pop("later_masks", None), settings=PropSettings(**kw))
    out, t = [], 0
    for size in batches:
        out.append(prop.push(feats[t : t + size]))
        t += size
    out.append(prop.push(feats[t:]))
    out.append(prop.finish())
    return torch.cat(out)


def test_streaming_gives_the_batched_masks_on_the_golden_cases(golden_dir):
    case = _golden(golden_dir)[0]
    kw = {k: case[k] for k in ("context", "radius", "temperature", "topk")}
    feats, first = case["features"], case["first_mask"]
    for batches in ([1] * 29, [8, 8, 8], [2, 13, 1, 5]):
        assert torch.equal(_streamed(feats, first, batches, **kw), case["masks"].to(torch.uint8)), batches
    # later objects and small chunks (max_elems): chunk ends at the start frame whatever the batches
    first2 = torch.where(first == 2, 0, first)
    later = {7: torch.where(case["masks"][7].long() == 2, 2, 0)}
    batched = propagate(feats, first2, later_masks=later, max_elems=120000, **kw)
    for batches in ([1] * 29, [7, 1, 3]):
        assert torch.equal(_streamed(feats, first2, batches, later_masks=later, max_elems=120000, **kw), batched), batches


def test_streaming_on_a_synthetic_video_with_a_later_object():
    """Random-init features of a rendered video: streamed = batched = the original algorithm, object 2 from frame 9."""
    video = synthetic.make_video(3, 0, frames=30, size=(64, 96), objects=(2, 2))
    torch.manual_seed(0)
    with torch.no_grad():
        x = normalize(torch.from_numpy(video.frames).permute(0, 3, 1, 2))  # [T,3,H,W]
        feats = DenseNet().eval()(x, layers=("res4",))["res4"].double()  # [T,512,8,12]
    masks = torch.from_numpy(video.masks).long()
    first, later = torch.where(masks[0] == 2, 0, masks[0]), {9: torch.where(masks[9] == 2, 2, 0)}
    assert (later[9] == 2).any()
    kw = dict(context=6, radius=4, topk=5)
    batched = propagate(feats, first, later_masks=later, **kw)
    assert torch.equal(batched, reference_propagate(feats, first, later_masks=later, **kw))
    for batches in ([1] * 30, [10, 10]):
        assert torch.equal(_streamed(feats, first, batches, later_masks=later, **kw), batched), batches
    assert not (batched[:9] == 2).any() and (batched[9:] == 2).any()


def test_streaming_holds_a_bounded_window():
    """However long the video, the propagator holds the context window, a chunk or two and the start frames."""
    torch.manual_seed(2)
    settings = PropSettings(context=5, radius=3, topk=4, max_elems=6000)  # chunks of 5 frames on a 6x8 grid
    prop = Propagator(torch.zeros(24, 32, dtype=torch.long).index_fill_(0, torch.arange(8), 1), settings=settings)
    held, done = [], 0
    for _ in range(300):
        done += len(prop.push(F.normalize(torch.randn(1, 4, 6, 8), dim=1)))
        held.append(prop.held_frames)
    done += len(prop.finish())
    assert done == 300
    chunk = prop._chunk
    assert chunk == 5 and max(held) <= settings.context + 2 * chunk + 1, max(held)
    assert prop._labels.shape[0] == (settings.context + chunk + 1) * 6 * 8  # a fixed ring of soft labels
