"""Pure-torch modules: ``inference → generative → loss``. No anndata here."""

from ._base import LossOutput, kl_normal
from .vae import VAE

__all__ = ["VAE", "LossOutput", "kl_normal"]
