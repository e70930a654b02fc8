"""dulearn: dense self-supervised video representations (Araslanov et al., NeurIPS 2021)."""

__version__ = "0.1.0"
