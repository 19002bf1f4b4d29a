"""User-facing models: thin classes holding hyper-parameters, training and getters."""

from ._base import BaseModel
from .scvi import SCVI
from .totalvi import TOTALVI

__all__ = ["SCVI", "TOTALVI", "BaseModel"]
