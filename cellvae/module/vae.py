"""The scVI variational autoencoder (Lopez et al., Nature Methods 2018), pure torch.

Read top to bottom: ``inference`` encodes counts into q(z | x) (and q(ℓ | x) for a latent
library), ``generative`` decodes z into the parameters of the count likelihood, ``loss`` adds the
reconstruction and KL terms. A minibatch is a dict of tensors as produced by
:class:`cellvae._data.TensorData`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from .._sparse import hstack, log1p, row_sums
from ..distributions import NegativeBinomial, Normal, Poisson, ZeroInflatedNegativeBinomial
from ..nn import DecoderSCVI, Encoder, reparameterize
from ._base import (
    LossOutput,
    check_choice,
    check_flags,
    covariate_codes,
    decoder_input,
    kl_normal,
    latent_kl,
    norm_places,
    rows_of,
    tile_cells,
)
from ._vae_step import fused_training_step

Dispersion = Literal["gene", "gene-batch", "gene-label", "gene-cell"]
Likelihood = Literal["zinb", "nb", "poisson", "normal"]


class VAE(nn.Module):
    """Variational autoencoder for count data with batch correction.

    Parameters
    ----------
    n_input
        Number of genes.
    n_batch, n_labels
        Number of batches and labels (1 when not registered).
    n_hidden, n_latent, n_layers
        Width, latent size and depth of the networks.
    n_continuous_cov
        Number of continuous covariates (concatenated to the decoder input).
    n_cats_per_cov
        Categories of each extra categorical covariate (injected like the batch).
    dropout_rate
        Dropout in the encoder.
    dispersion
        ``"gene"``, ``"gene-batch"``, ``"gene-label"`` or ``"gene-cell"``.
    log_variational
        Encode ``log(1 + x)`` instead of ``x``.
    gene_likelihood
        ``"zinb"``, ``"nb"``, ``"poisson"`` or ``"normal"``.
    latent_distribution
        ``"normal"`` or ``"ln"`` (logistic normal).
    encode_covariates
        Also give the batch and covariates to the encoders.
    deeply_inject_covariates
        Inject covariates into every hidden layer of the decoder, not just the first.
    use_batch_norm, use_layer_norm
        Where to normalise: ``"encoder"``, ``"decoder"``, ``"both"`` or ``"none"`` (True and
        False mean both and none).
    use_size_factor_key
        Use registered size factors (``log`` of them) as the library; softplus scale.
    use_observed_lib_size
        Use the observed log library size; otherwise learn a latent library with a per-batch
        log-normal prior given by ``library_log_means`` / ``library_log_vars``.
    library_log_means, library_log_vars
        Per-batch mean and variance of the log library size (needed for a latent library).
    """

    def __init__(
        self,
        n_input: int,
        n_batch: int = 1,
        n_labels: int = 1,
        n_hidden: int = 128,
        n_latent: int = 10,
        n_layers: int = 1,
        n_continuous_cov: int = 0,
        n_cats_per_cov: Sequence[int] | None = None,
        dropout_rate: float = 0.1,
        dispersion: Dispersion = "gene",
        log_variational: bool = True,
        gene_likelihood: Likelihood = "zinb",
        latent_distribution: Literal["normal", "ln"] = "normal",
        encode_covariates: bool = False,
        deeply_inject_covariates: bool = True,
        use_batch_norm: Literal["encoder", "decoder", "none", "both"] | bool = "both",
        use_layer_norm: Literal["encoder", "decoder", "none", "both"] | bool = "none",
        use_size_factor_key: bool = False,
        use_observed_lib_size: bool = True,
        library_log_means: Sequence[float] | None = None,
        library_log_vars: Sequence[float] | None = None,
    ):
        super().__init__()
        self._check_options(dispersion, gene_likelihood, latent_distribution)
        check_flags(
            log_variational=log_variational,
            encode_covariates=encode_covariates,
            deeply_inject_covariates=deeply_inject_covariates,
            use_size_factor_key=use_size_factor_key,
            use_observed_lib_size=use_observed_lib_size,
        )
        self.n_input, self.n_batch, self.n_labels = n_input, n_batch, n_labels
        self.n_latent = n_latent
        self.dispersion = dispersion
        self.gene_likelihood = gene_likelihood
        self.latent_distribution = latent_distribution
        self.log_variational = log_variational
        self.encode_covariates = encode_covariates
        self.use_size_factor_key = use_size_factor_key
        self.use_observed_lib_size = use_size_factor_key or use_observed_lib_size
        self.n_continuous_cov = n_continuous_cov

        if not self.use_observed_lib_size:
            if library_log_means is None or library_log_vars is None:
                raise ValueError("A latent library needs library_log_means and library_log_vars.")
            self.register_buffer(
                "library_log_means", torch.as_tensor(library_log_means, dtype=torch.float32)
            )
            self.register_buffer(
                "library_log_vars", torch.as_tensor(library_log_vars, dtype=torch.float32)
            )

        if dispersion == "gene":
            self.px_r = nn.Parameter(torch.randn(n_input))
        elif dispersion == "gene-batch":
            self.px_r = nn.Parameter(torch.randn(n_batch, n_input))
        elif dispersion == "gene-label":
            self.px_r = nn.Parameter(torch.randn(n_labels, n_input))

        cat_list = [n_batch, *(n_cats_per_cov or [])]
        enc_cats = cat_list if encode_covariates else None
        n_enc_in = n_input + n_continuous_cov * encode_covariates
        bn_enc, bn_dec = norm_places("use_batch_norm", use_batch_norm)
        ln_enc, ln_dec = norm_places("use_layer_norm", use_layer_norm)
        self.z_encoder = Encoder(
            n_enc_in,
            n_latent,
            n_cat_list=enc_cats,
            n_layers=n_layers,
            n_hidden=n_hidden,
            dropout_rate=dropout_rate,
            distribution=latent_distribution,
            use_batch_norm=bn_enc,
            use_layer_norm=ln_enc,
            inject_covariates=deeply_inject_covariates,
        )
        self.l_encoder = (
            None
            if self.use_observed_lib_size
            else Encoder(
                n_enc_in,
                1,
                n_cat_list=enc_cats,
                n_layers=1,
                n_hidden=n_hidden,
                dropout_rate=dropout_rate,
                use_batch_norm=bn_enc,
                use_layer_norm=ln_enc,
                inject_covariates=deeply_inject_covariates,
            )
        )
        self.decoder = DecoderSCVI(
            n_latent + n_continuous_cov,
            n_input,
            n_cat_list=cat_list,
            n_layers=n_layers,
            n_hidden=n_hidden,
            inject_covariates=deeply_inject_covariates,
            use_batch_norm=bn_dec,
            use_layer_norm=ln_dec,
            scale_activation="softplus" if use_size_factor_key else "softmax",
            gene_cell_dispersion=dispersion == "gene-cell",
            zero_inflation=gene_likelihood == "zinb",
        )

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _check_options(dispersion: str, gene_likelihood: str, latent_distribution: str) -> None:
        """Raise a ValueError naming the allowed values of a bad option."""
        check_choice("dispersion", dispersion, ("gene", "gene-batch", "gene-label", "gene-cell"))
        check_choice("gene_likelihood", gene_likelihood, ("zinb", "nb", "poisson", "normal"))
        check_choice("latent_distribution", latent_distribution, ("normal", "ln"))

    # ------------------------------------------------------------------ the model
    def inference(self, tensors: dict[str, torch.Tensor], n_samples: int = 1) -> dict:
        """Encode a minibatch: q(z | x) and the library (observed, size factor or latent)."""
        x = tensors["x"]  # dense, or a CSRBatch that the first encoder layer reads sparsely
        cats = covariate_codes(tensors)
        x_in = log1p(x) if self.log_variational else x
        if self.encode_covariates and "cont_covs" in tensors:
            x_in = hstack(x_in, tensors["cont_covs"])
        enc_cats = cats if self.encode_covariates else []
        qz_m, qz_v, z, kl_z = self.z_encoder.forward_kl(x_in, *enc_cats)
        ql_m = ql_v = None
        if self.use_size_factor_key:
            library = torch.log(tensors["size_factor"]).unsqueeze(-1)
        elif self.use_observed_lib_size:
            library = torch.log(row_sums(x))
        else:
            ql_m, ql_v, library = self.l_encoder(x_in, *enc_cats)
        if n_samples > 1:
            z = self.z_encoder.z_transformation(reparameterize(qz_m, qz_v, n_samples))
            if ql_m is not None:
                library = reparameterize(ql_m, ql_v, n_samples)
            else:
                library = library.expand(n_samples, *library.shape)
        if n_samples > 1:
            kl_z = None  # of the samples drawn above, not the encoder's
        return {
            "z": z, "qz_m": qz_m, "qz_v": qz_v, "ql_m": ql_m, "ql_v": ql_v, "library": library,
            "kl_z": kl_z,  # KL(q(z | x) ‖ N(0, I)) when the encoder computed it, else None
        }  # fmt: skip

    def generative(
        self,
        z: torch.Tensor,
        library: torch.Tensor,
        tensors: dict[str, torch.Tensor],
        *,
        batch: torch.Tensor | None = None,
        gene_idx: torch.Tensor | None = None,
        lazy_mean: bool = False,
    ) -> dict:
        """Decode z into the count distribution ``px`` (``batch`` overrides the cells' batch).

        Returns ``px``, ``px_scale`` and ``px_rate``. With ``lazy_mean`` (the training loss), an
        NB or ZINB ``px`` of a softmax decoder is built from the decoder's logits and the
        library, ``px_scale`` and ``px_rate`` are None, and ``px.log_prob_sum`` evaluates the
        softmax inside the likelihood kernel (elsewhere ``px.mu`` computes it when first used).
        """
        lazy = (
            lazy_mean
            and z.dim() == 2
            and gene_idx is None
            and self.decoder.scale_activation == "softmax"
            and self.gene_likelihood in ("nb", "zinb")
        )
        dec_in, cats, unflat = decoder_input(z, tensors, batch)
        lib = library if z.dim() == 2 else library.reshape(-1, 1)
        outputs = self.decoder(
            self.dispersion, dec_in, lib, *cats, gene_idx=gene_idx, scale_logits=lazy
        )
        px_scale, px_r, px_rate, px_dropout = map(unflat, outputs)
        if self.dispersion == "gene-cell":
            theta = torch.exp(px_r)
        else:  # exponentiated per gene / category, then gathered: (n, G) values, not (cells, G)
            theta = torch.exp(self.px_r if gene_idx is None else self.px_r[..., gene_idx])
            if self.dispersion == "gene-batch":
                theta = rows_of(theta, tensors["batch"] if batch is None else batch)
            elif self.dispersion == "gene-label":
                theta = rows_of(theta, tensors["labels"])
        mean = {"mu": px_rate}
        if lazy:  # px_scale holds the logits
            mean = {"scale_logits": px_scale, "library": torch.exp(library)}
            px_scale = None
        if self.gene_likelihood == "zinb":
            px = ZeroInflatedNegativeBinomial(theta=theta, zi_logits=px_dropout, **mean)
        elif self.gene_likelihood == "nb":
            px = NegativeBinomial(theta=theta, **mean)
        elif self.gene_likelihood == "poisson":
            px = Poisson(rate=px_rate)
        else:
            px = Normal(loc=px_rate, scale=theta.sqrt())
        return {"px": px, "px_scale": px_scale, "px_rate": px_rate}

    @torch.no_grad()
    def expression_scale(
        self,
        z: torch.Tensor,
        tensors: dict[str, torch.Tensor],
        *,
        batch: torch.Tensor | None = None,
        gene_idx: torch.Tensor | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``px_scale`` alone (normalised expression), without the likelihood's other heads.

        ``out`` (2-D ``z`` only) receives the result, as in :meth:`DecoderSCVI.scale`.
        """
        dec_in, cats, unflat = decoder_input(z, tensors, batch)
        if out is not None and z.dim() != 2:
            raise ValueError("out needs a 2-D z (one sample per cell).")
        return unflat(self.decoder.scale(dec_in, *cats, gene_idx=gene_idx, out=out))

    def loss(
        self, tensors: dict[str, torch.Tensor], inf: dict, gen: dict, kl_weight: float = 1.0
    ) -> LossOutput:
        """Negative ELBO of the minibatch with the KL of z weighted by ``kl_weight``."""
        x = tensors["x"]
        # the loss is the mean over cells: each row sum gets -1/cells (the kernel's hint)
        reconstruction = -gen["px"].log_prob_sum(x, row_grad=-1.0 / max(x.shape[0], 1))
        kl_z = latent_kl(inf)
        if inf["ql_m"] is None:  # observed library: no KL term for it
            loss = torch.mean(reconstruction + kl_weight * kl_z)
            return LossOutput(loss=loss, reconstruction=reconstruction, kl_local=kl_z)
        b = tensors["batch"]
        kl_l = kl_normal(
            inf["ql_m"],
            inf["ql_v"],
            self.library_log_means[b].unsqueeze(-1),
            self.library_log_vars[b].unsqueeze(-1),
        )
        loss = torch.mean(reconstruction + kl_weight * kl_z + kl_l)
        return LossOutput(loss=loss, reconstruction=reconstruction, kl_local=kl_z + kl_l)

    def forward(self, tensors: dict[str, torch.Tensor], kl_weight: float = 1.0) -> LossOutput:
        """Inference, generative and loss for one minibatch."""
        inf = self.inference(tensors)
        gen = self.generative(inf["z"], inf["library"], tensors, lazy_mean=True)
        return self.loss(tensors, inf, gen, kl_weight)

    def training_step(self, tensors: dict[str, torch.Tensor], kl_weight: float = 1.0):
        """:meth:`forward` with the gradients written by hand, or None where not covered.

        The loss of the minibatch, with each parameter's gradient added to its ``.grad`` as
        ``forward(tensors, kl_weight).loss.backward()`` would, in ~30 compiled and torch calls
        instead of ~150 operators and autograd (:mod:`cellvae.module._vae_step`). None where
        that code does not cover the model or the minibatch: the caller then runs
        :meth:`forward` and ``backward``.
        """
        return fused_training_step(self, tensors, kl_weight)

    @torch.no_grad()
    def marginal_ll(
        self, tensors: dict[str, torch.Tensor], n_mc_samples: int, max_entries: int = 2**20
    ) -> torch.Tensor:
        """Importance-sampled log p(x) per cell, with q(z | x) (and q(ℓ | x)) as proposal.

        The encoder runs once (its posterior is the same for every sample in eval mode). The
        samples are drawn and decoded in chunks of at most ``max_entries`` samples × cells ×
        genes, so memory does not grow with ``n_mc_samples``; a chunk is decoded as one flat
        minibatch of its samples' copies of the cells, whose likelihood row sums come from
        ``log_prob_sum``: for the NB and ZINB, the compiled kernel of training (``lgamma`` at
        the nonzero counts only) instead of the elementwise ``log_prob`` with three ``lgamma``
        per entry. The weights go into one preallocated block: a small tensor kept per chunk,
        between the chunks' large temporaries, fragmented the heap until RSS reached the size
        of all samples at once.
        """
        if self.latent_distribution == "ln":
            raise NotImplementedError("marginal_ll needs latent_distribution='normal'.")
        inf = self.inference(tensors)
        n_cells, n_genes = tensors["x"].shape
        chunk = max(1, max_entries // max(n_cells * n_genes, 1))
        log_w = inf["qz_m"].new_empty((n_mc_samples, n_cells))  # one block: nothing kept per chunk
        tiled = {}
        for done in range(0, n_mc_samples, chunk):
            n = min(chunk, n_mc_samples - done)
            if n not in tiled:  # the chunk size, and the last chunk's
                tiled[n] = tile_cells(tensors, n)
            log_w[done : done + n] = self._log_importance_weights(tiled[n], inf, n)
        return torch.logsumexp(log_w, dim=0) - math.log(n_mc_samples)

    def _log_importance_weights(self, tiled: dict, inf: dict, n: int) -> torch.Tensor:
        """The log weights log p(x, z, ℓ) − log q(z, ℓ | x) of ``n`` samples, (n, cells).

        ``tiled``: the minibatch's cells ``n`` times over (:func:`tile_cells`); ``inf``: the
        encoder's posterior of the cells once.
        """
        qz_m, qz_v, ql_m, ql_v = inf["qz_m"], inf["qz_v"], inf["ql_m"], inf["ql_v"]
        n_cells = qz_m.shape[0]
        z = reparameterize(qz_m, qz_v, n)
        if ql_m is None:
            lib = inf["library"].expand(n, *inf["library"].shape)
        else:
            lib = reparameterize(ql_m, ql_v, n)
        flat_z, flat_lib = z.reshape(n * n_cells, z.shape[-1]), lib.reshape(n * n_cells, 1)
        gen = self.generative(flat_z, flat_lib, tiled, lazy_mean=True)
        log_w = gen["px"].log_prob_sum(tiled["x"]).reshape(n, n_cells)
        log_w += Normal(torch.zeros_like(z), torch.ones_like(z)).log_prob(z).sum(-1)
        log_w -= Normal(qz_m, qz_v.sqrt()).log_prob(z).sum(-1)
        if ql_m is not None:
            b = tiled["batch"][:n_cells]
            mean = self.library_log_means[b].unsqueeze(-1)
            prior = Normal(mean, self.library_log_vars[b].unsqueeze(-1).sqrt())
            log_w += prior.log_prob(lib).sum(-1)
            log_w -= Normal(ql_m, ql_v.sqrt()).log_prob(lib).sum(-1)
        return log_w


__all__ = ["VAE"]
