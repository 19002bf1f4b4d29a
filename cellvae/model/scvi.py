"""SCVI: the user-facing scVI model (Lopez et al., Nature Methods 2018)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch

from .. import pp
from .._registry import Registry
from ..module import VAE
from ._base import (
    BaseModel,
    check_count,
    check_model_options,
    getter_doc,
    library_scale,
    mean_or_rows,
    output_array,
    samples_kept,
)


class SCVI(BaseModel):
    """Single-cell variational inference for batch correction of count data.

    Register the data first with :meth:`setup_anndata` (or :func:`cellvae.pp.setup_anndata`).

    Parameters
    ----------
    adata
        AnnData registered with :func:`cellvae.pp.setup_anndata`.
    n_hidden, n_latent, n_layers
        Width of the hidden layers, size of the latent space, number of hidden layers.
    dropout_rate
        Dropout in the encoder.
    dispersion
        ``"gene"`` (one θ per gene), ``"gene-batch"``, ``"gene-label"`` or ``"gene-cell"``.
    gene_likelihood
        ``"zinb"``, ``"nb"``, ``"poisson"`` or ``"normal"``.
    latent_distribution
        ``"normal"`` or ``"ln"`` (logistic normal).
    use_observed_lib_size
        Use the observed library size (default) or learn it with a per-batch prior.
    **module_kwargs
        Further :class:`cellvae.module.VAE` options: ``encode_covariates`` (also give the
        batch and covariates to the encoder; default False), ``deeply_inject_covariates``,
        ``use_batch_norm`` and ``use_layer_norm`` (``"encoder"``, ``"decoder"``, ``"both"`` or
        ``"none"``; default ``"both"`` and ``"none"``), ``log_variational``.

    Examples
    --------
    >>> import cellvae
    >>> adata = cellvae.datasets.synthetic(300, 50)
    >>> cellvae.SCVI.setup_anndata(adata, batch_key="batch")
    >>> model = cellvae.SCVI(adata, n_latent=5).train(max_epochs=2, progress_bar=False)
    >>> model.get_latent_representation().shape
    (300, 5)
    """

    _module_cls = VAE

    def __init__(
        self,
        adata,
        *,
        n_hidden: int = 128,
        n_latent: int = 10,
        n_layers: int = 1,
        dropout_rate: float = 0.1,
        dispersion: Literal["gene", "gene-batch", "gene-label", "gene-cell"] = "gene",
        gene_likelihood: Literal["zinb", "nb", "poisson", "normal"] = "zinb",
        latent_distribution: Literal["normal", "ln"] = "normal",
        use_observed_lib_size: bool = True,
        **module_kwargs: Any,
    ):
        allowed = {
            "encode_covariates",
            "deeply_inject_covariates",
            "use_batch_norm",
            "use_layer_norm",
            "log_variational",
        }
        check_model_options(SCVI, module_kwargs, allowed)
        super().__init__(
            adata,
            n_hidden=n_hidden,
            n_latent=n_latent,
            n_layers=n_layers,
            dropout_rate=dropout_rate,
            dispersion=dispersion,
            gene_likelihood=gene_likelihood,
            latent_distribution=latent_distribution,
            use_observed_lib_size=use_observed_lib_size,
            **module_kwargs,
        )
        # fail early on bad option values, before any training
        VAE._check_options(dispersion, gene_likelihood, latent_distribution)

    @staticmethod
    @pp.setup_doc(
        "adata",
        "layer",
        "batch_key",
        "labels_key",
        "size_factor_key",
        "categorical_covariate_keys",
        "continuous_covariate_keys",
    )
    def setup_anndata(
        adata,
        *,
        layer: str | None = None,
        batch_key: str | None = None,
        labels_key: str | None = None,
        size_factor_key: str | None = None,
        categorical_covariate_keys: str | Sequence[str] | None = None,
        continuous_covariate_keys: str | Sequence[str] | None = None,
    ) -> None:
        """Register ``adata`` for SCVI; see :func:`cellvae.pp.setup_anndata`.

        Parameters
        ----------
        {setup_parameters}

        Examples
        --------
        >>> import cellvae
        >>> adata = cellvae.datasets.synthetic(100, 20)
        >>> cellvae.SCVI.setup_anndata(adata, batch_key="batch")
        """
        pp.setup_anndata(
            adata,
            layer=layer,
            batch_key=batch_key,
            labels_key=labels_key,
            size_factor_key=size_factor_key,
            categorical_covariate_keys=categorical_covariate_keys,
            continuous_covariate_keys=continuous_covariate_keys,
        )

    def _per_label_option(self) -> str | None:
        return "dispersion='gene-label'" if self.module.dispersion == "gene-label" else None

    def _module_kwargs(self) -> dict[str, Any]:
        reg: Registry = self.registry_
        return {
            "n_input": reg.n_vars,
            "n_batch": reg.n_batch,
            "n_labels": reg.n_labels,
            "n_continuous_cov": reg.n_continuous_covariates,
            "n_cats_per_cov": reg.n_cats_per_covariate,
            "use_size_factor_key": reg.size_factor_key is not None,
            "library_log_means": list(reg.library_log_means),
            "library_log_vars": list(reg.library_log_vars),
            **self.hparams,
        }

    # ------------------------------------------------------------------ getters
    def _decoded_point(self, inf: dict, n_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The z and log library to decode: the samples, or with one sample the posterior means.

        The posterior means make ``n_samples=1`` deterministic: z's mean (its softmax for the
        logistic normal) and the mean of a latent library, not one sample of either. The
        library's is the log-normal mean ``exp(m + v/2)``, which :meth:`get_latent_library_size`
        reports (returned here as its log, ``m + v/2``).
        """
        if n_samples > 1:
            return inf["z"], inf["library"]
        z = inf["qz_m"]
        if self.module.latent_distribution == "ln":
            z = torch.softmax(z, -1)
        if inf["ql_m"] is None:
            return z, inf["library"]
        return z, inf["ql_m"] + inf["ql_v"] / 2

    @getter_doc
    @torch.no_grad()
    def get_likelihood_parameters(
        self,
        adata=None,
        *,
        indices: Sequence[int] | None = None,
        n_samples: int = 1,
        give_mean: bool = False,
        batch_size: int | None = None,
    ) -> dict[str, np.ndarray]:
        """Return the parameters of p(x | z) for each cell and gene (scvi-tools' getter).

        ``"mean"`` (the rate), ``"dispersions"`` (θ; the variance for ``"normal"``; not for
        ``"poisson"``) and ``"dropout"`` (the zero-inflation probability; ``"zinb"`` only), each
        cells × genes. With ``n_samples=1`` they are decoded from the posterior means
        (deterministic); with more, from that many posterior samples.

        Parameters
        ----------
        {adata}
        {indices}
        n_samples
            Posterior samples to decode.
        give_mean
            With ``n_samples > 1``, the mean over the samples instead of samples × cells × genes.
        {batch_size}

        Examples
        --------
        >>> import cellvae
        >>> adata = cellvae.datasets.synthetic(100, 20)
        >>> cellvae.SCVI.setup_anndata(adata)
        >>> model = cellvae.SCVI(adata).train(max_epochs=1, progress_bar=False)
        >>> {k: v.shape for k, v in model.get_likelihood_parameters().items()}
        {'mean': (100, 20), 'dispersions': (100, 20), 'dropout': (100, 20)}
        """
        check_count("n_samples", n_samples)
        self._check_trained()
        td, _ = self._data(adata)
        likelihood = self.module.gene_likelihood
        names = ["mean"]
        names += [] if likelihood == "poisson" else ["dispersions"]
        names += ["dropout"] if likelihood == "zinb" else []
        keep = n_samples > 1 and not give_mean

        def params(batch):
            z, library = self._decoded_point(self.module.inference(batch, n_samples), n_samples)
            gen = self.module.generative(z, library, batch)
            px, mean = gen["px"], gen["px_rate"]
            values = [mean]
            if likelihood != "poisson":
                theta = px.scale**2 if likelihood == "normal" else px.theta
                values.append(theta.expand_as(mean))
            if likelihood == "zinb":
                values.append(px.zi_probs)
            out = torch.stack(values, -1)  # ([samples,] cells, genes, parameters)
            if n_samples > 1:
                out = out.transpose(0, 1) if keep else out.mean(0)
            return out

        rows = self._rows(td, indices, batch_size, params, deterministic=n_samples == 1)
        if rows is None:  # no cells
            shape = (0, n_samples, td.n_vars) if keep else (0, td.n_vars)
            rows = np.zeros((*shape, len(names)), np.float32)
        if keep:  # cells, samples → samples, cells
            rows = rows.swapaxes(0, 1)
        return {k: np.ascontiguousarray(rows[..., i]) for i, k in enumerate(names)}

    @getter_doc
    @torch.no_grad()
    def get_normalized_expression(
        self,
        adata=None,
        *,
        indices: Sequence[int] | None = None,
        transform_batch: str | Sequence[str] | None = None,
        gene_list: Sequence[str] | None = None,
        library_size: float | Literal["latent"] = 1,
        n_samples: int = 1,
        return_mean: bool = True,
        return_numpy: bool | None = None,
        batch_size: int | None = None,
    ) -> pd.DataFrame | np.ndarray:
        """Return denoised, library-normalised expression (cells × genes).

        Computed in chunks of ``batch_size`` cells written straight into the output; with
        ``gene_list`` only those genes' output rows of the decoder are evaluated.

        Parameters
        ----------
        {adata}
        {indices}
        transform_batch
            Decode every cell as if it came from this batch (or the average over a list of
            batches): batch-corrected expression. ``None`` uses each cell's own batch.
        gene_list
            Genes to return, as columns in the order given (default: all). scvi-tools returns
            them in ``var_names`` order: with ``return_numpy=True`` the columns then differ.
        library_size
            Scale the expression to this library size, or ``"latent"`` for the cell's own
            (observed or inferred) library. With registered size factors the decoder's scale
            is a softplus, not a softmax (as in scvi-tools): its values are the expected counts
            at size factor 1, which ``library_size`` multiplies, and rows do not sum to it.
        n_samples
            Average over this many posterior samples of z and of an inferred library (1: use
            their posterior means).
        {return_mean_samples}
        {return_numpy}
        {batch_size}

        Examples
        --------
        >>> import cellvae
        >>> adata = cellvae.datasets.synthetic(200, 30)
        >>> cellvae.SCVI.setup_anndata(adata, batch_key="batch")
        >>> model = cellvae.SCVI(adata).train(max_epochs=1, progress_bar=False)
        >>> expr = model.get_normalized_expression(transform_batch="batch0", gene_list=["gene1"])
        >>> expr.shape
        (200, 1)
        """
        self._check_trained()
        keep_samples, return_numpy = samples_kept(n_samples, return_mean, return_numpy)
        scale = library_scale(library_size)
        td, reg = self._data(adata)
        codes = self._batch_codes(transform_batch, reg)
        gene_idx, genes = self._gene_idx(gene_list, reg)
        idx = self._indices(td, indices)
        dev = self.device
        g_idx = None if gene_idx is None else gene_idx.to(dev)
        out = output_array((n_samples,) * keep_samples + (len(idx), len(genes)))
        with self._getter_mode(deterministic=n_samples == 1):
            self._expression_into(out, td, idx, batch_size, n_samples, codes, g_idx, scale)
        if return_numpy:
            return out
        names = self._obs_names(adata, idx)
        return pd.DataFrame(out, index=names, columns=genes, copy=False)  # pandas 3 would copy

    def _expression_into(self, out, td, idx, batch_size, n_samples, codes, g_idx, scale) -> None:
        """:meth:`get_normalized_expression`'s rows, written into ``out`` minibatch by minibatch."""
        keep_samples = out.ndim == 3
        start = 0
        factor = (1.0 if scale is None else scale) / len(codes)
        for batch in self._batches(td, idx, batch_size):
            inf = self.module.inference(batch, n_samples=n_samples)
            z, library = self._decoded_point(inf, n_samples)
            n = len(batch["batch"])
            target = torch.from_numpy(out[..., start : start + n, :])
            start += n
            on_cpu = z.device.type == "cpu"
            acc = None
            for code in codes:
                b = None if code is None else torch.full_like(batch["batch"], code)
                # on CPU the first batch code's softmax is written straight into the output rows
                dest = target if acc is None and n_samples == 1 and on_cpu else None
                value = self.module.expression_scale(z, batch, batch=b, gene_idx=g_idx, out=dest)
                if scale is None:  # library_size="latent"
                    value = value.mul_(torch.exp(library))
                value = value.mean(0) if n_samples > 1 and not keep_samples else value
                acc = value if acc is None else acc.add_(value)
            if acc.data_ptr() == target.data_ptr():
                if factor != 1.0:
                    target.mul_(factor)
            elif on_cpu:  # scaled straight into the output rows: no extra copy of the chunk
                torch.mul(acc, factor, out=target)
            else:
                target.copy_(acc.mul_(factor))

    @getter_doc
    def get_marginal_ll(
        self,
        adata=None,
        *,
        indices=None,
        n_mc_samples: int = 1000,
        batch_size: int | None = None,
        return_mean: bool = True,
    ) -> float | np.ndarray:
        """Return the importance-sampled marginal log-likelihood log p(x) per cell.

        Higher is better (the same quantity, and sign, as scvi-tools' ``get_marginal_ll``).
        Needs ``latent_distribution="normal"`` (NotImplementedError for ``"ln"``).

        Parameters
        ----------
        {adata}
        {indices}
        n_mc_samples
            Importance samples per cell (drawn in chunks: memory does not grow with it).
        batch_size
            Cells per forward pass (default 128).
        {return_mean_cells}

        Examples
        --------
        >>> import cellvae
        >>> adata = cellvae.datasets.synthetic(100, 20)
        >>> cellvae.SCVI.setup_anndata(adata)
        >>> model = cellvae.SCVI(adata).train(max_epochs=1, progress_bar=False)
        >>> model.get_marginal_ll(n_mc_samples=20) >= model.get_elbo() - 1.0
        True
        """
        check_count("n_mc_samples", n_mc_samples)
        check_count("batch_size", batch_size, allow_none=True)
        fn = lambda b: self.module.marginal_ll(b, n_mc_samples)
        batch_size = 128 if batch_size is None else batch_size
        return mean_or_rows(self._per_cell(adata, indices, batch_size, fn), return_mean)

    @getter_doc
    @torch.no_grad()
    def posterior_predictive_sample(
        self,
        adata=None,
        *,
        indices=None,
        transform_batch: str | None = None,
        n_samples: int = 1,
        gene_list: Sequence[str] | None = None,
        batch_size: int | None = None,
    ) -> np.ndarray:
        """Draw counts from the posterior predictive (cells × genes [× n_samples]).

        Parameters
        ----------
        {adata}
        {indices}
        transform_batch
            Draw every cell's counts as if it came from this one batch (``None``: its own).
        n_samples
            Samples per cell: a third axis when more than 1 (as in scvi-tools).
        gene_list
            Genes to sample, as columns in the order given (default: all).
        {batch_size}

        Examples
        --------
        >>> import cellvae
        >>> adata = cellvae.datasets.synthetic(100, 20)
        >>> cellvae.SCVI.setup_anndata(adata)
        >>> model = cellvae.SCVI(adata).train(max_epochs=1, progress_bar=False)
        >>> model.posterior_predictive_sample(n_samples=3).shape
        (100, 20, 3)
        """
        check_count("n_samples", n_samples)
        self._check_trained()
        td, reg = self._data(adata)
        codes = self._batch_codes(transform_batch, reg)
        if len(codes) > 1:
            raise ValueError(
                "posterior_predictive_sample draws the counts of one batch: pass one "
                f"transform_batch, not {len(codes)}."
            )
        gene_idx, _ = self._gene_idx(gene_list, reg)
        g_idx = None if gene_idx is None else gene_idx.to(self.device)

        def sample(batch):
            inf = self.module.inference(batch, n_samples=n_samples)
            b = None if codes[0] is None else torch.full_like(batch["batch"], codes[0])
            z, library = inf["z"], inf["library"]
            gen = self.module.generative(z, library, batch, batch=b, gene_idx=g_idx)
            x = gen["px"].sample()
            return x.permute(1, 2, 0) if n_samples > 1 else x

        return self._rows(td, indices, batch_size, sample)
