"""Plotting in the style of ``scanpy.pl``: training curves and latent-space UMAPs.

Every function draws on new axes (or on ``ax``), shows the figure when ``show`` is true (default:
:attr:`scanpy.settings.autoshow`), saves it when ``save`` is given, and returns the axes only with
``show=False``, like ``scanpy.pl``. Functions that need a UMAP compute it on the requested latent
space under their own keys, so the user's ``obsm["X_umap"]`` and ``uns["neighbors"]`` are never
overwritten.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import scanpy as sc
from matplotlib.axes import Axes

logger = logging.getLogger(__name__)

__all__ = ["history", "latent"]

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
def _finish(writekey: str, axes: Any, fig, *, show: bool | None, save: bool | str | None):
    """Save and/or show ``fig`` the way ``scanpy.pl`` does; return ``axes`` unless shown.

    ``save=True`` writes ``{figdir}/{writekey}{plot_suffix}.{file_format_figs}``; a string is
    appended to ``writekey`` (its extension, if any, picks the format), as in scanpy.
    """
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
        plt.show()
        return None
    return axes


def _axes_list(ax, n: int, panel_size: tuple[float, float]) -> tuple[list[Axes], Any]:
    """Return ``n`` axes: new ones in a row, or those given in ``ax`` (one Axes or a sequence)."""
    if ax is None:
        fig, grid = plt.subplots(
            1, n, figsize=(panel_size[0] * n, panel_size[1]), squeeze=False, layout="constrained"
        )
        return list(grid[0]), fig
    axs = [ax] if isinstance(ax, Axes) else list(np.ravel(ax))
    if len(axs) != n:
        raise ValueError(f"Got {len(axs)} axes for {n} panels: pass one Axes per panel.")
    return axs, axs[0].figure


def _history_frame(source) -> pd.DataFrame:
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
        if len(found) == 1:
            record = {k: np.asarray(v) for k, v in uns[found[0]]["history"].items()}
            frame = pd.DataFrame(record)
            return frame.set_index("epoch") if "epoch" in frame else frame
        if len(found) > 1:
            raise ValueError(
                f"adata.uns has several training histories ({found}): pass the DataFrame, "
                f"e.g. pd.DataFrame(dict(adata.uns[{found[0]!r}]['history'])).set_index('epoch')."
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
    hist = _history_frame(model)
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
    ``sc.pl.embedding(adata, basis="X_umap_scVI", color=...)``.

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
    if getattr(adata, "is_view", False):
        raise ValueError("Received a view of an AnnData: pass adata = adata.copy() first.")
    if key not in adata.obsm:
        raise KeyError(
            f"adata.obsm has no {key!r}: run cellvae.tl.scvi(adata, ...) first, or set "
            f"adata.obsm[{key!r}] = model.get_latent_representation()."
        )
    if ax is not None and not isinstance(color, str | None) and len(color) > 1:
        raise ValueError("Pass ax only with a single color; scanpy draws several in new axes.")
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
    axes = sc.pl.embedding(adata, basis=umap_key, color=color, ax=ax, show=False, **kwargs)
    axs = list(np.ravel(axes)) if isinstance(axes, list | np.ndarray) else [axes]
    for a in axs:  # scanpy names the axes after the basis, "X_umap_scVI1"
        a.set_xlabel(f"UMAP1 ({name})")
        a.set_ylabel(f"UMAP2 ({name})")
    return _finish("latent", axes, axs[0].figure, show=show, save=save)
