"""cellvae: fast deep generative models for single-cell omics on AnnData and PyTorch."""

from importlib.metadata import PackageNotFoundError, version

from . import datasets, pl, pp, tl
from .model import SCVI, TOTALVI

try:
    __version__ = version("cellvae")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = ["SCVI", "TOTALVI", "datasets", "pl", "pp", "tl"]
