"""Label propagation: the original implementation's masks on the golden cases, and later objects."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dulearn.propagate import propagate


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
