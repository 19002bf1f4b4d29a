"""What every module returns from its loss, and the Gaussian KL used by all of them."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LossOutput:
    """Loss of one minibatch.

    Attributes
    ----------
    loss
        Scalar to minimise: mean over cells of reconstruction + weighted KL terms.
    reconstruction
        Per-cell negative log-likelihood (cells,).
    kl_local
        Per-cell KL divergence, unweighted (cells,).
    kl_global
        KL of global parameters (a scalar, 0 for most models).
    extra
        Further per-cell terms by name, for history (e.g. protein reconstruction).
    """

    loss: torch.Tensor
    reconstruction: torch.Tensor
    kl_local: torch.Tensor
    kl_global: torch.Tensor = field(default_factory=lambda: torch.tensor(0.0))
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def elbo(self) -> torch.Tensor:
        """Per-cell negative ELBO: reconstruction + KL (lower is better)."""
        return self.reconstruction + self.kl_local


def kl_normal_elementwise(q_m, q_v, p_m=0.0, p_v=1.0) -> torch.Tensor:
    """Elementwise KL(N(q_m, q_v) ‖ N(p_m, p_v)) (variances, not scales)."""
    p_v = torch.as_tensor(p_v, dtype=q_v.dtype, device=q_v.device)
    return 0.5 * (torch.log(p_v) - torch.log(q_v) + (q_v + (q_m - p_m) ** 2) / p_v - 1.0)


def kl_normal(
    q_m: torch.Tensor, q_v: torch.Tensor, p_m: torch.Tensor | float = 0.0, p_v=1.0
) -> torch.Tensor:
    """KL(N(q_m, q_v) ‖ N(p_m, p_v)) summed over the last dimension (variances, not scales)."""
    return kl_normal_elementwise(q_m, q_v, p_m, p_v).sum(-1)


def covariate_codes(tensors: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The codes injected into the networks: the batch, then each categorical covariate."""
    cats = [tensors["batch"]]
    if "cat_covs" in tensors:
        cats += list(tensors["cat_covs"].unbind(-1))
    return cats


def check_choice(name: str, value, options) -> None:
    """Raise a ValueError naming the allowed values when ``value`` is not one of ``options``."""
    if value not in options:
        raise ValueError(f"{name} must be one of {list(options)}, got {value!r}.")
