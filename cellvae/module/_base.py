"""What every module returns from its loss, and the Gaussian KL used by all of them."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .._sparse import CSRBatch


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
    if isinstance(p_m, float | int) and isinstance(p_v, float | int) and p_m == 0 and p_v == 1:
        # the standard normal prior: 5 operators instead of 10 (128 x 10 in a training step,
        # forward and backward: 74 -> 40 us)
        return 0.5 * (q_v + q_m.square() - q_v.log() - 1.0)
    # a number becomes a 0-d CPU tensor, which torch reads as a scalar on any device: making
    # it on q_v's device would copy it there and wait for that device at every call
    p_v = torch.as_tensor(p_v, dtype=q_v.dtype)
    return 0.5 * (torch.log(p_v) - torch.log(q_v) + (q_v + (q_m - p_m) ** 2) / p_v - 1.0)


def kl_normal(
    q_m: torch.Tensor, q_v: torch.Tensor, p_m: torch.Tensor | float = 0.0, p_v=1.0
) -> torch.Tensor:
    """KL(N(q_m, q_v) ‖ N(p_m, p_v)) summed over the last dimension (variances, not scales)."""
    return kl_normal_elementwise(q_m, q_v, p_m, p_v).sum(-1)


def latent_kl(inf: dict) -> torch.Tensor:
    """KL(q(z | x) ‖ N(0, I)) per cell of an ``inference`` output.

    The encoder's own value (``inf["kl_z"]``, computed with the sample by the compiled
    :func:`cellvae.nn.normal_heads`) where it gave one, else :func:`kl_normal` of ``qz_m``,
    ``qz_v``.
    """
    kl = inf.get("kl_z")
    return kl_normal(inf["qz_m"], inf["qz_v"]) if kl is None else kl


def rows_of(table: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """``table[codes]``: the table's row of each code, shape ``codes.shape + table.shape[1:]``.

    By ``index_select``, whose backward pass adds the rows' gradients with ``index_add_``:
    advanced indexing's (``index_put_`` with accumulation) took 1.6 ms against 0.3 ms for a
    128-cell minibatch of a (4, 2,000) per-batch dispersion.
    """
    return table.index_select(0, codes.reshape(-1)).reshape(*codes.shape, *table.shape[1:])


def covariate_codes(tensors: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The codes injected into the networks: the batch, then each categorical covariate."""
    cats = [tensors["batch"]]
    if "cat_covs" in tensors:
        cats += list(tensors["cat_covs"].unbind(-1))
    return cats


def tile_cells(tensors: dict, n: int) -> dict:
    """The minibatch's cells ``n`` times over, stacked by rows: ``n`` samples as one minibatch.

    Every per-cell tensor is repeated along its first dimension (a CSR batch by
    :meth:`~cellvae._sparse.CSRBatch.tile`); ``n = 1`` returns ``tensors`` itself.
    """
    if n == 1:
        return tensors
    out = {}
    for key, value in tensors.items():
        if isinstance(value, CSRBatch):
            out[key] = value.tile(n)
        elif isinstance(value, torch.Tensor) and value.dim() >= 1:
            out[key] = value.repeat(n, *(1,) * (value.dim() - 1))
        else:
            out[key] = value
    return out


def decoder_input(z: torch.Tensor, tensors: dict[str, torch.Tensor], batch=None):
    """Decoder input, covariate codes and a function restoring a leading samples axis.

    The input is ``z`` with any continuous covariates appended; ``batch`` overrides the cells'
    batch code. ``z`` of shape (samples, cells, latent) is flattened to (samples · cells, ·) for
    the batch-norm layers, with the codes repeated to match; the returned function reshapes a
    flat output back (and is the identity for 2-D ``z``).
    """
    cats = covariate_codes(tensors)
    if batch is not None:
        cats[0] = batch
    dec_in = z
    if "cont_covs" in tensors:
        cont = tensors["cont_covs"]
        dec_in = torch.cat([z, cont.expand(*z.shape[:-1], cont.shape[-1])], dim=-1)
    if z.dim() == 2:
        return dec_in, cats, lambda t: t
    s, n = z.shape[:2]
    unflat = lambda t: None if t is None else t.reshape(s, n, *t.shape[1:])  # also for 0 cells
    return dec_in.reshape(s * n, dec_in.shape[-1]), [c.repeat(s) for c in cats], unflat


def check_flags(**flags) -> None:
    """Raise a TypeError for an option that is not True or False (a string "False" reads true)."""
    for name, value in flags.items():
        if not isinstance(value, bool | np.bool_):
            raise TypeError(f"{name} must be True or False, got {value!r}.")


def check_choice(name: str, value, options) -> None:
    """Raise a ValueError naming the allowed values when ``value`` is not one of ``options``."""
    if value not in options:
        raise ValueError(f"{name} must be one of {list(options)}, got {value!r}.")


def norm_places(name: str, value) -> tuple[bool, bool]:
    """Whether the encoder and the decoder normalise, from ``use_batch_norm``-like options.

    scvi-tools' names (``"encoder"``, ``"decoder"``, ``"both"``, ``"none"``), or True / False
    for both / none.

    Examples
    --------
    >>> norm_places("use_batch_norm", "decoder"), norm_places("use_layer_norm", False)
    ((False, True), (False, False))
    """
    if isinstance(value, bool | np.bool_):
        return bool(value), bool(value)
    if not isinstance(value, str):
        raise TypeError(
            f"{name} must be 'encoder', 'decoder', 'both', 'none', True or False, got {value!r}."
        )
    check_choice(name, value, ("encoder", "decoder", "both", "none"))
    return value in ("encoder", "both"), value in ("decoder", "both")
