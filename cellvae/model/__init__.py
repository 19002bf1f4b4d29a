"""User-facing models: thin classes holding hyper-parameters, training and getters."""

from ._base import BaseModel
from .scvi import SCVI

__all__ = ["SCVI", "BaseModel"]
