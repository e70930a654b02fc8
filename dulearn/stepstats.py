"""Step statistics of a logging window, accumulated on the device and read once per metrics line.

Per step the loop adds the loss terms and the step's non-finite flag to device tensors (no
host sync) and its host timings to floats; `Window.summary` reduces the per-rank sums over
all ranks in one all-reduce and copies everything to the host in one `.tolist()`, whose wait
(the device still working off the window's steps) counts as step time. The non-finite flag
is the same on every rank (the loop agrees on it before the update), so the step counts and
runs need no reduction. The stream's counts (skipped clips, bytes read and decoded) ride
along in the same all-reduce; whether a global batch repeated a video is known on every rank.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

import torch

from dulearn import distributed

# The stream's per-batch counts (dulearn.data) that a window sums over steps and ranks.
STREAM_SUMS = ("skipped", "read_bytes", "frame_bytes", "read_requests")


@dataclass
class LossTerms:
    """One step's detached scalars of the loss (`training_loss`'s dict), on the device."""

    loss: torch.Tensor
    st: torch.Tensor
    cv: torch.Tensor
    pseudo_entropy: torch.Tensor
    anchors_used: torch.Tensor
    pseudo_nearest_frac: torch.Tensor

    @classmethod
    def of(cls, out: dict[str, torch.Tensor]) -> "LossTerms":
        """The terms of a training_loss output."""
        return cls(**{f.name: out[f.name].detach() for f in fields(cls)})

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The field names, in order (the metrics.jsonl keys)."""
        return tuple(f.name for f in fields(cls))

    def stacked(self) -> torch.Tensor:
        """[len(fields)] float64 in field order."""
        return torch.stack([getattr(self, name).reshape(()) for name in self.names()]).double()


@dataclass
class NonFinite:
    """Non-finite steps of the run on the device: the current run of consecutive ones and the total."""

    run: torch.Tensor  # [] float64
    total: torch.Tensor  # [] float64

    @classmethod
    def start(cls, device: torch.device, total: int = 0) -> "NonFinite":
        """No current run; `total` from a resumed checkpoint."""
        return cls(torch.zeros((), dtype=torch.float64, device=device),
                   torch.full((), float(total), dtype=torch.float64, device=device))

    def add(self, bad: torch.Tensor) -> None:
        """Count one step; `bad` is float [] 0/1."""
        bad = bad.double()
        self.run = (self.run + 1) * bad
        self.total = self.total + bad


@dataclass
class Window:
    """The steps since the last metrics line: device sums (this rank) and host timings."""

    device: torch.device
    sums: torch.Tensor = field(init=False)  # [len(LossTerms)] float64: sums over finite steps
    finite: torch.Tensor = field(init=False)  # [] float64: finite steps
    longest_run: torch.Tensor = field(init=False)  # [] float64: longest non-finite run seen
    grad_norm: torch.Tensor = field(init=False)  # [] float64: last finite step's norm (NaN: none)
    steps: int = 0
    stream: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STREAM_SUMS, 0))  # this rank's sums
    repeated: int = 0  # steps whose global batch held a video twice (the same on every rank)
    data_wait_s: float = 0.0
    step_time_s: float = 0.0
    lr: float = math.nan

    def __post_init__(self) -> None:
        def scalar(value: float) -> torch.Tensor:
            return torch.full((), value, dtype=torch.float64, device=self.device)

        self.sums = torch.zeros(len(LossTerms.names()), dtype=torch.float64, device=self.device)
        self.finite, self.longest_run, self.grad_norm = scalar(0.0), scalar(0.0), scalar(math.nan)

    def add(self, terms: LossTerms, bad: torch.Tensor, nonfinite: NonFinite, grad_norm: torch.Tensor | None,
            *, batch: Mapping[str, Any], wait_s: float, step_s: float, lr: float) -> None:
        """Add one step (device ops only); `bad`: float [] 0/1, after `nonfinite.add(bad)`."""
        skip = bad > 0
        self.sums = self.sums + torch.where(skip, 0.0, terms.stacked())  # NaN * 0 would be NaN
        self.finite = self.finite + (1 - bad.double())
        self.longest_run = torch.maximum(self.longest_run, nonfinite.run)
        if grad_norm is not None:
            self.grad_norm = torch.where(skip, self.grad_norm, grad_norm.detach().double())
        self.steps += 1
        for name in STREAM_SUMS:
            self.stream[name] += int(batch.get(name, 0))
        self.repeated += bool(batch.get("repeated", False))
        self.data_wait_s += wait_s
        self.step_time_s += step_s
        self.lr = lr

    def summary(self, nonfinite: NonFinite, batch_size: int, epoch: float) -> tuple[dict[str, Any], int]:
        """(the window's metrics: means per finite step over all ranks, counts, throughput; the
        longest run of non-finite steps in it). One all-reduce, one host sync."""
        world, start = distributed.world_size(), time.perf_counter()
        host = torch.tensor([self.stream[k] for k in STREAM_SUMS], dtype=torch.float64).to(self.device)  # [S]
        reduced = distributed.reduce(torch.cat([self.sums, host]))  # [T+S] sums over ranks
        same = torch.stack([self.finite, self.longest_run, nonfinite.total, self.grad_norm])  # [4] equal on all ranks
        values = torch.cat([reduced, same]).tolist()
        sums, stream = values[:len(self.sums)], dict(zip(STREAM_SUMS, values[len(self.sums):]))
        finite, longest, total, grad_norm = values[len(self.sums) + len(STREAM_SUMS):]
        self.step_time_s += time.perf_counter() - start  # the device's backlog of the window's steps
        n, seconds = self.steps, max(self.step_time_s, 1e-12)
        out: dict[str, Any] = {name: s / world / finite for name, s in zip(LossTerms.names(), sums)} if finite else {}
        out.update({
            "epoch": epoch,
            "lr": self.lr,
            "skipped_samples": int(stream["skipped"]),
            "repeat_video_frac": self.repeated / n,
            "nonfinite_steps": int(n - finite),
            "nonfinite_total": int(total),
            "data_wait_s": self.data_wait_s / n,
            "step_time_s": self.step_time_s / n,
            "data_wait_frac": self.data_wait_s / seconds,
            "clips_per_s": batch_size * n / seconds,
        })
        if stream["frame_bytes"]:
            out["read_bytes_per_frame_byte"] = stream["read_bytes"] / stream["frame_bytes"]
            out["read_requests_per_clip"] = stream["read_requests"] / (batch_size * n)
        if not math.isnan(grad_norm):
            out["grad_norm"] = grad_norm
        if self.device.type == "cuda":
            out["gpu_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return out, int(longest)
