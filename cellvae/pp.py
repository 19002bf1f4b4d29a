"""Preprocessing: register an AnnData for cellvae models (the only writer of setup state)."""

from __future__ import annotations

import dataclasses
import inspect
import logging
from collections.abc import Callable, Sequence

import anndata as ad
import numpy as np
import pandas as pd

from ._registry import (
    UNS_KEY,
    Registry,
    category_positions,
    get_counts,
    scan_counts,
    warn_user,
)

logger = logging.getLogger(__name__)

__all__ = ["setup_anndata", "transfer_setup", "view_setup"]


def check_anndata(adata) -> None:
    """Raise a TypeError, saying how to make one, unless ``adata`` is an AnnData."""
    if not isinstance(adata, ad.AnnData):
        if type(adata).__name__ == "MuData":
            raise TypeError(
                "Expected an AnnData, got a MuData: for RNA and proteins, build the AnnData "
                "with cellvae.TOTALVI.setup_mudata(mdata, ...) and pass that; for RNA alone, "
                "pass mdata.mod['rna']."
            )
        raise TypeError(
            f"Expected an AnnData, got {type(adata).__name__}. Wrap raw counts (cells × genes) "
            "as anndata.AnnData(counts), with obs and var for the cells and genes."
        )


def _check_keys(**keys) -> None:
    """Each registered key names one column (or layer, obsm entry): a string or None."""
    for what, key in keys.items():
        if key is not None and not isinstance(key, str):
            more = ""
            if what == "batch_key":
                more = " For several batch columns, pass the others as categorical_covariate_keys."
            raise TypeError(f"{what} must be one name (a string) or None, got {key!r}.{more}")


def check_not_view(adata) -> None:
    """Raise for an AnnData view, naming the copy that works (in memory or backed)."""
    if getattr(adata, "is_view", False):
        fix = "adata = adata.to_memory()" if adata.isbacked else "adata = adata.copy()"
        raise ValueError(
            f"Received a view of an AnnData: make it an AnnData of its own first ({fix})."
        )


def _obs_column(adata, key: str, what: str) -> pd.Series:
    if key not in adata.obs.columns:
        raise KeyError(
            f"{what} {key!r} is not a column of adata.obs (columns: {list(adata.obs.columns)}). "
            "Pass an existing column name, or add the column to adata.obs first."
        )
    return adata.obs[key]


def _categories(adata, key: str | None, what: str, *, can_fill: bool = True) -> tuple[str, ...]:
    """The categories of ``obs[key]`` that occur, as text (``("0",)`` without a key).

    ``can_fill``: whether a new category may be made of the missing values (not in data for a
    trained model, whose categories are fixed): the error's advice depends on it.
    """
    if key is None:
        return ("0",)
    col = _obs_column(adata, key, what)
    if col.isna().any():
        fill = (
            f"Fill them (e.g. adata.obs[{key!r}] = adata.obs[{key!r}].astype(str) to make 'nan' "
            "a category) or drop those cells"
            if can_fill
            else "The reference has no category for them: drop those cells"
        )
        raise ValueError(
            f"obs[{key!r}] ({what}) has {int(col.isna().sum())} missing (NaN) values. {fill}: "
            f"adata = adata[adata.obs[{key!r}].notna()].copy()."
        )
    if isinstance(col.dtype, pd.CategoricalDtype):
        # the categories that occur, found from the codes: no string per cell (at 1M cells
        # `col.astype(str)` took ~65 MB, the peak of the whole set-up)
        cats = col.cat.categories
        used = np.bincount(col.cat.codes.to_numpy(), minlength=len(cats)) > 0
        return tuple(str(c) for c, u in zip(cats, used) if u)
    if pd.api.types.is_numeric_dtype(col) and not pd.api.types.is_bool_dtype(col):
        # numbers in numeric order (2 before 10), written as `Registry.codes` reads them
        return tuple(pd.Series(np.sort(col.unique())).astype(str))
    return tuple(sorted(set(col.astype(str))))


def _keys(keys: str | Sequence[str] | None) -> tuple[str, ...]:
    """Covariate keys as a tuple: one string is one key (not its letters)."""
    return (keys,) if isinstance(keys, str) else tuple(keys or ())


_CATEGORY_HINT = " Register it with categorical_covariate_keys instead if it is a category."


def _continuous(
    adata, keys: Sequence[str], what: str = "continuous covariate", hint: str = _CATEGORY_HINT
) -> None:
    for key in keys:
        col = _obs_column(adata, key, what)
        if not pd.api.types.is_numeric_dtype(col):
            raise ValueError(
                f"{what.capitalize()} obs[{key!r}] has dtype {col.dtype}; it must be numeric."
                + hint
            )
        values = col.to_numpy(dtype=float, na_value=np.nan)
        if not np.isfinite(values).all():
            fill = 1 if what == "size factor" else 0  # size factors must stay positive
            raise ValueError(
                f"{what.capitalize()} obs[{key!r}] has {int((~np.isfinite(values)).sum())} NaN "
                f"or infinite values. Fill them (e.g. adata.obs[{key!r}].fillna({fill})) or drop "
                f"those cells: adata = adata[np.isfinite(adata.obs[{key!r}])].copy()."
            )


def protein_matrix(adata, obsm_key: str) -> np.ndarray:
    """Return ``adata.obsm[obsm_key]`` as a validated float32 array (cells × proteins)."""
    if obsm_key not in adata.obsm:
        raise KeyError(
            f"Protein key {obsm_key!r} is not in adata.obsm (keys: {list(adata.obsm.keys())}). "
            "Pass protein_expression_obsm_key= the obsm key holding the raw ADT counts to "
            f"setup_anndata; for a trained TOTALVI, put them in adata.obsm[{obsm_key!r}]."
        )
    raw = adata.obsm[obsm_key]
    if isinstance(raw, pd.DataFrame):
        _check_unique_proteins(raw.columns, f"obsm[{obsm_key!r}]'s columns")
        non_numeric = [c for c in raw.columns if not pd.api.types.is_numeric_dtype(raw[c])]
        if non_numeric:
            raise ValueError(
                f"obsm[{obsm_key!r}] has non-numeric protein columns {non_numeric[:5]}; "
                "protein counts must be numbers. Drop those columns or convert them, e.g. "
                f"adata.obsm[{obsm_key!r}] = adata.obsm[{obsm_key!r}].astype(float)."
            )
        values = raw.to_numpy(dtype=np.float32)
    else:
        if hasattr(raw, "toarray"):
            raw = raw.toarray()
        values = np.asarray(raw)
        if not np.issubdtype(values.dtype, np.number):
            raise ValueError(
                f"obsm[{obsm_key!r}] has dtype {values.dtype}; protein counts must be numeric. "
                f"Convert them, e.g. adata.obsm[{obsm_key!r}] = "
                f"adata.obsm[{obsm_key!r}].astype(np.float32)."
            )
        values = values.astype(np.float32, copy=False)
    if values.ndim != 2 or values.shape[0] != adata.n_obs:
        raise ValueError(
            f"obsm[{obsm_key!r}] has shape {values.shape}; expected ({adata.n_obs}, n_proteins): "
            "one row per cell, in the order of adata.obs_names."
        )
    if not np.isfinite(values).all():
        raise ValueError(
            f"obsm[{obsm_key!r}] contains {int((~np.isfinite(values)).sum())} NaN or infinite "
            "protein counts. Set proteins that were not measured to 0 (a batch whose counts of "
            "a protein are all 0 is treated as not measuring it), or drop those cells."
        )
    if (values < 0).any():
        raise ValueError(
            f"obsm[{obsm_key!r}] contains {int((values < 0).sum())} negative protein counts; "
            "register raw ADT counts, not normalised values."
        )
    return values


def _protein_names(adata, obsm_key: str, uns_key: str | None, n: int) -> tuple[str, ...]:
    if uns_key is not None:
        if uns_key not in adata.uns:
            raise KeyError(
                f"protein_names_uns_key {uns_key!r} is not in adata.uns (keys: "
                f"{list(adata.uns.keys())}). Store the names there first, or pass a DataFrame "
                "with the protein names as columns in obsm."
            )
        names = tuple(str(s) for s in np.asarray(adata.uns[uns_key]).ravel())
    elif isinstance(adata.obsm[obsm_key], pd.DataFrame):
        names = tuple(str(c) for c in adata.obsm[obsm_key].columns)
    else:
        names = tuple(f"protein_{i}" for i in range(n))
    if len(names) != n:
        raise ValueError(
            f"Got {len(names)} protein names for {n} protein columns. Give exactly one name per "
            "column of the protein matrix."
        )
    where = f"uns[{uns_key!r}]" if uns_key is not None else f"obsm[{obsm_key!r}]'s columns"
    _check_unique_proteins(names, where)
    return names


def _check_unique_proteins(names, where: str) -> None:
    """Raise a ValueError naming the proteins that appear more than once (as text) in ``names``."""
    text = pd.Index([str(s) for s in names])
    repeated = list(dict.fromkeys(text[text.duplicated()]))
    if repeated:
        raise ValueError(
            f"Protein names must be unique, but {repeated[:5]} appear more than once in {where}. "
            "Rename or drop the repeated columns (a protein measured twice: keep one of them)."
        )


def empty_cells_error(n: int) -> ValueError:
    """The error for training data with ``n`` cells without counts."""
    return ValueError(
        f"{n} cells have zero total counts; training needs at least one count per cell. "
        "Remove them first: sc.pp.filter_cells(adata, min_counts=1) "
        "(then adata = adata.copy() if you sliced)."
    )


# floor of the latent library prior's variance: equal-depth cells (downsampled to one depth)
# have a variance of 0 (or ~1e-30 in rounding), whose prior turns the ELBO into ~1e31
LIBRARY_VAR_FLOOR = 1e-2


def _library_stats(library: np.ndarray, codes: np.ndarray, n_batch: int):
    """Per batch, the mean and variance of the cells' log library (the latent library prior)."""
    log_lib = np.log(np.maximum(library, 1.0))
    means, variances = [], []
    for b in range(n_batch):
        vals = log_lib[(codes == b) & (library > 0)]  # cells without counts have no library
        means.append(float(vals.mean()) if vals.size else 0.0)
        var = float(vals.var()) if vals.size > 1 else 1.0
        variances.append(max(var, LIBRARY_VAR_FLOOR))
    return tuple(means), tuple(variances)


def _build_registry(
    adata,
    *,
    layer: str | None,
    batch_key: str | None,
    labels_key: str | None,
    size_factor_key: str | None,
    categorical_covariate_keys: str | Sequence[str] | None,
    continuous_covariate_keys: str | Sequence[str] | None,
    protein_expression_obsm_key: str | None,
    protein_names_uns_key: str | None,
    categories: dict[str, tuple[str, ...]] | None = None,
) -> Registry:
    """Validate ``adata`` and compute a registry; touches nothing in ``adata``."""
    check_anndata(adata)
    if categories is None:  # a new setup, written into adata; registry_like reads views
        check_not_view(adata)
    _check_keys(
        layer=layer,
        batch_key=batch_key,
        labels_key=labels_key,
        size_factor_key=size_factor_key,
        protein_expression_obsm_key=protein_expression_obsm_key,
        protein_names_uns_key=protein_names_uns_key,
    )
    cat_keys, cont_keys = _keys(categorical_covariate_keys), _keys(continuous_covariate_keys)
    # a column injected twice (the batch again as a covariate, a key listed twice) adds nothing
    # but a duplicate input
    injected = [batch_key] * (batch_key is not None) + list(cat_keys) + list(cont_keys)
    twice = sorted({k for k in injected if injected.count(k) > 1})
    if twice:
        raise ValueError(
            f"obs columns {twice} are registered more than once (batch_key, "
            "categorical_covariate_keys, continuous_covariate_keys): name each column once."
        )
    counts = get_counts(adata, layer)
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise ValueError(
            f"The AnnData is empty ({adata.n_obs} cells × {adata.n_vars} genes). Register an "
            "AnnData with at least one cell and one gene."
        )

    against_reference = categories is not None  # registry_like: a reference's categories
    categories = categories or {}
    batch_cats = categories.get("batch") or _categories(adata, batch_key, "batch_key")
    label_cats = categories.get("labels") or _categories(adata, labels_key, "labels_key")
    cov_cats = tuple(
        categories.get(f"cat:{k}") or _categories(adata, k, "categorical covariate")
        for k in cat_keys
    )
    _continuous(adata, cont_keys)
    if size_factor_key is not None:
        _continuous(adata, [size_factor_key], "size factor", hint="")
        if (adata.obs[size_factor_key].to_numpy(dtype=float, na_value=np.nan) <= 0).any():
            raise ValueError(
                f"Size factors obs[{size_factor_key!r}] must be strictly positive; found values "
                "<= 0. Fix or drop those cells, or leave size_factor_key=None to use the "
                "observed library size."
            )

    protein_names: tuple[str, ...] = ()
    mask: tuple[tuple[bool, ...], ...] = ()
    proteins = None
    if protein_expression_obsm_key is not None:
        proteins = protein_matrix(adata, protein_expression_obsm_key)
        if not np.array_equal(np.floor(proteins), proteins):  # once, at set-up (as the RNA's)
            warn_user(
                f"obsm[{protein_expression_obsm_key!r}] contains non-integer protein values; "
                "TOTALVI's protein likelihood expects raw ADT counts. If they were normalised "
                "(log1p, CLR, scaled), register the raw counts instead."
            )
        protein_names = _protein_names(
            adata, protein_expression_obsm_key, protein_names_uns_key, proteins.shape[1]
        )

    stats = scan_counts(counts, adata.n_obs, adata.n_vars)
    empty = int((stats["library"] <= 0).sum())
    if empty and against_reference:  # data for a trained model: it encodes them all the same
        warn_user(
            f"{empty} cells have zero total counts: their latent representation is the encoding "
            "of an empty cell, and their expression at library_size='latent' is 0 with the "
            "observed library. To leave them out: sc.pp.filter_cells(adata, min_counts=1)."
        )
    elif empty:
        raise empty_cells_error(empty)
    n_empty_genes = int((stats["gene_totals"] <= 0).sum())
    # data registered against a reference keep its genes: filtering them is not the fix there
    if n_empty_genes and not against_reference:
        warn_user(
            f"{n_empty_genes} genes have zero counts in every cell; they carry no information. "
            "Consider sc.pp.filter_genes(adata, min_counts=1)."
        )
    if not against_reference and not adata.var_names.is_unique:
        dup = adata.var_names[adata.var_names.duplicated()].unique()
        warn_user(
            f"{len(dup)} gene names occur more than once (e.g. {list(dup[:5])}): selecting genes "
            "by name (gene_list=...) and matching new data to this setup by name are ambiguous. "
            "Consider adata.var_names_make_unique() before setup."
        )

    reg = Registry(var_names=(), batch_categories=batch_cats)
    batch_codes = reg.codes(adata, batch_key, batch_cats)
    if proteins is not None:
        present = np.zeros((len(batch_cats), proteins.shape[1]), dtype=bool)
        np.logical_or.at(present, batch_codes, proteins > 0)
        mask = tuple(tuple(bool(v) for v in row) for row in present)
        for b, row in zip(batch_cats, present):
            if not row.all():
                logger.info(
                    "Batch %r has %d proteins with all-zero counts; they are treated as "
                    "missing in that batch.",
                    b,
                    int((~row).sum()),
                )
    means, variances = _library_stats(stats["library"], batch_codes, len(batch_cats))
    return Registry(
        var_names=tuple(str(v) for v in adata.var_names),
        layer=layer,
        batch_key=batch_key,
        labels_key=labels_key,
        size_factor_key=size_factor_key,
        categorical_covariate_keys=cat_keys,
        continuous_covariate_keys=cont_keys,
        protein_expression_obsm_key=protein_expression_obsm_key,
        protein_names_uns_key=protein_names_uns_key,
        batch_categories=batch_cats,
        label_categories=label_cats,
        categorical_covariate_categories=cov_cats,
        protein_names=protein_names,
        protein_batch_mask=mask,
        library_log_means=means,
        library_log_vars=variances,
        n_obs=int(adata.n_obs),
        n_nonzero=int(stats["nnz"]),
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
    protein_expression_obsm_key: str | None = None,
    protein_names_uns_key: str | None = None,
) -> None:
    """Register where the counts, batch, labels, covariates and proteins live in ``adata``.

    Validates the data and stores one plain, h5ad-safe record in ``adata.uns["cellvae"]``.
    Nothing is added to ``obs`` and no matrix is modified. On any error the AnnData is left
    unchanged.

    Parameters
    ----------
    adata
        AnnData with raw counts (not a view).
    layer
        Layer holding the raw counts; ``None`` uses ``adata.X``.
    batch_key
        Column of ``obs`` with the batch of each cell; ``None`` for a single batch.
    labels_key
        Column of ``obs`` with cell labels (used by ``dispersion="gene-label"``).
    size_factor_key
        Column of ``obs`` with positive size factors, used instead of the observed library size.
    categorical_covariate_keys
        Extra categorical ``obs`` columns injected into the networks (one name or a list).
    continuous_covariate_keys
        Numeric ``obs`` columns concatenated to the network inputs (one name or a list).
    protein_expression_obsm_key
        Key of ``obsm`` with raw protein (ADT) counts, a DataFrame or an array (TOTALVI).
    protein_names_uns_key
        Key of ``uns`` with protein names, when ``obsm`` holds a plain array.

    Examples
    --------
    >>> import cellvae
    >>> adata = cellvae.datasets.kang_ifnb()
    >>> cellvae.pp.setup_anndata(adata, batch_key="batch", labels_key="cell_type")
    >>> adata.uns["cellvae"]["batch_categories"]
    ['ctrl', 'stim']
    """
    reg = _build_registry(
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
    adata.uns[UNS_KEY] = reg.to_dict()
    logger.info("Registered %d cells × %d genes in adata.uns[%r].", reg.n_obs, reg.n_vars, UNS_KEY)


def setup_doc(*names: str) -> Callable:
    """Write :func:`setup_anndata`'s entries of ``names`` into a model's ``setup_anndata`` doc.

    The entries replace the docstring's ``{setup_parameters}`` line, at its indentation, so
    that the models' API pages list their parameters with the text of one source.
    """

    def decorate(fn: Callable) -> Callable:
        if not (fn.__doc__ and setup_anndata.__doc__):  # None under python -OO
            return fn
        doc = inspect.cleandoc(setup_anndata.__doc__)
        section = doc.split("Parameters\n----------\n", 1)[1].split("\n\n", 1)[0]
        entries: dict[str, list[str]] = {}
        for line in section.splitlines():
            if line.startswith(" "):
                entries[name].append(line.strip())  # noqa: F821 (set by the name line above it)
            else:
                name = line.strip()
                entries[name] = []
        lines = fn.__doc__.splitlines()
        at = next(i for i, line in enumerate(lines) if line.strip() == "{setup_parameters}")
        indent = lines[at][: len(lines[at]) - len(lines[at].lstrip())]
        text = [f"{indent}{n}" + "".join(f"\n{indent}    {d}" for d in entries[n]) for n in names]
        fn.__doc__ = "\n".join([*lines[:at], *text, *lines[at + 1 :]])
        return fn

    return decorate


_EXTEND_HINT = "Pass extend_categories=True to add them."
MODEL_UNSEEN_HINT = (
    "A trained model cannot encode cells of categories it was not trained on (mapping new "
    "batches onto a reference model, as scvi-tools' load_query_data does, is not available in "
    "cellvae yet): drop those cells, or train a model on data that includes them."
)


def _extend(
    known: tuple[str, ...], new: tuple[str, ...], key: str | None, allow: bool, hint: str
) -> tuple[str, ...]:
    # '1.0' from a float column is the reference's '1' (category_positions)
    unseen = [c for c, p in zip(new, category_positions(new, known)) if p < 0]
    if unseen and not allow:
        raise ValueError(
            f"obs[{key!r}] has categories {unseen[:10]} not seen by the reference "
            f"(known: {list(known)[:10]}). {hint}"
        )
    return known + tuple(unseen)


def transfer_setup(adata, source, *, extend_categories: bool = False) -> Registry:
    """Register ``adata`` with the setup of a reference (a model, an AnnData or a registry).

    The genes must be the reference's, in the same order. Category mappings are kept, so codes
    mean the same thing in both; unseen categories are rejected unless ``extend_categories``.
    Labels are optional in the new data: a labels column that is absent, or has cells without a
    label (NaN), is not registered (unseen labels are added).

    Parameters
    ----------
    adata
        New AnnData (not a view) with the same genes as the reference.
    source
        A trained model, an AnnData set up with :func:`setup_anndata`, or a :class:`Registry`.
    extend_categories
        Append unseen batch / label / covariate categories instead of raising.

    Returns
    -------
    The registry written to ``adata.uns["cellvae"]``.

    Examples
    --------
    >>> import cellvae
    >>> ref = cellvae.datasets.synthetic(100, 30, random_state=0)
    >>> cellvae.pp.setup_anndata(ref, batch_key="batch")
    >>> query = cellvae.datasets.synthetic(50, 30, random_state=1)
    >>> reg = cellvae.pp.transfer_setup(query, ref)
    >>> reg.batch_categories == tuple(ref.uns["cellvae"]["batch_categories"])
    True
    """
    check_not_view(adata)  # the setup is written into it
    reg = registry_like(adata, source, extend_categories=extend_categories)
    adata.uns[UNS_KEY] = reg.to_dict()
    return reg


_GENES_ARE = "where genes = list(model.registry_.var_names) (or the reference AnnData's var_names)"


def registry_like(
    adata, source, *, extend_categories: bool = False, unseen_hint: str = _EXTEND_HINT
) -> Registry:
    """Validate ``adata`` against a reference setup and return its registry, writing nothing.

    Used by :func:`transfer_setup` and by models that are given new data in their getters
    (``unseen_hint``: what the error for unseen categories tells the user to do). An
    in-memory view is read as it is (a getter's ``adata[mask]``); a backed view is not.
    """
    check_anndata(adata)
    if adata.isbacked:
        check_not_view(adata)
    if isinstance(source, Registry):
        ref = source
    elif hasattr(source, "registry_"):
        ref = source.registry_
    else:
        ref = Registry.from_adata(source)
    genes = [str(v) for v in adata.var_names]
    if genes != list(ref.var_names):
        ref_set, new_set = set(ref.var_names), set(genes)
        missing = [g for g in ref.var_names if g not in new_set]
        extra = [g for g in genes if g not in ref_set]
        if missing or extra:
            raise ValueError(
                f"The genes differ from the reference: {len(missing)} missing "
                f"(e.g. {missing[:5]}), {len(extra)} extra (e.g. {extra[:5]}). Add the missing "
                "genes as zero columns, then subset and reorder to the reference's genes: "
                f"adata = adata[:, genes].copy(), {_GENES_ARE}."
            )
        raise ValueError(
            "The genes are the reference's but in a different order. Reorder them: "
            f"adata = adata[:, genes].copy(), {_GENES_ARE}."
        )
    if ref.layer is not None and ref.layer not in adata.layers:
        raise KeyError(
            f"The reference reads raw counts from adata.layers[{ref.layer!r}], which this "
            f"AnnData lacks (layers: {list(adata.layers.keys())}): store its raw counts there, "
            f"e.g. adata.layers[{ref.layer!r}] = adata.X.copy() if X holds them."
        )
    kwargs = ref.setup_kwargs()
    cats: dict[str, tuple[str, ...]] = {}
    if ref.batch_key is not None:
        new = _categories(adata, ref.batch_key, "batch_key", can_fill=extend_categories)
        cats["batch"] = _extend(
            ref.batch_categories, new, ref.batch_key, extend_categories, unseen_hint
        )
    if ref.labels_key is not None:
        # optional in new data: a column that is absent or not filled for every cell is left out
        col = adata.obs.get(ref.labels_key)
        if col is not None and not col.isna().any():
            new = _categories(adata, ref.labels_key, "labels_key")
            cats["labels"] = _extend(ref.label_categories, new, ref.labels_key, True, "")
        else:
            kwargs["labels_key"] = None
    for key, known in zip(ref.categorical_covariate_keys, ref.categorical_covariate_categories):
        new = _categories(adata, key, "categorical covariate", can_fill=extend_categories)
        cats[f"cat:{key}"] = _extend(known, new, key, extend_categories, unseen_hint)
    names_key = ref.protein_names_uns_key
    if names_key is not None and names_key not in adata.uns:
        kwargs["protein_names_uns_key"] = None  # then named by a DataFrame's columns
    reg = _build_registry(adata, **kwargs, categories=cats)
    obsm_key = ref.protein_expression_obsm_key
    unnamed = (
        obsm_key is not None
        and kwargs["protein_names_uns_key"] is None
        and not isinstance(adata.obsm[obsm_key], pd.DataFrame)
    )
    if unnamed and reg.n_proteins != ref.n_proteins:  # its placeholder names mean nothing
        more = ", ..." if ref.n_proteins > 5 else ""
        raise ValueError(
            f"obsm[{obsm_key!r}] has {reg.n_proteins} protein columns; the reference has "
            f"{ref.n_proteins} ({', '.join(ref.protein_names[:5])}{more}). Give one column per "
            "reference protein, in its order (absent proteins as zero columns), or a DataFrame "
            "with the protein names as columns."
        )
    if unnamed:  # a plain array: the reference's proteins, by position
        reg = dataclasses.replace(reg, protein_names=ref.protein_names)
    if reg.protein_names != ref.protein_names:
        missing = [p for p in ref.protein_names if p not in set(reg.protein_names)]
        extra = [p for p in reg.protein_names if p not in set(ref.protein_names)]
        how = (
            f"{len(missing)} missing (e.g. {missing[:5]}), {len(extra)} extra (e.g. {extra[:5]})"
            if missing or extra
            else "the same names in a different order"
        )
        raise ValueError(
            f"The proteins in obsm[{ref.protein_expression_obsm_key!r}] differ from the "
            f"reference's: {how}. Reorder the columns to the reference's protein names (adding "
            "absent proteins as zero columns)."
        )
    if kwargs["labels_key"] is None and ref.labels_key is not None:
        reg = dataclasses.replace(reg, label_categories=ref.label_categories)
    return reg


def view_setup(adata) -> None:
    """Print a readable summary of the cellvae setup of ``adata``.

    Parameters
    ----------
    adata
        AnnData registered with :func:`setup_anndata`.

    Examples
    --------
    >>> import cellvae
    >>> adata = cellvae.datasets.synthetic(100, 20)
    >>> cellvae.pp.setup_anndata(adata, batch_key="batch")
    >>> cellvae.pp.view_setup(adata)  # doctest: +ELLIPSIS
    cellvae setup: 100 cells × 20 genes...
    """
    print(format_setup(Registry.from_adata(adata)))


def format_setup(reg: Registry) -> str:
    """Return the text :func:`view_setup` prints."""
    density = reg.n_nonzero / max(reg.n_obs * reg.n_vars, 1)
    rows = [
        ("counts", f"adata.layers[{reg.layer!r}]" if reg.layer else "adata.X"),
        ("batch", _describe(reg.batch_key, reg.batch_categories)),
        ("labels", _describe(reg.labels_key, reg.label_categories)),
        ("size factors", f"obs[{reg.size_factor_key!r}]" if reg.size_factor_key else "—"),
    ]
    for key, cats in zip(reg.categorical_covariate_keys, reg.categorical_covariate_categories):
        rows.append(("categorical covariate", _describe(key, cats)))
    for key in reg.continuous_covariate_keys:
        rows.append(("continuous covariate", f"obs[{key!r}]"))
    if reg.n_proteins:
        missing = sum(not v for row in reg.protein_batch_mask for v in row)
        rows.append(
            (
                "proteins",
                f"obsm[{reg.protein_expression_obsm_key!r}]: {reg.n_proteins} proteins, "
                f"{missing} (batch, protein) pairs missing",
            )
        )
    rows.append(
        (
            "library (log)",
            ", ".join(
                f"{b}: {m:.2f} ± {v**0.5:.2f}"
                for b, m, v in zip(
                    reg.batch_categories, reg.library_log_means, reg.library_log_vars
                )
            ),
        )
    )
    width = max(len(r[0]) for r in rows)
    lines = [
        f"cellvae setup: {reg.n_obs} cells × {reg.n_vars} genes, "
        f"{reg.n_nonzero} nonzero counts ({density:.1%})",
        f"{'field'.ljust(width)}  where",
        f"{'-' * width}  {'-' * 40}",
    ]
    lines += [f"{name.ljust(width)}  {where}" for name, where in rows]
    return "\n".join(lines)


def _describe(key: str | None, cats: tuple[str, ...]) -> str:
    if key is None:
        return "—"
    shown = ", ".join(cats[:6]) + (", …" if len(cats) > 6 else "")
    return f"obs[{key!r}]: {len(cats)} categories ({shown})"
