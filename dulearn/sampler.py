"""Which videos each global batch holds: video-level epochs, distinct videos in every batch.

Every source's videos are walked in epochs; epoch e of source k is a permutation of its
videos drawn from (seed, k, e), the same on every rank. Global step t takes the next
``n_k(t)`` positions of source k's walk, where n_k(t) is how many of the G slots of the
global batch (B per rank x ranks, rank r holding slots r*B .. r*B+B-1) draw from source k
(one source: all G; several: a per-step draw with the mixing weights). A slice that does
not fit in the rest of the current permutation starts the next epoch instead: the few
videos left at the end of an epoch (fewer than one slice) wait for a later epoch. So no
global batch holds a video twice while a source has at least as many videos as the batch
draws from it; when it has fewer, the slice wraps and repeats are unavoidable (and counted).

The plan is a function of the step only, so resuming at any step is exact and costs
nothing for one source (closed form); for several sources the per-step counts are replayed
in vectorised blocks (about a second per million steps, once per worker).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

__all__ = ["Draw", "VideoSampler"]

BLOCK = 1024  # steps per vectorised draw of the slot sources


@dataclass(frozen=True)
class Draw:
    """One slot of a global batch: the source, the position in that source's walk, the video."""

    source: int
    position: int  # the n-th video drawn from this source so far (seeds the clip's augmentation)
    video: int  # index into the source's videos


class VideoSampler:
    """The videos of every global batch (see the module docstring)."""

    def __init__(self, videos: list[int], weights: list[float] | None, global_batch: int, seed: int):
        if min(videos) <= 0:
            raise ValueError(f"a source without videos (videos per source: {videos})")
        self.videos, self.G, self.seed = list(videos), global_batch, seed
        self.p = None if weights is None or len(videos) == 1 else np.asarray(weights, float) / sum(weights)
        self._cursor = (0, [(0, 0)] * len(videos))  # (step, [(epoch, offset)] per source) at that step

    @lru_cache(maxsize=8)
    def _perm(self, source: int, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, source, epoch]).permutation(self.videos[source])  # [V_k]

    @lru_cache(maxsize=4)
    def _slot_block(self, block: int) -> np.ndarray:
        """Source of every global slot for steps block*BLOCK .. +BLOCK."""
        rng = np.random.default_rng([self.seed, 1, block])
        return rng.choice(len(self.videos), size=(BLOCK, self.G), p=self.p)  # [BLOCK, G]

    def slot_sources(self, step: int) -> np.ndarray:
        """Which source each of the G slots of global step ``step`` draws from."""
        if self.p is None:
            return np.zeros(self.G, dtype=np.int64)  # [G]
        return self._slot_block(step // BLOCK)[step % BLOCK]  # [G]

    def _advance(self, cursor: tuple[int, int], n: int, source: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """(start of a slice of n in source ``source``'s walk, the cursor after it)."""
        videos, (epoch, offset) = self.videos[source], cursor
        if offset and offset + n > videos:  # does not fit in this epoch: the next one
            epoch, offset = epoch + 1, 0
        end = offset + n
        return (epoch, offset), (epoch + end // videos, end % videos)

    def _starts(self, step: int, counts: np.ndarray) -> list[tuple[int, int]]:
        """Start (epoch, offset) of each source's slice at ``step``."""
        if self.p is None:  # one source, G per step: closed form
            videos = self.videos[0]
            per_epoch = videos // self.G
            return [(step // per_epoch, (step % per_epoch) * self.G) if per_epoch else (step * -(-self.G // videos), 0)]
        at, cursors = self._cursor
        if step < at:
            at, cursors = 0, [(0, 0)] * len(self.videos)
        while at < step:  # replay the slices of the steps in between
            n = np.bincount(self.slot_sources(at), minlength=len(self.videos))
            cursors = [self._advance(c, int(n[k]), k)[1] for k, c in enumerate(cursors)]
            at += 1
        self._cursor = (at, cursors)
        return [self._advance(c, int(counts[k]), k)[0] for k, c in enumerate(cursors)]

    def global_batch(self, step: int) -> list[Draw]:
        """The G draws of global step ``step``, in slot order."""
        sources = self.slot_sources(step)
        starts = self._starts(step, np.bincount(sources, minlength=len(self.videos)))
        taken = [0] * len(self.videos)
        out = []
        for k in sources.tolist():
            epoch, offset = starts[k]
            i = offset + taken[k]
            taken[k] += 1
            videos = self.videos[k]
            video = self._perm(k, epoch + i // videos)[i % videos]  # i // videos > 0 only when V_k < n_k
            out.append(Draw(k, epoch * videos + i, int(video)))
        return out

    @staticmethod
    def repeats(draws: list[Draw]) -> bool:
        """Whether a global batch holds some video twice (only when a source is smaller than its slice)."""
        return len({(d.source, d.video) for d in draws}) < len(draws)

    def epoch_steps(self) -> int:
        """Steps that show every video about once (the stream's ``len``)."""
        return max(1, sum(self.videos) // self.G)
