"""Real single-cell data shipped inside the package, and a synthetic count generator.

Nothing here downloads anything: the two real data sets are small ``.h5ad`` files that live next to
this module (see ``PROVENANCE.md`` in this folder for where each came from).
"""

from __future__ import annotations

import numbers
from importlib.resources import files

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

__all__ = ["eccite_pbmc", "kang_ifnb", "synthetic"]


def _read(name: str) -> ad.AnnData:
    path = files(__name__).joinpath(name)
    with path.open("rb") as fh:
        return ad.read_h5ad(fh)


def kang_ifnb() -> ad.AnnData:
    """Kang et al. 2018 PBMC, control vs IFN-β stimulated: 2,000 cells × 9,015 genes.

    A random sample of 1,000 cells per condition, as made by the harmony package for its
    Seurat vignette (``immunogenomics/harmony``, ``data/pbmc_stim.RData``). ``.X`` holds raw
    integer counts (CSR, float32); ``obs["batch"]`` is the condition (``ctrl`` / ``stim``),
    ``obs["stim"]`` the same in capitals, ``obs["cell_type"]`` marker-based silver labels (with
    ``obs["cell_type_confidence"]``; ``unknown`` where the rules could not decide).

    Citation: Kang HM et al., "Multiplexed droplet single-cell RNA-sequencing using natural
    genetic variation", Nat Biotechnol 36:89–94 (2018), doi:10.1038/nbt.4042, GEO GSE96583.
    Licence: the data are public in GEO; the harmony package that sampled them is GPL-3.

    Returns
    -------
    A new :class:`~anndata.AnnData` with raw counts in ``.X``.

    Examples
    --------
    >>> import cellvae
    >>> adata = cellvae.datasets.kang_ifnb()
    >>> adata.shape
    (2000, 9015)
    """
    return _read("kang_ifnb_ctrl_stim_2k.h5ad")


def eccite_pbmc() -> ad.AnnData:
    """ECCITE-seq PBMC (Mimitou et al. 2019): 500 cells × 19,521 genes with 49 proteins.

    The 500-cell subset shipped by the Bioconductor package CiteFuse
    (``SydneyBioX/CiteFuse``, ``data/CITEseq_example.rda``). ``.X`` holds raw RNA counts (CSR,
    float32); ``obsm["protein_expression"]`` the raw ADT counts as a DataFrame whose columns are
    the protein names; ``obsm["hto_counts"]`` the hashtag counts; ``obs["batch"]`` is a single
    batch ``control``; ``obs["cell_type"]`` marker-based silver labels, many validated by protein.

    Citation: Mimitou EP et al., "Multiplexed detection of proteins, transcriptomes, clonotypes
    and CRISPR perturbations in single cells", Nat Methods 16:409–412 (2019), GEO GSE126310.
    Licence: the data are public in GEO; the CiteFuse package is GPL-3.

    Returns
    -------
    A new :class:`~anndata.AnnData` with raw counts in ``.X`` and proteins in ``.obsm``.

    Examples
    --------
    >>> import cellvae
    >>> adata = cellvae.datasets.eccite_pbmc()
    >>> adata.obsm["protein_expression"].shape
    (500, 49)
    """
    return _read("eccite_pbmc_cite_500.h5ad")


def _named_codes(prefix: str, codes: np.ndarray, n: int) -> pd.Categorical:
    """``prefix0``, ``prefix1``, ... for the codes: all ``n`` categories, drawn or not."""
    return pd.Categorical.from_codes(codes, categories=[f"{prefix}{i}" for i in range(n)])


def synthetic(
    n_obs: int = 400,
    n_vars: int = 100,
    *,
    n_batches: int = 2,
    n_proteins: int = 0,
    n_labels: int = 3,
    batch_effect: float = 1.0,
    sparse: bool = True,
    random_state: int = 0,
) -> ad.AnnData:
    """Draw negative-binomial counts with cell types, batch effects and optional proteins.

    Each cell type has its own log-mean profile; batch 0 is the reference and each other
    batch multiplies every gene by ``exp(batch_effect · N(0, 1))``; library sizes are
    log-normal. Proteins (if any) are a
    mixture of a per-batch background and a cell-type-specific foreground.

    Parameters
    ----------
    n_obs, n_vars
        Number of cells and genes.
    n_batches, n_labels
        Number of batches (``obs["batch"]``) and cell types (``obs["cell_type"]``), the
        categories of those columns (each cell draws one uniformly: with few cells some may
        have none).
    n_proteins
        Number of proteins written to ``obsm["protein_expression"]`` (a DataFrame); 0 for none.
    batch_effect
        Standard deviation of the per-gene log fold change of each batch against batch 0
        (between two other batches it is ``√2 · batch_effect``).
    sparse
        Store ``.X`` as CSR (default) or as a dense array.
    random_state
        Seed of the generator; the same seed gives the same data.

    Returns
    -------
    An :class:`~anndata.AnnData` with integer-valued float32 counts.

    Examples
    --------
    >>> import cellvae
    >>> adata = cellvae.datasets.synthetic(200, 50, n_batches=2, n_proteins=5)
    >>> adata.obsm["protein_expression"].shape
    (200, 5)
    """
    counts = {"n_obs": n_obs, "n_vars": n_vars, "n_batches": n_batches, "n_labels": n_labels}
    for name, value in {**counts, "n_proteins": n_proteins}.items():
        least = 0 if name == "n_proteins" else 1
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
            raise ValueError(f"{name} must be an integer of at least {least}, got {value!r}.")
    if not (isinstance(batch_effect, numbers.Real) and 0 <= batch_effect < float("inf")):
        raise ValueError(f"batch_effect must be a finite number >= 0, got {batch_effect!r}.")
    rng = np.random.default_rng(random_state)
    labels = rng.integers(n_labels, size=n_obs)
    batches = rng.integers(n_batches, size=n_obs)
    type_logmean = rng.normal(-1.0, 1.5, size=(n_labels, n_vars))
    batch_lfc = rng.normal(0.0, batch_effect, size=(n_batches, n_vars))
    batch_lfc[0] = 0.0
    logits = type_logmean[labels] + batch_lfc[batches]
    rho = np.exp(logits - logits.max(1, keepdims=True))
    rho /= rho.sum(1, keepdims=True)
    library = np.exp(rng.normal(np.log(max(n_vars, 1) * 5.0), 0.3, size=(n_obs, 1)))
    mu = rho * library
    theta = np.exp(rng.normal(1.0, 0.5, size=n_vars))
    counts = rng.poisson(rng.gamma(theta, mu / theta)).astype(np.float32)
    X = sp.csr_matrix(counts) if sparse else counts

    obs = pd.DataFrame(
        {
            "batch": _named_codes("batch", batches, n_batches),
            "cell_type": _named_codes("type", labels, n_labels),
        },
        index=[f"cell{i}" for i in range(n_obs)],
    )
    var = pd.DataFrame(index=[f"gene{j}" for j in range(n_vars)])
    adata = ad.AnnData(X=X, obs=obs, var=var)
    if n_proteins > 0:
        background = np.exp(rng.normal(3.0, 0.5, size=(n_batches, n_proteins)))
        fold = 1.0 + np.exp(rng.normal(1.5, 0.5, size=(n_labels, n_proteins)))
        positive = rng.random((n_labels, n_proteins)) < 0.4
        rate = background[batches] * np.where(positive[labels], fold[labels], 1.0)
        proteins = rng.poisson(rng.gamma(5.0, rate / 5.0)).astype(np.float32)
        adata.obsm["protein_expression"] = pd.DataFrame(
            proteins, index=adata.obs_names, columns=[f"prot{t}" for t in range(n_proteins)]
        )
    return adata
