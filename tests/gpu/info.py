"""What the GPU check ran on: Python, torch and friends, the CUDA device, the carried packages."""

from __future__ import annotations

import importlib
import os
import platform

import accelerate
import torch
import torchvision

print(f"python {platform.python_version()}, torch {torch.__version__}, torchvision {torchvision.__version__}, "
      f"accelerate {accelerate.__version__}, cudnn {torch.backends.cudnn.version()}, {os.cpu_count()} CPUs")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"cuda {torch.version.cuda}: {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB, "
          f"{p.multi_processor_count} SMs")
else:
    print("no CUDA device")
for name in ("webdataset", "braceexpand", "submitit"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "present"))
    except ImportError as err:
        print(name, "MISSING:", err)
