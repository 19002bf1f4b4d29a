"""TOTALVI: the user-facing totalVI model for CITE-seq RNA + protein (Gayoso et al. 2021)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch

from .. import pp
from .._data import TensorData
from .._registry import Registry
from ..module import TOTALVAE
from ..module._base import check_flags
from ._base import (
    BaseModel,
    as_list,
    check_model_options,
    getter_doc,
    library_scale,
    output_array,
    samples_kept,
)

_PRIOR_MAX_CELLS = 20_000  # cells per batch used to initialise the background prior


class TOTALVI(BaseModel):
    """Joint model of RNA and protein counts (CITE-seq) with a protein background model.

    Register the data first with :meth:`setup_anndata` (proteins in ``obsm``) or
    :meth:`setup_mudata`. Each protein count is a mixture of a background and a foreground
    negative binomial; the background prior is initialised per batch and protein from the lower
    mode of ``log(1 + y)``. Proteins with all-zero counts in a batch are treated as not
    measured there and masked out of that batch's likelihood; decode those cells with
    ``transform_batch`` set to a batch that measured them.

    Parameters
    ----------
    adata
        AnnData registered with :meth:`setup_anndata` (with proteins).
    n_latent
        Size of the latent space.
    gene_dispersion
        ``"gene"``, ``"gene-batch"`` or ``"gene-label"``.
    protein_dispersion
        ``"protein"``, ``"protein-batch"`` or ``"protein-label"``.
    gene_likelihood
        ``"nb"`` or ``"zinb"``.
    latent_distribution
        ``"normal"`` or ``"ln"`` (logistic normal).
    n_hidden
        Width of the hidden layers.
    n_layers_encoder, n_layers_decoder
        Depth of the encoder and of each decoder stack.
    dropout_rate_encoder, dropout_rate_decoder
        Dropout in the encoder and the decoder.
    adversarial_classifier
        Train an adversarial batch classifier on z (helps mixing when proteins are missing in
        some batches); see :class:`cellvae.module.TOTALVAE`. None (default): on exactly when
        some batch did not measure some protein, as scvi-tools decides.
    use_observed_lib_size
        Use the observed gene library size instead of the latent one (totalVI's default).
    **module_kwargs
        Further :class:`cellvae.module.TOTALVAE` options: ``use_batch_norm`` and
        ``use_layer_norm`` (``"encoder"``, ``"decoder"``, ``"both"`` or ``"none"``, as in
        scvi-tools; default ``"both"`` and ``"none"``), ``adversarial_weight``.

    Examples
    --------
    >>> import cellvae
    >>> adata = cellvae.datasets.synthetic(300, 50, n_proteins=8)
    >>> cellvae.TOTALVI.setup_anndata(
    ...     adata, batch_key="batch", protein_expression_obsm_key="protein_expression"
    ... )
    >>> model = cellvae.TOTALVI(adata, n_latent=5).train(max_epochs=2, progress_bar=False)
    >>> model.get_latent_representation().shape
    (300, 5)
    >>> rna, protein = model.get_normalized_expression()
    >>> protein.shape
    (300, 8)
    """

    _module_cls = TOTALVAE
    _module_format = 2  # the decoder heads' covariates and softplus background scale
    _train_defaults = {
        "lr": 4e-3,
        "batch_size": 256,
        "early_stopping": True,
        "reduce_lr_on_plateau": True,
    }

    def __init__(
        self,
        adata,
        *,
        n_latent: int = 20,
        gene_dispersion: Literal["gene", "gene-batch", "gene-label"] = "gene",
        protein_dispersion: Literal["protein", "protein-batch", "protein-label"] = "protein",
        gene_likelihood: Literal["nb", "zinb"] = "nb",
        latent_distribution: Literal["normal", "ln"] = "normal",
        n_hidden: int = 256,
        n_layers_encoder: int = 2,
        n_layers_decoder: int = 1,
        dropout_rate_encoder: float = 0.2,
        dropout_rate_decoder: float = 0.2,
        adversarial_classifier: bool | None = None,
        use_observed_lib_size: bool = True,
        **module_kwargs: Any,
    ):
        allowed = {"use_batch_norm", "use_layer_norm", "adversarial_weight"}
        check_model_options(TOTALVI, module_kwargs, allowed)
        if adversarial_classifier is not None:
            check_flags(adversarial_classifier=adversarial_classifier)
        TOTALVAE.check_options(
            gene_dispersion, protein_dispersion, gene_likelihood, latent_distribution
        )
        super().__init__(
            adata,
            n_latent=n_latent,
            gene_dispersion=gene_dispersion,
            protein_dispersion=protein_dispersion,
            gene_likelihood=gene_likelihood,
            latent_distribution=latent_distribution,
            n_hidden=n_hidden,
            n_layers_encoder=n_layers_encoder,
            n_layers_decoder=n_layers_decoder,
            dropout_rate_encoder=dropout_rate_encoder,
            dropout_rate_decoder=dropout_rate_decoder,
            adversarial_classifier=adversarial_classifier,
            use_observed_lib_size=use_observed_lib_size,
            **module_kwargs,
        )

    # ------------------------------------------------------------------ setup
    @staticmethod
    @pp.setup_doc(
        "layer",
        "batch_key",
        "labels_key",
        "protein_names_uns_key",
        "categorical_covariate_keys",
        "continuous_covariate_keys",
        "size_factor_key",
    )
    def setup_anndata(
        adata,
        *,
        protein_expression_obsm_key: str,
        layer: str | None = None,
        batch_key: str | None = None,
        labels_key: str | None = None,
        protein_names_uns_key: str | None = None,
        categorical_covariate_keys: str | Sequence[str] | None = None,
        continuous_covariate_keys: str | Sequence[str] | None = None,
        size_factor_key: str | None = None,
    ) -> None:
        """Register ``adata`` (RNA counts and ``obsm`` proteins) for TOTALVI.

        As :func:`cellvae.pp.setup_anndata`, with ``protein_expression_obsm_key`` required.

        Parameters
        ----------
        adata
            AnnData with raw RNA counts (not a view).
        protein_expression_obsm_key
            Key of ``obsm`` with raw protein (ADT) counts, a DataFrame or an array (required).
        {setup_parameters}

        Examples
        --------
        >>> import cellvae, scanpy as sc
        >>> adata = cellvae.datasets.eccite_pbmc()
        >>> sc.pp.filter_genes(adata, min_counts=1)  # 4,602 genes have no count in these cells
        >>> cellvae.TOTALVI.setup_anndata(adata, protein_expression_obsm_key="protein_expression")
        >>> len(adata.uns["cellvae"]["protein_names"])
        49
        """
        if protein_expression_obsm_key is None:
            raise ValueError(
                "TOTALVI needs protein counts: pass protein_expression_obsm_key= the obsm key "
                "holding the raw ADT counts (e.g. 'protein_expression')."
            )
        pp.setup_anndata(
            adata,
            layer=layer,
            batch_key=batch_key,
            labels_key=labels_key,
            size_factor_key=size_factor_key,
            categorical_covariate_keys=categorical_covariate_keys,
            continuous_covariate_keys=continuous_covariate_keys,
            protein_expression_obsm_key=protein_expression_obsm_key,
            protein_names_uns_key=protein_names_uns_key,
        )

    @staticmethod
    def setup_mudata(
        mdata,
        *,
        rna_layer: str | None = None,
        protein_layer: str | None = None,
        batch_key: str | None = None,
        modalities: Mapping[str, str] | None = None,
    ):
        """Build a registered AnnData from a MuData with RNA and protein modalities.

        Needs the optional ``mudata`` package. The RNA modality is copied; the protein counts
        (``X`` or ``protein_layer`` of the protein modality, aligned to the RNA cells by name)
        go to ``obsm["protein_expression"]`` as a DataFrame. ``batch_key`` may be a column of the
        RNA modality's ``obs`` or of ``mdata.obs``. The MuData itself is not modified.

        Parameters
        ----------
        mdata
            MuData with an RNA and a protein modality.
        rna_layer, protein_layer
            Layers with raw counts (default ``X``).
        batch_key
            Batch column.
        modalities
            Names of the modalities, default ``{"rna": "rna", "protein": "protein"}``.

        Returns
        -------
        The new AnnData, registered with :meth:`setup_anndata`; pass it to :class:`TOTALVI`.

        Examples
        --------
        >>> import anndata as ad, cellvae, mudata
        >>> adata = cellvae.datasets.synthetic(100, 20, n_proteins=4)
        >>> protein = ad.AnnData(adata.obsm.pop("protein_expression"))
        >>> mdata = mudata.MuData({"rna": adata, "protein": protein})
        >>> rna = cellvae.TOTALVI.setup_mudata(mdata, batch_key="batch")
        >>> rna.obsm["protein_expression"].shape
        (100, 4)
        """
        unknown = sorted(set(modalities or {}) - {"rna", "protein"})
        if unknown:  # e.g. scvi-tools' {"rna_layer": ..., "protein_layer": ..., "batch_key": ...}
            raise KeyError(
                f"Unknown modalities keys {unknown}: modalities maps 'rna' and 'protein' to the "
                "names of the MuData's modalities, e.g. {'rna': 'rna', 'protein': 'prot'}. "
                "Layers and the batch go to rna_layer=..., protein_layer=... and batch_key=...."
            )
        try:
            import mudata  # noqa: F401
        except ImportError as err:
            raise ImportError(
                "TOTALVI.setup_mudata needs the optional mudata package: pip install mudata. "
                "Or build an AnnData with the proteins in obsm and use TOTALVI.setup_anndata."
            ) from err
        names = {"rna": "rna", "protein": "protein", **(modalities or {})}
        for role, name in names.items():
            if name not in mdata.mod:
                raise KeyError(
                    f"The {role} modality {name!r} is not in the MuData (modalities: "
                    f"{list(mdata.mod)}). Pass modalities={{'{role}': '<name>'}}."
                )
        rna, prot = mdata.mod[names["rna"]], mdata.mod[names["protein"]]
        missing = rna.obs_names.difference(prot.obs_names)
        if len(missing):
            raise ValueError(
                f"{len(missing)} cells of the {names['rna']!r} modality have no row in the "
                f"{names['protein']!r} modality (e.g. {list(missing[:3])}). Subset both "
                "modalities to the same cells first (mudata's intersect_obs)."
            )
        if not prot.obs_names.is_unique:
            raise ValueError("The protein modality has duplicate cell names; make them unique.")
        values = prot.layers[protein_layer] if protein_layer is not None else prot.X
        values = values.toarray() if hasattr(values, "toarray") else np.asarray(values)
        rows = prot.obs_names.get_indexer(rna.obs_names)
        adata = rna.copy()
        adata.obsm["protein_expression"] = pd.DataFrame(
            values[rows], index=adata.obs_names, columns=[str(v) for v in prot.var_names]
        )
        if batch_key is not None and batch_key not in adata.obs:
            prefixed = f"{names['rna']}:{batch_key}"
            for col in (batch_key, prefixed):
                if col in mdata.obs:
                    adata.obs[batch_key] = mdata.obs.loc[adata.obs_names, col].to_numpy()
                    break
        TOTALVI.setup_anndata(
            adata,
            layer=rna_layer,
            batch_key=batch_key,
            protein_expression_obsm_key="protein_expression",
        )
        return adata

    def _check_setup(self, registry: Registry) -> None:
        if registry.n_proteins == 0:
            raise ValueError(
                "TOTALVI needs protein counts, but this AnnData was registered without them. "
                "Run cellvae.TOTALVI.setup_anndata(adata, protein_expression_obsm_key="
                "'protein_expression', ...) first."
            )

    def _per_label_option(self) -> str | None:
        options = [
            f"{name}={value!r}"
            for name, value in (
                ("gene_dispersion", self.module.gene_dispersion),
                ("protein_dispersion", self.module.protein_dispersion),
            )
            if value.endswith("-label")
        ]
        return " and ".join(options) or None

    def _module_kwargs(self) -> dict[str, Any]:
        reg: Registry = self.registry_
        prior_mean = prior_scale = None
        if self.adata is not None:  # when loading, the saved weights replace the prior
            td, _ = self._data()
            prior_mean, prior_scale = protein_background_prior(
                td.protein.numpy(), td.batch.numpy(), np.asarray(reg.protein_batch_mask, bool)
            )
        return {
            "n_input_genes": reg.n_vars,
            "n_input_proteins": reg.n_proteins,
            "n_batch": reg.n_batch,
            "n_labels": reg.n_labels,
            "n_continuous_cov": reg.n_continuous_covariates,
            "n_cats_per_cov": reg.n_cats_per_covariate,
            "use_size_factor_key": reg.size_factor_key is not None,
            "library_log_means": list(reg.library_log_means),
            "library_log_vars": list(reg.library_log_vars),
            "protein_batch_mask": np.asarray(reg.protein_batch_mask, dtype=bool),
            "protein_background_prior_mean": prior_mean,
            "protein_background_prior_scale": prior_scale,
            **self.hparams,
            "adversarial_classifier": self._adversarial(),
        }

    def _adversarial(self) -> bool:
        """The adversarial classifier's switch: as given, or on when a batch lacks a protein."""
        chosen = self.hparams.get("adversarial_classifier")
        if chosen is not None:
            return bool(chosen)
        return not np.asarray(self.registry_.protein_batch_mask, dtype=bool).all()

    # ------------------------------------------------------------------ getters
    _reconstruction_names = ("reconst_loss_gene", "reconst_loss_protein")

    def _library_counts(self, inf: dict[str, torch.Tensor]) -> torch.Tensor:
        return inf["library"]  # TOTALVAE's inference gives the count scale already

    def _reconstruction_terms(self, out) -> list[torch.Tensor]:
        protein = out.extra["reconstruction_protein"]
        return [out.reconstruction - protein, protein]

    def _protein_idx(self, protein_list, reg: Registry) -> tuple[np.ndarray, list[str]]:
        if protein_list is None:
            return np.arange(reg.n_proteins), list(reg.protein_names)
        protein_list = as_list(protein_list)
        if not protein_list:
            raise ValueError("protein_list is empty: pass protein names, or None for all.")
        lookup = {p: i for i, p in enumerate(reg.protein_names)}
        missing = [p for p in protein_list if p not in lookup]
        if missing:
            raise KeyError(
                f"Proteins not in the model: {missing[:10]} (known: {list(reg.protein_names)[:10]}"
                "…)."
            )
        return np.array([lookup[p] for p in protein_list], dtype=np.int64), list(protein_list)

    @torch.no_grad()
    def _decode(
        self,
        td: TensorData,
        idx: torch.Tensor,
        codes: list[int | None],
        n_samples: int,
        batch_size: int | None,
        fn: Callable[[dict, torch.Tensor], dict[str, torch.Tensor]],
        widths: dict[str, int],
        keep_samples: bool = False,
        *,
        deterministic: bool | None = None,
    ) -> dict[str, np.ndarray]:
        """Decode cells ``idx`` in chunks and average ``fn``'s outputs over samples and batches.

        ``fn(gen, library)`` returns tensors by name (``(samples,) cells × width``). Outputs named
        ``"proteins"`` (all proteins) are averaged over the batches in ``codes`` that measured
        each protein (all of them where none did); the others over all batches in ``codes``.
        With ``keep_samples`` the outputs are samples × cells × width, not averaged over samples.
        The callers have checked ``n_samples`` (``samples_kept``). ``deterministic`` (default:
        ``n_samples == 1``) says that ``fn`` draws no randomness either, so torch's generators
        are left as they were (:meth:`_getter_mode`).
        """
        lead = (n_samples,) if keep_samples else ()  # samples_kept: only with n_samples > 1
        out = {k: output_array(lead + (len(idx), w)) for k, w in widths.items()}
        deterministic = n_samples == 1 if deterministic is None else deterministic
        with self._getter_mode(deterministic=deterministic):
            self._decode_into(out, lead, td, idx, codes, n_samples, batch_size, fn)
        return out

    def _decode_into(self, out, lead, td, idx, codes, n_samples, batch_size, fn) -> None:
        """:meth:`_decode`'s rows, written into ``out`` minibatch by minibatch."""
        module = self.module
        mask = module.protein_batch_mask.float()
        start = 0
        for batch in self._batches(td, idx, batch_size):
            inf = module.inference(batch, n_samples=n_samples)
            if n_samples == 1:  # the posterior means: deterministic output
                z = module.encoder.z_transformation(inf["qz_m"])
                library = inf["library"]
                if inf["ql_m"] is not None:  # the log-normal mean, as get_latent_library_size
                    library = torch.exp((inf["ql_m"] + inf["ql_v"] / 2).clamp(max=15.0))
            else:
                z, library = inf["z"], inf["library"]
            acc: dict[str, torch.Tensor] = {}
            weights = torch.zeros(mask.shape[1], device=mask.device)
            for code in codes:
                b = None if code is None else torch.full_like(batch["batch"], code)
                gen = module.generative(z, library, batch, batch=b, sample_background=n_samples > 1)
                values = fn(gen, library)
                w = torch.ones_like(weights) if code is None else mask[code]
                weights += w
                for k, v in values.items():
                    v = v.mean(0) if n_samples > 1 and not lead else v
                    acc[k] = acc.get(k, 0) + v
                    if k == "proteins":
                        acc["_weighted"] = acc.get("_weighted", 0) + v * w
            n = len(batch["batch"])
            for k in out:
                value = acc[k] / len(codes)
                if k == "proteins":
                    measured = weights > 0
                    value = torch.where(measured, acc["_weighted"] / weights.clamp_min(1), value)
                out[k][..., start : start + n, :] = value.cpu().numpy()
            start += n

    @getter_doc
    @torch.no_grad()
    def get_normalized_expression(
        self,
        adata=None,
        *,
        indices: Sequence[int] | None = None,
        transform_batch: str | Sequence[str] | None = None,
        gene_list: Sequence[str] | None = None,
        protein_list: Sequence[str] | None = None,
        library_size: float | Literal["latent"] = 1,
        n_samples: int = 1,
        include_protein_background: bool = False,
        sample_protein_mixing: bool = False,
        scale_protein: bool = False,
        return_mean: bool = True,
        return_numpy: bool | None = None,
        batch_size: int | None = None,
    ) -> tuple[pd.DataFrame, pd.DataFrame] | tuple[np.ndarray, np.ndarray]:
        """Return denoised RNA (library-normalised) and protein expression.

        The protein value is the foreground rate times the foreground probability
        ``(1 − σ(mixing)) · rate_fore``, plus ``σ(mixing) · rate_back`` with
        ``include_protein_background``. Computed in chunks of ``batch_size`` cells written into
        preallocated outputs.

        Parameters
        ----------
        {adata}
        {indices}
        transform_batch
            Decode every cell as if from this batch (or average over a list of batches). For
            proteins, the average runs over the listed batches that measured each protein.
            ``None`` decodes each cell in its own batch: proteins its batch did not measure are
            then extrapolations; pass a batch that measured them.
        gene_list, protein_list
            Genes and proteins to return, as columns in the order given (default: all);
            scvi-tools returns them in the model's order.
        library_size
            Scale the RNA to this library size, or ``"latent"`` for the cell's own library.
            With registered size factors the RNA scale is a softplus (as in scvi-tools): its
            values are the expected counts at size factor 1, which ``library_size``
            multiplies, and rows do not sum to it.
        n_samples
            Average over this many posterior samples (1: the posterior means, deterministic
            unless ``sample_protein_mixing``; scvi-tools draws one sample). The decoder is not
            linear, so the average over samples differs from the value at the means.
        include_protein_background
            Add the background component to the protein values.
        sample_protein_mixing
            Sample background / foreground from the mixing probability instead of weighting
            (random at every call, from torch's global random state).
        scale_protein
            Scale each cell's protein values (over all proteins) to sum to 1, also after the
            average over ``transform_batch``.
        return_mean
            With ``n_samples > 1``, False returns every sample instead of their mean (arrays).
        return_numpy
            Return float32 arrays instead of DataFrames (default: only for the samples of
            ``return_mean=False``).
        {batch_size}

        Returns
        -------
        ``(rna, protein)``: cells × genes and cells × proteins; cells × genes × samples and
        cells × proteins × samples with ``n_samples > 1`` and ``return_mean=False`` (the
        layout of scvi-tools' TOTALVI; SCVI's getters put the samples first).

        Examples
        --------
        >>> import cellvae
        >>> adata = cellvae.datasets.synthetic(200, 30, n_proteins=5)
        >>> cellvae.TOTALVI.setup_anndata(
        ...     adata, batch_key="batch", protein_expression_obsm_key="protein_expression"
        ... )
        >>> model = cellvae.TOTALVI(adata).train(max_epochs=1, progress_bar=False)
        >>> rna, protein = model.get_normalized_expression(
        ...     transform_batch="batch0", gene_list=["gene1"], protein_list=["prot0", "prot3"]
        ... )
        >>> rna.shape, protein.shape
        ((200, 1), (200, 2))
        """
        self._check_trained()
        keep_samples, return_numpy = samples_kept(n_samples, return_mean, return_numpy)
        td, reg = self._data(adata)
        codes = self._batch_codes(transform_batch, reg)
        gene_idx, genes = self._gene_idx(gene_list, reg)
        protein_idx, proteins = self._protein_idx(protein_list, reg)
        idx = self._indices(td, indices)
        scale = library_scale(library_size)  # None: the latent library
        g_idx = None if gene_idx is None else gene_idx.to(self.device)

        def fn(gen: dict, library: torch.Tensor) -> dict[str, torch.Tensor]:
            px_, py_ = gen["px_"], gen["py_"]
            rna = px_["rate"] if scale is None else px_["scale"] * scale
            p_back = torch.sigmoid(py_["mixing"])
            if sample_protein_mixing:
                p_back = torch.bernoulli(p_back)
            protein = py_["rate_fore"] * (1 - p_back)
            if include_protein_background:
                protein = protein + py_["rate_back"] * p_back
            if scale_protein:
                protein = protein / protein.sum(-1, keepdim=True)
            return {"genes": rna if g_idx is None else rna[..., g_idx], "proteins": protein}

        widths = {"genes": len(genes), "proteins": reg.n_proteins}
        out = self._decode(
            td,
            idx,
            codes,
            n_samples,
            batch_size,
            fn,
            widths,
            keep_samples,
            deterministic=n_samples == 1 and not sample_protein_mixing,
        )
        if scale_protein:  # the per-protein averages over the batches that measured each protein
            out["proteins"] /= out["proteins"].sum(-1, keepdims=True)  # need not sum to 1
        rna, protein = out["genes"], out["proteins"][..., protein_idx]
        if keep_samples:  # cells × features × samples, as scvi-tools' TOTALVI returns them
            return np.moveaxis(rna, 0, -1), np.moveaxis(protein, 0, -1)
        if return_numpy:
            return rna, protein
        names = self._obs_names(adata, idx)
        return (
            pd.DataFrame(rna, index=names, columns=genes, copy=False),
            pd.DataFrame(protein, index=names, columns=proteins, copy=False),
        )

    @getter_doc
    @torch.no_grad()
    def get_protein_foreground_probability(
        self,
        adata=None,
        *,
        indices: Sequence[int] | None = None,
        transform_batch: str | Sequence[str] | None = None,
        protein_list: Sequence[str] | None = None,
        n_samples: int = 1,
        return_mean: bool = True,
        return_numpy: bool | None = None,
        batch_size: int | None = None,
    ) -> pd.DataFrame | np.ndarray:
        """Return the probability that each protein count comes from the foreground.

        ``1 − σ(mixing)`` per cell and protein, averaged over ``n_samples`` posterior samples
        (1: the posterior mean of z) and over the batches of ``transform_batch`` (for each
        protein, over those that measured it).

        Parameters
        ----------
        {adata}
        {indices}
        transform_batch
            Batch (or list of batches) to decode as; None for each cell's own batch.
        protein_list
            Proteins to return (default: all).
        n_samples
            Number of posterior samples.
        {return_mean_samples}
        {return_numpy}
        {batch_size}

        Examples
        --------
        >>> import cellvae
        >>> adata = cellvae.datasets.synthetic(200, 30, n_proteins=5)
        >>> cellvae.TOTALVI.setup_anndata(adata, protein_expression_obsm_key="protein_expression")
        >>> model = cellvae.TOTALVI(adata).train(max_epochs=1, progress_bar=False)
        >>> fg = model.get_protein_foreground_probability()
        >>> bool(((fg >= 0) & (fg <= 1)).all().all())
        True
        """
        foreground = lambda py_: 1 - torch.sigmoid(py_["mixing"])
        options = (transform_batch, protein_list, n_samples, return_mean, return_numpy)
        return self._per_protein(adata, indices, *options, batch_size, foreground)

    @getter_doc
    @torch.no_grad()
    def get_protein_background_mean(
        self,
        adata=None,
        *,
        indices: Sequence[int] | None = None,
        transform_batch: str | Sequence[str] | None = None,
        protein_list: Sequence[str] | None = None,
        n_samples: int = 1,
        return_mean: bool = True,
        return_numpy: bool | None = None,
        batch_size: int | None = None,
    ) -> pd.DataFrame | np.ndarray:
        """Return the mean of each protein's background component (counts, cells × proteins).

        The background rate ``rate_back`` of the protein mixture: the mean of its log-normal,
        ``exp(α + σ²/2)``, with ``n_samples=1``, averaged over that many samples of it
        otherwise, and over the batches of ``transform_batch`` as the foreground probability is.

        Parameters
        ----------
        {adata}
        {indices}
        transform_batch
            Batch (or list of batches) to decode as; None for each cell's own batch.
        protein_list
            Proteins to return (default: all).
        n_samples
            Number of posterior samples (of z and of the background).
        {return_mean_samples}
        {return_numpy}
        {batch_size}

        Examples
        --------
        >>> import cellvae
        >>> adata = cellvae.datasets.synthetic(200, 30, n_proteins=5)
        >>> cellvae.TOTALVI.setup_anndata(adata, protein_expression_obsm_key="protein_expression")
        >>> model = cellvae.TOTALVI(adata).train(max_epochs=1, progress_bar=False)
        >>> model.get_protein_background_mean(protein_list=["prot0", "prot1"]).shape
        (200, 2)
        """
        background = lambda py_: py_["rate_back"]
        options = (transform_batch, protein_list, n_samples, return_mean, return_numpy)
        return self._per_protein(adata, indices, *options, batch_size, background)

    def _per_protein(
        self,
        adata,
        indices,
        transform_batch,
        protein_list,
        n_samples: int,
        return_mean: bool,
        return_numpy: bool | None,
        batch_size: int | None,
        value: Callable[[dict], torch.Tensor],
    ) -> pd.DataFrame | np.ndarray:
        """A getter of ``value(py_)`` per cell and protein, averaged as :meth:`_decode` does."""
        self._check_trained()
        keep_samples, return_numpy = samples_kept(n_samples, return_mean, return_numpy)
        td, reg = self._data(adata)
        codes = self._batch_codes(transform_batch, reg)
        protein_idx, proteins = self._protein_idx(protein_list, reg)
        idx = self._indices(td, indices)

        def fn(gen: dict, library: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"proteins": value(gen["py_"])}

        widths = {"proteins": reg.n_proteins}
        out = self._decode(td, idx, codes, n_samples, batch_size, fn, widths, keep_samples)
        values = out["proteins"][..., protein_idx]
        if keep_samples:  # cells × proteins × samples, as scvi-tools' TOTALVI
            return np.moveaxis(values, 0, -1)
        if return_numpy:
            return values
        return pd.DataFrame(values, index=self._obs_names(adata, idx), columns=proteins)


def protein_background_prior(
    protein: np.ndarray,
    batch: np.ndarray,
    mask: np.ndarray,
    *,
    n_iter: int = 50,
    max_cells: int = _PRIOR_MAX_CELLS,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Initial background prior: mean and std of the lower mode of ``log(1 + y)``.

    For each batch, one two-component Gaussian mixture is fitted to ``log(1 + y)`` of every
    protein at once by vectorised EM over the cells of the batch (at most ``max_cells``, drawn
    with ``seed``); the component with the lower mean is the background. Proteins a batch did
    not measure (``mask[b, t] == False``) get the average over the batches that did.

    Parameters
    ----------
    protein
        Raw protein counts, cells × proteins.
    batch
        Batch code of each cell.
    mask
        ``(n_batch, n_proteins)`` booleans, True where the batch measured the protein.
    n_iter
        EM iterations.
    max_cells
        Cells per batch used for the fit.
    seed
        Seed of the cell subsample.

    Returns
    -------
    ``(mean, scale)``, each ``(n_proteins, n_batch)``.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> neg, pos = rng.poisson(5, (500, 3)), rng.poisson(300, (500, 3))
    >>> y = np.where(rng.random((500, 3)) < 0.5, neg, pos)
    >>> mean, scale = protein_background_prior(y, np.zeros(500, int), np.ones((1, 3), bool))
    >>> bool(np.all(np.abs(mean - np.log1p(5)) < 0.3))
    True
    """
    mask = np.asarray(mask, dtype=bool)
    n_batch, n_proteins = mask.shape
    mean = np.zeros((n_proteins, n_batch))
    scale = np.ones((n_proteins, n_batch))
    rng = np.random.default_rng(seed)
    for b in range(n_batch):  # one vectorised fit per batch (a handful of batches)
        cells = np.flatnonzero(batch == b)
        if len(cells) == 0:
            continue
        if len(cells) > max_cells:
            cells = np.sort(rng.choice(cells, max_cells, replace=False))
        mean[:, b], scale[:, b] = _lower_mode(
            np.log1p(np.asarray(protein[cells], np.float64)), n_iter
        )
    present = mask.T  # (proteins, batches)
    n_present = present.sum(1, keepdims=True)
    fill_mean = np.where(
        n_present > 0, (mean * present).sum(1, keepdims=True) / np.maximum(n_present, 1), 0.0
    )
    fill_scale = np.where(
        n_present > 0, (scale * present).sum(1, keepdims=True) / np.maximum(n_present, 1), 1.0
    )
    mean = np.where(present, mean, fill_mean)
    scale = np.where(present, scale, fill_scale)
    return mean.astype(np.float32), scale.astype(np.float32)


def _lower_mode(v: np.ndarray, n_iter: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std of the lower component of a 2-Gaussian fit to each column of ``v``."""
    var_floor = 0.05**2
    lo, hi = np.quantile(v, 0.2, axis=0), np.quantile(v, 0.9, axis=0)
    mu = np.stack([lo, np.maximum(hi, lo + 0.5)])  # (2, proteins)
    var = np.broadcast_to(np.maximum(v.var(0), var_floor), mu.shape).copy()
    w = np.full(mu.shape, 0.5)
    for _ in range(n_iter):
        log_p = (
            np.log(w)[:, None]
            - 0.5 * np.log(2 * np.pi * var)[:, None]
            - 0.5 * (v[None] - mu[:, None]) ** 2 / var[:, None]
        )  # (2, cells, proteins)
        r = np.exp(log_p - np.logaddexp(log_p[0], log_p[1])[None])
        nk = r.sum(1) + 1e-10
        mu = (r * v[None]).sum(1) / nk
        var = np.maximum((r * (v[None] - mu[:, None]) ** 2).sum(1) / nk, var_floor)
        w = np.clip(nk / v.shape[0], 1e-6, 1.0)
    low = np.argmin(mu, axis=0)
    cols = np.arange(v.shape[1])
    return mu[low, cols], np.sqrt(var[low, cols])
