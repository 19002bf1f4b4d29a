"""Pure-torch modules: ``inference → generative → loss``. No anndata here."""

from ._base import LossOutput, kl_normal
from .totalvae import TOTALVAE
from .vae import VAE

__all__ = ["LossOutput", "TOTALVAE", "VAE", "kl_normal"]
