"""Neural network building blocks: fully connected stacks, encoders and decoders.

Categorical covariates (batch, extra categories) are injected as an embedding added after each
Linear layer. That is the same function as concatenating a one-hot vector to the layer input
(``W [h; onehot(c)] = W_h h + W_c[:, c]``) without building the one-hot tensor every step.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DecoderSCVI", "Encoder", "FCLayers", "reparameterize"]


def reparameterize(mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """Draw ``mean + sqrt(var) · ε`` with ε ~ N(0, I) (the reparameterisation trick).

    Examples
    --------
    >>> import torch
    >>> reparameterize(torch.zeros(2, 3), torch.ones(2, 3)).shape
    torch.Size([2, 3])
    """
    return mean + var.sqrt() * torch.randn_like(mean)


class _CovariateLinear(nn.Module):
    """A Linear layer plus one learned vector per category of each covariate."""

    def __init__(self, n_in: int, n_out: int, n_cat_list: Sequence[int], bias: bool = True):
        super().__init__()
        self.linear = nn.Linear(n_in, n_out, bias=bias)
        bound = 1.0 / math.sqrt(n_in + sum(n_cat_list))  # like nn.Linear on [h; one-hot]
        self.embeddings = nn.ModuleList()
        for n_cat in n_cat_list:
            emb = nn.Embedding(n_cat, n_out)
            nn.init.uniform_(emb.weight, -bound, bound)
            self.embeddings.append(emb)

    def forward(self, x: torch.Tensor, cats: Sequence[torch.Tensor]) -> torch.Tensor:
        out = self.linear(x)
        for emb, c in zip(self.embeddings, cats):
            out = out + emb(c.view(-1))
        return out


class FCLayers(nn.Module):
    """Linear → BatchNorm / LayerNorm → ReLU → Dropout, repeated, with covariates injected.

    Parameters
    ----------
    n_in, n_out
        Input and output sizes.
    n_cat_list
        Number of categories of each categorical covariate; entries ≤ 1 are ignored.
    n_layers
        Number of layers (the first maps ``n_in → n_hidden``, the last ``→ n_out``).
    n_hidden
        Width of the hidden layers.
    dropout_rate
        Dropout probability after each layer (0 disables dropout).
    use_batch_norm, use_layer_norm
        Normalisation after each Linear (batch norm with momentum 0.01, eps 1e-3; layer norm
        without affine parameters).
    use_activation
        Apply ReLU after each layer.
    bias
        Bias in the Linear layers.
    inject_covariates
        Inject covariates into every layer (True) or only the first.

    Examples
    --------
    >>> import torch
    >>> fc = FCLayers(20, 8, n_cat_list=[3], n_layers=2, n_hidden=16)
    >>> fc(torch.randn(4, 20), torch.tensor([0, 1, 2, 1])).shape
    torch.Size([4, 8])
    """

    def __init__(
        self,
        n_in: int,
        n_out: int,
        n_cat_list: Iterable[int] | None = None,
        n_layers: int = 1,
        n_hidden: int = 128,
        dropout_rate: float = 0.1,
        use_batch_norm: bool = True,
        use_layer_norm: bool = False,
        use_activation: bool = True,
        bias: bool = True,
        inject_covariates: bool = True,
    ):
        super().__init__()
        # keep the positions of the covariates that carry information
        self.cat_keep = [i for i, n in enumerate(n_cat_list or []) if n > 1]
        cats = [n for n in (n_cat_list or []) if n > 1]
        sizes = [n_in] + [n_hidden] * (n_layers - 1) + [n_out]
        self.linears = nn.ModuleList()
        self.post = nn.ModuleList()
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layer_cats = cats if (i == 0 or inject_covariates) else []
            self.linears.append(_CovariateLinear(a, b, layer_cats, bias=bias))
            post: list[nn.Module] = []
            if use_batch_norm:
                post.append(nn.BatchNorm1d(b, momentum=0.01, eps=1e-3))
            if use_layer_norm:
                post.append(nn.LayerNorm(b, elementwise_affine=False))
            if use_activation:
                post.append(nn.ReLU())
            if dropout_rate > 0:
                post.append(nn.Dropout(p=dropout_rate))
            self.post.append(nn.Sequential(*post))

    def forward(self, x: torch.Tensor, *cat_list: torch.Tensor) -> torch.Tensor:
        """Apply the layers to ``x`` with one code tensor per covariate in ``cat_list``."""
        cats = [cat_list[i] for i in self.cat_keep if i < len(cat_list)]
        for linear, post in zip(self.linears, self.post):
            x = post(linear(x, cats[: len(linear.embeddings)]))
        return x


class Encoder(nn.Module):
    """Encode data into the mean and variance of a diagonal Gaussian, and sample from it.

    Parameters
    ----------
    n_input, n_output
        Input size and latent size.
    n_cat_list
        Categories of each covariate injected into the layers (None for none).
    n_layers, n_hidden, dropout_rate, use_batch_norm, use_layer_norm, inject_covariates
        Passed to :class:`FCLayers`.
    distribution
        ``"normal"`` or ``"ln"`` (logistic normal: the softmax of the normal sample).
    var_eps
        Added to the variance for numerical stability.
    var_activation
        Maps the raw variance output to positive values (default ``torch.exp``).

    Returns
    -------
    ``forward`` returns ``(q_m, q_v, latent)``.

    Examples
    --------
    >>> import torch
    >>> enc = Encoder(50, 10)
    >>> q_m, q_v, z = enc(torch.randn(8, 50))
    >>> q_m.shape, bool((q_v > 0).all())
    (torch.Size([8, 10]), True)
    """

    def __init__(
        self,
        n_input: int,
        n_output: int,
        n_cat_list: Iterable[int] | None = None,
        n_layers: int = 1,
        n_hidden: int = 128,
        dropout_rate: float = 0.1,
        distribution: Literal["normal", "ln"] = "normal",
        var_eps: float = 1e-4,
        var_activation=None,
        use_batch_norm: bool = True,
        use_layer_norm: bool = False,
        inject_covariates: bool = True,
    ):
        super().__init__()
        self.distribution = distribution
        self.var_eps = var_eps
        self.var_activation = torch.exp if var_activation is None else var_activation
        self.encoder = FCLayers(
            n_input,
            n_hidden,
            n_cat_list=n_cat_list,
            n_layers=n_layers,
            n_hidden=n_hidden,
            dropout_rate=dropout_rate,
            use_batch_norm=use_batch_norm,
            use_layer_norm=use_layer_norm,
            inject_covariates=inject_covariates,
        )
        self.mean_encoder = nn.Linear(n_hidden, n_output)
        self.var_encoder = nn.Linear(n_hidden, n_output)

    def z_transformation(self, untran_z: torch.Tensor) -> torch.Tensor:
        """Map a normal sample to the latent space (softmax for ``"ln"``)."""
        return F.softmax(untran_z, dim=-1) if self.distribution == "ln" else untran_z

    def forward(self, x: torch.Tensor, *cat_list: torch.Tensor):
        """Return ``(q_m, q_v, latent)`` for input ``x`` and covariate codes ``cat_list``."""
        q = self.encoder(x, *cat_list)
        q_m = self.mean_encoder(q)
        q_v = self.var_activation(self.var_encoder(q)) + self.var_eps
        return q_m, q_v, self.z_transformation(reparameterize(q_m, q_v))


class DecoderSCVI(nn.Module):
    """Decode a latent sample into the parameters of the count distribution of each gene.

    Parameters
    ----------
    n_input
        Latent size (plus any continuous covariates concatenated to ``z``).
    n_output
        Number of genes.
    n_cat_list
        Categories of each covariate injected into the layers (batch first).
    n_layers, n_hidden
        Depth and width of the hidden stack.
    inject_covariates
        Inject covariates into every hidden layer (True) or only the first.
    use_batch_norm, use_layer_norm
        Normalisation in the hidden layers.
    scale_activation
        ``"softmax"`` (gene proportions summing to 1) or ``"softplus"`` (unnormalised, used with
        size factors).

    Examples
    --------
    >>> import torch
    >>> dec = DecoderSCVI(10, 100, n_cat_list=[2])
    >>> z, lib, b = torch.randn(4, 10), torch.full((4, 1), 7.0), torch.tensor([0, 1, 0, 1])
    >>> px_scale, px_r, px_rate, px_dropout = dec("gene", z, lib, b)
    >>> px_scale.shape, px_r is None, bool(torch.allclose(px_scale.sum(-1), torch.ones(4)))
    (torch.Size([4, 100]), True, True)
    """

    def __init__(
        self,
        n_input: int,
        n_output: int,
        n_cat_list: Iterable[int] | None = None,
        n_layers: int = 1,
        n_hidden: int = 128,
        inject_covariates: bool = True,
        use_batch_norm: bool = False,
        use_layer_norm: bool = False,
        scale_activation: Literal["softmax", "softplus"] = "softmax",
    ):
        super().__init__()
        if scale_activation not in ("softmax", "softplus"):
            raise ValueError(
                f"scale_activation must be 'softmax' or 'softplus', got {scale_activation!r}."
            )
        self.scale_activation = scale_activation
        self.px_decoder = FCLayers(
            n_input,
            n_hidden,
            n_cat_list=n_cat_list,
            n_layers=n_layers,
            n_hidden=n_hidden,
            dropout_rate=0.0,
            use_batch_norm=use_batch_norm,
            use_layer_norm=use_layer_norm,
            inject_covariates=inject_covariates,
        )
        self.px_scale_decoder = nn.Linear(n_hidden, n_output)
        self.px_r_decoder = nn.Linear(n_hidden, n_output)
        self.px_dropout_decoder = nn.Linear(n_hidden, n_output)

    @staticmethod
    def _head(layer: nn.Linear, h: torch.Tensor, gene_idx: torch.Tensor | None) -> torch.Tensor:
        if gene_idx is None:
            return layer(h)
        return F.linear(h, layer.weight[gene_idx], layer.bias[gene_idx])

    def forward(
        self,
        dispersion: str,
        z: torch.Tensor,
        library: torch.Tensor,
        *cat_list: torch.Tensor,
        gene_idx: torch.Tensor | None = None,
    ):
        """Return ``(px_scale, px_r, px_rate, px_dropout)``; ``px_r`` is None unless gene-cell.

        ``library`` is the log library size (cells × 1). ``gene_idx`` restricts the outputs to
        those genes: only their rows of the output layers are computed (with softmax, the
        normaliser still needs every gene's logit).
        """
        h = self.px_decoder(z, *cat_list)
        if self.scale_activation == "softmax":
            logits = self.px_scale_decoder(h)
            if gene_idx is None:
                px_scale = torch.softmax(logits, dim=-1)
            else:
                log_norm = torch.logsumexp(logits, dim=-1, keepdim=True)
                px_scale = torch.exp(logits[:, gene_idx] - log_norm)
        else:
            px_scale = F.softplus(self._head(self.px_scale_decoder, h, gene_idx))
        px_dropout = self._head(self.px_dropout_decoder, h, gene_idx)
        px_rate = torch.exp(library) * px_scale
        px_r = self._head(self.px_r_decoder, h, gene_idx) if dispersion == "gene-cell" else None
        return px_scale, px_r, px_rate, px_dropout
