"""Plotting in the style of ``scanpy.pl``: training curves, latent spaces and TOTALVI proteins.

Every function draws on new axes (or on ``ax``), shows the figure when ``show`` is true (default:
:attr:`scanpy.settings.autoshow`), saves it when ``save`` is given, and returns the axes only with
``show=False``, like ``scanpy.pl``. Functions that need a UMAP compute it on the requested latent
space under their own keys, so the user's ``obsm["X_umap"]`` and ``uns["neighbors"]`` are never
overwritten.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .pp import check_not_view

if TYPE_CHECKING:
    from matplotlib.axes import Axes

logger = logging.getLogger(__name__)

__all__ = ["foreground_probability", "history", "latent", "protein_denoised"]

_FIG_EXTENSIONS = (".pdf", ".png", ".svg", ".jpg", ".jpeg")

_TITLES = {
    "loss": "training loss (KL-weighted)",
    "elbo": "negative ELBO per cell",
    "reconstruction": "reconstruction loss per cell",
    "kl_local": "KL divergence (local) per cell",
    "kl_weight": "KL weight",
    "lr": "learning rate",
}


# ---------------------------------------------------------------------- helpers
def _pyplot():
    """``matplotlib.pyplot``, imported on first use: ``import cellvae`` stays 31 MB lighter."""
    import matplotlib.pyplot as plt

    return plt


def _finish(writekey: str, axes: Any, fig, *, show: bool | None, save: bool | str | None):
    """Save and/or show ``fig`` the way ``scanpy.pl`` does; return ``axes`` unless shown.

    A saved figure is closed afterwards (its axes can still be read), and ``save=None`` follows
    ``scanpy.settings.autosave``.

    ``save=True`` writes ``{figdir}/{writekey}{plot_suffix}.{file_format_figs}``; a string is
    appended to ``writekey`` (its extension, if any, picks the format), as in scanpy.
    """
    import scanpy as sc  # here, not at import: 145 MB and 2 s that training never needs

    save = sc.settings.autosave if save is None else save
    if save:
        ext = sc.settings.file_format_figs
        if isinstance(save, str):
            stem, dot, suffix = save.rpartition(".")
            if dot and f".{suffix.lower()}" in _FIG_EXTENSIONS:
                save, ext = stem, suffix
            writekey += save
        path = Path(sc.settings.figdir) / f"{writekey}{sc.settings.plot_suffix}.{ext}"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, bbox_inches="tight")  # dpi: rcParams["savefig.dpi"], as in scanpy
        logger.info("Saved figure to %s.", path)
    show = sc.settings.autoshow if show is None else show
    if show:
        _pyplot().show()
    if save:  # a saved figure is closed, as in scanpy: a loop of saves keeps none open
        _pyplot().close(fig)
    return None if show else axes


def _axes_list(ax, n: int, panel_size: tuple[float, float]) -> tuple[list[Axes], Any]:
    """Return ``n`` axes: new ones in a row, or those given in ``ax`` (one Axes or a sequence)."""
    if ax is None:
        fig, grid = _pyplot().subplots(
            1, n, figsize=(panel_size[0] * n, panel_size[1]), squeeze=False, layout="constrained"
        )
        return list(grid[0]), fig
    from matplotlib.axes import Axes

    axs = [ax] if isinstance(ax, Axes) else list(np.ravel(ax))
    if len(axs) != n:
        raise ValueError(f"Got {len(axs)} axes for {n} panels: pass one Axes per panel.")
    return axs, axs[0].figure


def _history_frame(source, uns_key: str | None = None) -> pd.DataFrame:
    """The per-epoch history of a model, a DataFrame, or an AnnData written by ``cellvae.tl``."""
    if isinstance(source, pd.DataFrame):
        return source
    if hasattr(source, "history_") and hasattr(source, "history"):
        hist = source.history
        if hist.empty:
            raise ValueError(
                f"This {type(source).__name__} has no training history: call model.train() first."
            )
        return hist
    uns = getattr(source, "uns", None)
    if uns is not None:
        found = [k for k, v in uns.items() if isinstance(v, dict) and "history" in v]
        if uns_key is not None:
            if uns_key not in found:
                raise KeyError(
                    f"adata.uns[{uns_key!r}] holds no training history; those that do: {found}."
                )
            found = [uns_key]
        if len(found) == 1:
            record = {k: np.asarray(v) for k, v in uns[found[0]]["history"].items()}
            frame = pd.DataFrame(record)
            return frame.set_index("epoch") if "epoch" in frame else frame
        if len(found) > 1:
            raise ValueError(
                f"adata.uns has several training histories ({found}): choose one with "
                f"uns_key=..., e.g. cellvae.pl.history(adata, uns_key={found[0]!r})."
            )
        raise ValueError(
            "adata.uns holds no training history: run cellvae.tl.scvi(adata, ...) first, or pass "
            "the trained model."
        )
    raise TypeError(
        f"Expected a trained cellvae model, an AnnData or a DataFrame, got {type(source).__name__}."
    )


def _basis_name(key: str) -> str:
    """``"X_scVI"`` → ``"scVI"``: the suffix of the keys that :func:`latent` writes."""
    return key[2:] if key.startswith("X_") and len(key) > 2 else key


# ---------------------------------------------------------------------- history
def history(
    model,
    *,
    keys: str | Sequence[str] = ("elbo", "reconstruction", "kl_local"),
    uns_key: str | None = None,
    ax: Axes | Sequence[Axes] | None = None,
    show: bool | None = None,
    save: bool | str | None = None,
) -> Axes | list[Axes] | None:
    """Plot training and validation curves per epoch, one panel per key.

    For each key, ``history["train_<key>"]`` and ``history["validation_<key>"]`` are drawn when
    present (validation is absent with ``validation_size=0``); a key that is itself a column
    (``"kl_weight"``, ``"lr"``) is drawn as one curve. Losses are per cell; lower is better.

    Parameters
    ----------
    model
        A trained :class:`cellvae.SCVI` (or any cellvae model), its ``history`` DataFrame, or an
        AnnData with the ``uns[...]["history"]`` record written by :func:`cellvae.tl.scvi`.
    keys
        Terms to plot: ``"elbo"`` (negative ELBO), ``"reconstruction"``, ``"kl_local"``,
        ``"loss"`` (the KL-weighted training objective), ``"kl_weight"``, ``"lr"``, or any other
        term of the model's history (without the ``train_`` / ``validation_`` prefix).
    uns_key
        With an AnnData: the ``uns`` record whose history to draw (``"scvi"``, ``"totalvi"``,
        or a ``key_added``). Default: the only record with a history.
    ax
        Axes to draw on: one per key (a single Axes when ``keys`` is one key). Default: a new
        figure with one panel per key.
    show
        Show the figure; default :attr:`scanpy.settings.autoshow`.
    save
        Save the figure to :attr:`scanpy.settings.figdir` as ``history{save}`` (``True``:
        ``history.<file_format_figs>``), as ``scanpy.pl`` does.

    Returns
    -------
    With ``show=False``, the Axes (a list, one per key; a single Axes when ``keys`` is a
    string); otherwise None.

    Examples
    --------
    >>> import cellvae
    >>> adata = cellvae.datasets.synthetic(200, 30)
    >>> cellvae.SCVI.setup_anndata(adata, batch_key="batch")
    >>> model = cellvae.SCVI(adata).train(max_epochs=3, progress_bar=False)
    >>> axes = cellvae.pl.history(model, show=False)
    >>> [ax.get_title() for ax in axes]
    ['negative ELBO per cell', 'reconstruction loss per cell', 'KL divergence (local) per cell']
    >>> ax = cellvae.pl.history(model, keys="kl_weight", show=False)
    """
    hist = _history_frame(model, uns_key)
    single = isinstance(keys, str)
    keys = [keys] if single else list(keys)
    if not keys:
        raise ValueError("keys is empty: name at least one term, e.g. keys=('elbo',).")
    curves = []
    for key in keys:
        cols = [(f"{p}_{key}", p) for p in ("train", "validation") if f"{p}_{key}" in hist]
        if not cols and key in hist:
            cols = [(key, key)]
        if not cols:
            terms = sorted(
                {c.removeprefix("train_").removeprefix("validation_") for c in hist.columns}
            )
            raise KeyError(f"No history for {key!r}; available: {terms}.")
        curves.append(cols)
    axs, fig = _axes_list(ax, len(keys), (4.0, 3.2))
    epochs = np.asarray(hist.index)
    for a, key, cols in zip(axs, keys, curves):
        for col, label in cols:
            values = np.asarray(hist[col], dtype=float)
            a.plot(epochs, values, label=label, color="C1" if label == "validation" else "C0")
        a.set_title(_TITLES.get(key, key))
        a.set_xlabel("epoch")
        if len(cols) > 1:
            a.legend(frameon=False)
    out = axs[0] if single else axs
    return _finish("history", out, fig, show=show, save=save)


# ---------------------------------------------------------------------- latent
def _check_colors(adata, color, gene_symbols: str | None) -> None:
    """Raise before any computation for a colour that is neither an obs column nor a gene."""
    colors = [] if color is None else [color] if isinstance(color, str) else list(color)
    known = set(adata.obs.columns) | set(adata.var_names)
    if adata.raw is not None:
        known |= set(adata.raw.var_names)
    if gene_symbols is not None and gene_symbols in adata.var:
        known |= set(adata.var[gene_symbols].astype(str))
    missing = [c for c in colors if c is not None and c not in known]
    if missing:
        raise KeyError(
            f"color {missing} is neither a column of adata.obs nor a gene of adata.var_names "
            f"(obs columns: {list(adata.obs.columns)})."
        )


def latent(
    adata,
    *,
    color: str | Sequence[str] | None = None,
    key: str = "X_scVI",
    n_neighbors: int = 15,
    random_state: int = 0,
    ax: Axes | None = None,
    show: bool | None = None,
    save: bool | str | None = None,
    **kwargs: Any,
) -> Axes | list[Axes] | None:
    """Compute a UMAP of the latent space ``obsm[key]`` and draw it with scanpy.

    Runs :func:`scanpy.pp.neighbors` on ``obsm[key]`` and :func:`scanpy.tl.umap` on that graph,
    then :func:`scanpy.pl.embedding`. The results go under keys derived from ``key`` (with its
    ``X_`` prefix dropped, ``scVI`` for ``X_scVI``), so the user's own ``uns["neighbors"]`` and
    ``obsm["X_umap"]`` are left alone:

    * ``uns["neighbors_scVI"]``, ``obsp["neighbors_scVI_distances"]`` and
      ``obsp["neighbors_scVI_connectivities"]``: the k-nearest-neighbour graph;
    * ``obsm["X_umap_scVI"]`` and ``uns["X_umap_scVI"]``: the UMAP and its parameters.

    They are recomputed on every call (use ``color=[...]`` to draw several colourings from one
    UMAP) and can be reused with scanpy, e.g.
    ``sc.tl.leiden(adata, neighbors_key="neighbors_scVI")`` or
    ``sc.pl.embedding(adata, basis="X_umap_scVI", color=...)``. As any scanpy plot,
    :func:`scanpy.pl.embedding` also turns the string columns of ``obs`` into categoricals and
    stores the colours of those it draws in ``uns["<column>_colors"]``.

    Parameters
    ----------
    adata
        AnnData with the latent representation in ``obsm[key]`` (not a view).
    color
        ``obs`` column(s) or gene name(s) to colour by, as in :func:`scanpy.pl.embedding`.
    key
        ``obsm`` key of the latent space (``"X_scVI"``, ``"X_totalVI"``, ...).
    n_neighbors
        Neighbours of the kNN graph.
    random_state
        Seed of the neighbour search and of the UMAP layout.
    ax
        Axes to draw on (one colour only). Default: new axes.
    show
        Show the figure; default :attr:`scanpy.settings.autoshow`.
    save
        Save the figure to :attr:`scanpy.settings.figdir` as ``latent{save}``.
    **kwargs
        Passed to :func:`scanpy.pl.embedding` (``frameon``, ``legend_loc``, ``ncols``,
        ``title``, ``palette``, ...).

    Returns
    -------
    With ``show=False``, the Axes (a list with several colours), as
    :func:`scanpy.pl.embedding` returns them; otherwise None.

    Examples
    --------
    >>> import cellvae
    >>> adata = cellvae.datasets.synthetic(200, 30)
    >>> cellvae.tl.scvi(adata, batch_key="batch", max_epochs=2, progress_bar=False)
    >>> axes = cellvae.pl.latent(adata, color=["batch", "cell_type"], show=False)
    >>> adata.obsm["X_umap_scVI"].shape
    (200, 2)
    """
    check_not_view(adata)
    if key not in adata.obsm:
        raise KeyError(
            f"adata.obsm has no {key!r}: run cellvae.tl.scvi(adata, ...) first, or set "
            f"adata.obsm[{key!r}] = model.get_latent_representation()."
        )
    if ax is not None and not isinstance(color, str | None) and len(color) > 1:
        raise ValueError("Pass ax only with a single color; scanpy draws several in new axes.")
    _check_colors(adata, color, kwargs.get("gene_symbols"))
    import scanpy as sc

    name = _basis_name(key)
    neighbors_key, umap_key = f"neighbors_{name}", f"X_umap_{name}"
    sc.pp.neighbors(
        adata,
        n_neighbors=n_neighbors,
        use_rep=key,
        random_state=random_state,
        key_added=neighbors_key,
    )
    sc.tl.umap(adata, neighbors_key=neighbors_key, random_state=random_state, key_added=umap_key)
    logger.info(
        "cellvae.pl.latent added uns[%r], obsp[%r], obsp[%r], obsm[%r], uns[%r].",
        neighbors_key,
        f"{neighbors_key}_distances",
        f"{neighbors_key}_connectivities",
        umap_key,
        umap_key,
    )
    # save=False: scanpy's own autosave would write (and close) the figure under its name
    axes = sc.pl.embedding(
        adata, basis=umap_key, color=color, ax=ax, show=False, save=False, **kwargs
    )
    axs = list(np.ravel(axes)) if isinstance(axes, list | np.ndarray) else [axes]
    for a in axs:  # scanpy names the axes after the basis, "X_umap_scVI1"
        a.set_xlabel(f"UMAP1 ({name})")
        a.set_ylabel(f"UMAP2 ({name})")
    return _finish("latent", axes, axs[0].figure, show=show, save=save)


# ---------------------------------------------------------------------- TOTALVI
def _setup_record(adata, model) -> dict[str, Any]:
    """The cellvae setup of the model, else the one stored in ``adata.uns["cellvae"]``."""
    if model is not None and getattr(model, "registry_", None) is not None:
        return model.registry_.setup_kwargs() | {"protein_names": model.registry_.protein_names}
    return dict(adata.uns.get("cellvae", {}))


def _one_name(names) -> bool:
    """Whether ``names`` is one name (a string, or a number such as a column 0), not a list."""
    return isinstance(names, str) or not isinstance(names, Iterable)


def _as_list(names: str | Sequence[str], what: str) -> list[str]:
    # as the setup writes them: integer columns 0, 1, ... are the proteins '0', '1', ...
    names = [str(n) for n in ([names] if _one_name(names) else names)]
    if not names:
        raise ValueError(f"Name at least one {what}.")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:  # one panel each: a repeated name would draw a column pair as one
        raise ValueError(f"Each {what} once: {repeated} repeat.")
    return names


def _protein_frame(
    adata, key: str, proteins: list[str], model, what: str, how: str
) -> pd.DataFrame:
    """``obsm[key]`` as cells × ``proteins`` (array columns named by the cellvae setup).

    ``what`` names the values and ``how`` says how they get there, for the error when absent.
    """
    if key not in adata.obsm:
        raise KeyError(
            f"adata.obsm has no {key!r}: pass model= (a trained cellvae.TOTALVI), or store the "
            f"{what} there first ({how})."
        )
    values = adata.obsm[key]
    if isinstance(values, pd.DataFrame):
        # the setup names proteins by the columns' text (a DataFrame built from an array has
        # the integer columns 0, 1, ...)
        frame = values.set_axis(values.columns.astype(str), axis=1)
    else:
        names = list(_setup_record(adata, model).get("protein_names", []))
        values = np.asarray(values.toarray() if hasattr(values, "toarray") else values)
        if len(names) != values.shape[1] and model is None:  # the setup was replaced since?
            names = _recorded_protein_names(adata, key, values.shape[1]) or names
        if len(names) != values.shape[1]:
            raise ValueError(
                f"obsm[{key!r}] is an array with {values.shape[1]} columns and the cellvae setup "
                f"names {len(names)} proteins: store a DataFrame with the protein names as columns."
            )
        frame = pd.DataFrame(values, index=adata.obs_names, columns=names)
    missing = [p for p in proteins if p not in frame.columns]
    if missing:
        raise KeyError(
            f"Proteins {missing} are not in obsm[{key!r}] (proteins: {list(frame.columns)[:10]}…)."
        )
    return frame[proteins].astype(float)


def _model_adata(model, adata):
    """``None`` when ``adata`` is the model's own AnnData (uses the cached tensors)."""
    if not hasattr(model, "get_protein_foreground_probability"):
        raise TypeError(f"model must be a trained cellvae.TOTALVI, got {type(model).__name__}.")
    return None if adata is model.adata else adata


def _protein_records(adata) -> Iterator[Mapping]:
    """The parameters of the ``uns`` records of :func:`cellvae.tl.totalvi` (they name proteins)."""
    for record in adata.uns.values():
        params = record.get("params") if isinstance(record, Mapping) else None
        if isinstance(params, Mapping) and "protein_expression_obsm_key" in params:
            yield params


def _recorded_protein_keys(adata) -> set[str]:
    """Raw protein keys named by the ``uns`` records of :func:`cellvae.tl.totalvi`."""
    return {str(params["protein_expression_obsm_key"]) for params in _protein_records(adata)}


def _recorded_protein_names(adata, key: str, n: int) -> list[str] | None:
    """The names of the ``n`` proteins of the array ``obsm[key]`` by a ``tl.totalvi`` record.

    Its ``protein_names_uns_key``, else the names the set-up gives an unnamed array.
    """
    for params in _protein_records(adata):
        if params["protein_expression_obsm_key"] != key:
            continue
        uns_key = params.get("protein_names_uns_key")
        if uns_key is None:
            return [f"protein_{i}" for i in range(n)]  # as setup_anndata names them
        if uns_key in adata.uns:
            return [str(s) for s in np.asarray(adata.uns[uns_key]).ravel()]
    return None


def _raw_proteins(adata, model, protein_key: str | None, proteins: list[str]) -> pd.DataFrame:
    key = protein_key or _setup_record(adata, model).get("protein_expression_obsm_key")
    if key is None and model is None:
        # the setup was replaced (e.g. tl.scvi after tl.totalvi): tl.totalvi's record says
        recorded = _recorded_protein_keys(adata)
        key = recorded.pop() if len(recorded) == 1 else None
    if key is None:
        raise ValueError(
            "No raw protein key: pass protein_key= (the obsm key with the raw ADT counts), or "
            "register the proteins with cellvae.TOTALVI.setup_anndata(adata, "
            "protein_expression_obsm_key=...)."
        )
    return _protein_frame(
        adata,
        key,
        proteins,
        model,
        "raw protein counts",
        "the key registered with cellvae.TOTALVI.setup_anndata, or protein_key=",
    )


def _point_size(n: int) -> float:
    return float(np.clip(12_000 / max(n, 1), 1.0, 30.0))


def _grid(n: int, ncols: int, ax, panel=(3.4, 3.2)) -> tuple[list[Axes], Any]:
    if ax is not None:
        return _axes_list(ax, n, panel)
    ncols = max(1, min(ncols, n))
    nrows = -(-n // ncols)
    fig, grid = _pyplot().subplots(
        nrows,
        ncols,
        figsize=(panel[0] * ncols, panel[1] * nrows),
        squeeze=False,
        layout="constrained",
    )
    axs = list(grid.ravel())
    for extra in axs[n:]:
        extra.set_visible(False)
    return axs[:n], fig


def _obs_colors(adata, color: str | None):
    """Per-cell colours and legend entries for an ``obs`` column (scanpy's palette if stored)."""
    if color is None:
        return "0.2", None
    if color not in adata.obs:
        raise KeyError(f"color {color!r} is not a column of adata.obs.")
    col = adata.obs[color]
    if not isinstance(col.dtype, pd.CategoricalDtype) and pd.api.types.is_numeric_dtype(col):
        return np.asarray(col, dtype=float), None
    cats = col.astype("category").cat
    stored = adata.uns.get(f"{color}_colors")
    if stored is not None and len(stored) == len(cats.categories):
        palette = list(stored)
    else:
        cmap = _pyplot().get_cmap("tab20" if len(cats.categories) > 10 else "tab10")
        palette = [cmap(i % cmap.N) for i in range(len(cats.categories))]
    codes = cats.codes.to_numpy()
    colors = np.array([palette[c] if c >= 0 else "lightgray" for c in codes], dtype=object)
    return list(colors), dict(zip(cats.categories, palette))


def protein_denoised(
    adata,
    *,
    proteins: str | Sequence[str],
    model=None,
    denoised_key: str = "protein_denoised",
    protein_key: str | None = None,
    transform_batch: str | Sequence[str] | None = None,
    color: str | None = None,
    log: bool = True,
    ncols: int = 4,
    ax: Axes | Sequence[Axes] | None = None,
    show: bool | None = None,
    save: bool | str | None = None,
    **kwargs: Any,
) -> Axes | list[Axes] | None:
    """Scatter denoised against raw protein counts, one panel per protein (TOTALVI).

    totalVI splits each protein count into a background (ambient antibody) and a foreground
    component; the denoised value is the expected foreground, so cells whose raw counts are only
    background fall towards 0 on the y axis while truly positive cells stay near the diagonal
    (dashed). Each panel has one point per cell.

    Parameters
    ----------
    adata
        AnnData with the raw protein counts in ``obsm`` (the key registered with
        :meth:`cellvae.TOTALVI.setup_anndata`, or ``protein_key``).
    proteins
        Protein name(s), as in the columns of the protein ``obsm`` DataFrame.
    model
        A trained :class:`cellvae.TOTALVI`: the denoised values are computed with its
        :meth:`~cellvae.TOTALVI.get_normalized_expression` on ``adata``. Without a model they
        are read from ``adata.obsm[denoised_key]`` (written by :func:`cellvae.tl.totalvi`).
    denoised_key
        ``obsm`` key of the denoised proteins (a DataFrame, or an array in the order of the
        registered proteins), used when ``model`` is None.
    protein_key
        ``obsm`` key of the raw protein counts (default: the registered one).
    transform_batch
        With ``model``: decode as this batch (or the average over a list); None for each cell's
        own batch.
    color
        ``obs`` column to colour the cells by (categorical: scanpy's stored palette and a legend;
        numeric: a colour map). Default: one colour.
    log
        Plot ``log1p`` of both axes.
    ncols
        Panels per row.
    ax
        Axes to draw on, one per protein. Default: a new figure.
    show
        Show the figure; default :attr:`scanpy.settings.autoshow`.
    save
        Save the figure to :attr:`scanpy.settings.figdir` as ``protein_denoised{save}``.
    **kwargs
        Passed to :meth:`matplotlib.axes.Axes.scatter` (``s``, ``alpha``, ``rasterized``, ...).

    Returns
    -------
    With ``show=False``, the Axes (a list, one per protein; a single Axes when ``proteins`` is a
    string); otherwise None.

    Examples
    --------
    >>> import cellvae
    >>> adata = cellvae.datasets.synthetic(200, 30, n_proteins=4)
    >>> cellvae.tl.totalvi(adata, max_epochs=2, progress_bar=False)
    >>> axes = cellvae.pl.protein_denoised(
    ...     adata, proteins=["prot0", "prot1"], color="cell_type", show=False
    ... )
    >>> len(axes[0].collections[0].get_offsets())
    200

    With the model, for any AnnData with the same genes and proteins:

    >>> model = cellvae.TOTALVI(adata, n_latent=5).train(max_epochs=2, progress_bar=False)
    >>> ax = cellvae.pl.protein_denoised(adata, proteins="prot0", model=model, show=False)
    """
    single = _one_name(proteins)  # then one axes, not a list
    names = _as_list(proteins, "protein")
    data = None if model is None else _model_adata(model, adata)  # checks the model first
    raw = _raw_proteins(adata, model, protein_key, names)
    if model is not None:
        reg = model.registry_
        _, denoised = model.get_normalized_expression(
            data,
            transform_batch=transform_batch,
            gene_list=list(reg.var_names[:1]),  # the RNA is not needed: decode one gene only
            protein_list=names,
        )
        denoised = denoised.astype(float)
    else:
        denoised = _protein_frame(
            adata,
            denoised_key,
            names,
            None,
            "denoised proteins",
            "cellvae.tl.totalvi writes obsm['protein_denoised']",
        )
    colors, legend = _obs_colors(adata, color)
    axs, fig = _grid(len(names), ncols, ax)
    kwargs.setdefault("s", _point_size(adata.n_obs))
    kwargs.setdefault("linewidths", 0)
    transform = np.log1p if log else np.asarray
    label = "log1p({})" if log else "{}"
    for a, name in zip(axs, names):
        x = transform(raw[name].to_numpy())
        y = transform(denoised[name].to_numpy())
        sc_kw = dict(kwargs)
        if isinstance(colors, np.ndarray):
            sc_kw.setdefault("cmap", "viridis")
        points = a.scatter(x, y, c=colors, **sc_kw)
        lim = max(float(np.max(x, initial=0)), float(np.max(y, initial=0))) * 1.05 or 1.0
        a.plot([0, lim], [0, lim], ls="--", lw=0.8, color="0.5", zorder=0)
        a.set_title(name)
        a.set_xlabel(label.format("raw counts"))
        a.set_ylabel(label.format("denoised"))
    if isinstance(colors, np.ndarray):
        fig.colorbar(points, ax=axs, label=color, shrink=0.8)
    elif legend:
        handles = [
            _pyplot().Line2D([], [], ls="", marker="o", color=c, label=str(cat))
            for cat, c in legend.items()
        ]
        axs[-1].legend(
            handles=handles,
            title=color,
            frameon=False,
            loc="center left",
            bbox_to_anchor=(1.0, 0.5),
        )
    return _finish("protein_denoised", axs[0] if single else axs, fig, show=show, save=save)


def foreground_probability(
    adata,
    *,
    proteins: str | Sequence[str],
    model=None,
    key: str = "protein_foreground_probability",
    groupby: str | None = None,
    basis: str = "X_umap_totalVI",
    transform_batch: str | Sequence[str] | None = None,
    ncols: int = 4,
    cmap: str = "viridis",
    ax: Axes | Sequence[Axes] | None = None,
    show: bool | None = None,
    save: bool | str | None = None,
    **kwargs: Any,
) -> Axes | list[Axes] | None:
    """Plot the probability that each protein's counts are foreground (TOTALVI), per protein.

    The foreground probability ``1 − π`` (from
    :meth:`cellvae.TOTALVI.get_protein_foreground_probability`) says how likely a cell's count is
    real signal rather than ambient background: it should be near 1 in the cell types that carry
    the protein (CD19 on B cells) and near 0 elsewhere. With ``groupby``, one violin per group;
    otherwise the cells on an embedding coloured from 0 to 1 (high probabilities on top).

    Parameters
    ----------
    adata
        AnnData with the cells to plot.
    proteins
        Protein name(s).
    model
        A trained :class:`cellvae.TOTALVI`: the probabilities are computed on ``adata``. Without
        a model they are read from ``adata.obsm[key]`` (store them there with
        ``adata.obsm[key] = model.get_protein_foreground_probability()``).
    key
        ``obsm`` key of stored probabilities (a DataFrame, or an array in the order of the
        registered proteins), used when ``model`` is None.
    groupby
        ``obs`` column: draw violins of the probability per category instead of an embedding.
    basis
        ``obsm`` key of the 2-D embedding (``"X_"`` is prepended if needed, so ``"umap"`` works).
        The default is the UMAP that ``cellvae.pl.latent(adata, key="X_totalVI")`` writes.
    transform_batch
        With ``model``: batch (or list of batches) to decode as; None for each cell's own batch.
    ncols
        Panels per row.
    cmap
        Colour map of the embedding.
    ax
        Axes to draw on, one per protein. Default: a new figure.
    show
        Show the figure; default :attr:`scanpy.settings.autoshow`.
    save
        Save the figure to :attr:`scanpy.settings.figdir` as ``foreground_probability{save}``.
    **kwargs
        Passed to :meth:`matplotlib.axes.Axes.scatter` (embedding) or
        :meth:`matplotlib.axes.Axes.violinplot` (``groupby``).

    Returns
    -------
    With ``show=False``, the Axes (a list, one per protein; a single Axes when ``proteins`` is a
    string); otherwise None.

    Examples
    --------
    >>> import cellvae
    >>> adata = cellvae.datasets.synthetic(200, 30, n_proteins=4)
    >>> cellvae.TOTALVI.setup_anndata(adata, protein_expression_obsm_key="protein_expression")
    >>> model = cellvae.TOTALVI(adata, n_latent=5).train(max_epochs=2, progress_bar=False)
    >>> ax = cellvae.pl.foreground_probability(
    ...     adata, proteins="prot0", model=model, groupby="cell_type", show=False
    ... )
    >>> [t.get_text() for t in ax.get_xticklabels()]
    ['type0', 'type1', 'type2']
    >>> adata.obsm["X_totalVI"] = model.get_latent_representation()
    >>> axes = cellvae.pl.latent(adata, key="X_totalVI", show=False)
    >>> axes = cellvae.pl.foreground_probability(
    ...     adata, proteins=["prot0", "prot1"], model=model, show=False
    ... )
    """
    single = _one_name(proteins)  # then one axes, not a list
    names = _as_list(proteins, "protein")
    if model is not None:
        data = _model_adata(model, adata)  # checks the model before its method is looked up
        prob = model.get_protein_foreground_probability(
            data, transform_batch=transform_batch, protein_list=names
        ).astype(float)
    else:
        prob = _protein_frame(
            adata,
            key,
            names,
            None,
            "foreground probabilities",
            f"adata.obsm[{key!r}] = model.get_protein_foreground_probability()",
        )
    if groupby is None:
        emb = basis if basis in adata.obsm else f"X_{basis}"
        if emb not in adata.obsm:
            raise KeyError(
                f"adata.obsm has no {basis!r}: draw the UMAP of the latent space first with "
                "cellvae.pl.latent(adata, key='X_totalVI'), or pass basis= an obsm key, or "
                "groupby= an obs column for violins."
            )
        coords = np.asarray(adata.obsm[emb])
        if coords.ndim != 2 or coords.shape[1] < 2:
            raise ValueError(
                f"adata.obsm[{emb!r}] has shape {coords.shape}: a basis needs two columns "
                "(x and y) per cell."
            )
        coords = coords[:, :2]
    elif groupby not in adata.obs:
        raise KeyError(f"groupby {groupby!r} is not a column of adata.obs.")
    axs, fig = _grid(len(names), ncols, ax, panel=(3.4, 3.2) if groupby is None else (4.2, 3.2))
    for a, name in zip(axs, names):
        values = prob[name].to_numpy()
        if groupby is None:
            order = np.argsort(values, kind="stable")
            scatter_kw = {"s": _point_size(adata.n_obs), "linewidths": 0} | kwargs
            points = a.scatter(
                coords[order, 0],
                coords[order, 1],
                c=values[order],
                cmap=cmap,
                vmin=0.0,
                vmax=1.0,
                **scatter_kw,
            )
            a.set_xticks([])
            a.set_yticks([])
            axis = "UMAP" if "umap" in emb.lower() else emb
            a.set_xlabel(f"{axis}1")
            a.set_ylabel(f"{axis}2")
        else:
            groups = adata.obs[groupby].astype("category")
            cats = [c for c in groups.cat.categories if (groups == c).any()]
            data = [values[(groups == c).to_numpy()] for c in cats]
            violin_kw = {"showmedians": True, "widths": 0.8} | kwargs
            a.violinplot(data, positions=np.arange(len(cats)), **violin_kw)
            a.set_xticks(np.arange(len(cats)), [str(c) for c in cats], rotation=90)
            a.set_ylim(-0.03, 1.03)
            a.set_xlabel(groupby)
            a.set_ylabel("foreground probability")
        a.set_title(f"{name}")
    if groupby is None:
        fig.colorbar(points, ax=axs, label="foreground probability", shrink=0.8)
    out = axs[0] if single else axs
    return _finish("foreground_probability", out, fig, show=show, save=save)
