"""Scanpy-style one-liners: fit a model and write its results into the AnnData.

These functions (with :mod:`cellvae.pl`) are the only writers of results into AnnData. They return
None, or a new AnnData with ``copy=True``, like ``scanpy.tl``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

from ._registry import UNS_KEY
from .model import SCVI, TOTALVI

logger = logging.getLogger(__name__)

__all__ = ["scvi", "totalvi"]


def _h5ad_safe(params: dict[str, Any]) -> dict[str, Any]:
    """Drop None values and turn sequences into lists so ``write_h5ad`` accepts the record."""
    out = {}
    for k, v in params.items():
        if v is None:
            continue
        out[k] = list(v) if isinstance(v, tuple | list) else v
    return out


def _history_record(model) -> dict[str, np.ndarray]:
    return {k: np.asarray(v, dtype=float) for k, v in model.history_.items()}


def _target(adata, copy: bool):
    """The AnnData to write into: ``adata`` itself, or a copy with ``copy=True``."""
    if getattr(adata, "is_view", False) and not copy:
        raise ValueError("Received a view of an AnnData: pass adata.copy() (or copy=True).")
    if copy and getattr(adata, "isbacked", False):
        raise ValueError(
            "copy=True of a backed AnnData would read all of it into memory: write the results "
            "into it instead (copy=False; save them with adata.write()), or pass adata.to_memory()."
        )
    return adata.copy() if copy else adata


# train() options these functions set from their own arguments (named here)
_OWN_TRAIN_ARGUMENTS = {
    "max_epochs": "max_epochs",
    "seed": "random_state",
    "progress_bar": "progress_bar",
    "device": "device",
}


def _check_outputs(
    where: str, inputs: dict[str, str | None], outputs: dict[str, str | None]
) -> None:
    """Raise before training when an output key would overwrite an input or another output.

    ``adata.<where>`` holds both: writing over the raw counts or proteins would lose them.
    """
    taken = {key: name for name, key in inputs.items() if key is not None}
    for name, key in outputs.items():
        if key is None:
            continue
        if key in taken:
            raise ValueError(
                f"{name}={key!r} would overwrite adata.{where}[{key!r}], which {taken[key]} "
                f"names: choose another {name}."
            )
        taken[key] = name


def _check_train_kwargs(train_kwargs: dict[str, Any] | None) -> None:
    """Raise, before anything is written, for train options this function takes itself."""
    twice = [k for k in train_kwargs or {} if k in _OWN_TRAIN_ARGUMENTS]
    if twice:
        raise TypeError(
            f"train_kwargs sets {twice}, which this function takes as its own arguments: pass "
            + ", ".join(f"{_OWN_TRAIN_ARGUMENTS[k]}=..." for k in twice)
            + " instead."
        )


@contextmanager
def _setup_kept_on_error(adata) -> Iterator[None]:
    """Put back ``adata``'s previous setup record if what follows its new setup raises.

    These functions register the data before the model checks its options and trains; a
    mistyped option or an interrupted training must not leave the user's own setup replaced.
    """
    had, previous = UNS_KEY in adata.uns, adata.uns.get(UNS_KEY)
    try:
        yield
    except BaseException:
        if had:
            adata.uns[UNS_KEY] = previous
        else:
            adata.uns.pop(UNS_KEY, None)
        raise


def _fit(adata, cls, setup, model_kwargs, max_epochs, random_state, progress_bar, device, train_kw):
    """Register ``adata`` for ``cls``, build the model and train it; return the model.

    On any error the previous setup record is put back.
    """
    with _setup_kept_on_error(adata):
        cls.setup_anndata(adata, **setup)
        model = cls(adata, **model_kwargs)
        model.train(
            max_epochs,
            seed=random_state,
            progress_bar=progress_bar,
            device=device,
            **(train_kw or {}),
        )
    return model


def _record(adata, uns_key: str, model, params: dict[str, Any]) -> str:
    """Write the setup, the parameters and the training history to ``adata.uns[uns_key]``."""
    n_epochs = len(model.history_.get("epoch", []))
    adata.uns[uns_key] = {
        "params": _h5ad_safe(
            {
                **model.registry_.setup_kwargs(),
                **model.hparams,
                **params,  # after the hyper-parameters: the values as trained
                "n_epochs": n_epochs,  # trained; fewer than max_epochs after early stopping
            }
        ),
        "history": _history_record(model),
    }
    return f"uns[{uns_key!r}]"


def scvi(
    adata,
    *,
    batch_key: str | None = None,
    layer: str | None = None,
    labels_key: str | None = None,
    size_factor_key: str | None = None,
    categorical_covariate_keys: str | Sequence[str] | None = None,
    continuous_covariate_keys: str | Sequence[str] | None = None,
    n_latent: int = 10,
    max_epochs: int | None = None,
    key_added: str = "X_scVI",
    layer_added: str | None = None,
    random_state: int | None = 0,
    progress_bar: bool = True,
    device: str = "auto",
    train_kwargs: dict[str, Any] | None = None,
    copy: bool = False,
    **model_kwargs: Any,
):
    """Batch-correct ``adata`` with scVI and write the latent space into ``obsm``.

    Registers the counts (:func:`cellvae.pp.setup_anndata`), fits :class:`cellvae.SCVI`, writes
    the posterior mean of z to ``adata.obsm[key_added]``, the parameters and training history to
    ``adata.uns["scvi"]`` (``uns[key_added]`` when ``key_added`` is not the default) and,
    if ``layer_added`` is given, batch-corrected normalised expression (scaled to 10,000 counts per
    cell, averaged over all batches; with ``size_factor_key``, the expected counts at size
    factor 1) to ``adata.layers[layer_added]``.

    Parameters
    ----------
    adata
        AnnData with raw counts in ``X`` or ``layer``.
    batch_key
        ``obs`` column with the batch to correct for.
    layer
        Layer with raw counts (default ``X``).
    labels_key, size_factor_key, categorical_covariate_keys, continuous_covariate_keys
        Passed to :func:`cellvae.pp.setup_anndata`.
    n_latent
        Size of the latent space.
    max_epochs
        Training epochs (default from the number of cells, as in scvi-tools).
    key_added
        ``obsm`` key for the latent representation.
    layer_added
        Layer for batch-corrected normalised expression; None to skip (it is cells × genes).
    random_state
        Seed: the same seed gives the same embedding on CPU.
    progress_bar
        Show a progress bar while training.
    device
        ``"auto"``, ``"cpu"`` or ``"cuda"``.
    train_kwargs
        Further options of :meth:`cellvae.SCVI.train` (e.g. ``{"batch_size": 256}``).
    copy
        Return a modified copy instead of writing into ``adata``.
    **model_kwargs
        Options of :class:`cellvae.SCVI` (``n_hidden``, ``n_layers``, ``gene_likelihood``, …).

    Returns
    -------
    None, or the modified copy with ``copy=True``.

    Examples
    --------
    >>> import cellvae, scanpy as sc
    >>> adata = cellvae.datasets.synthetic(300, 50, n_batches=2)
    >>> cellvae.tl.scvi(adata, batch_key="batch", max_epochs=2, progress_bar=False)
    >>> adata.obsm["X_scVI"].shape
    (300, 10)
    >>> sc.pp.neighbors(adata, use_rep="X_scVI")
    """
    _check_train_kwargs(train_kwargs)
    _check_outputs("layers", {"layer": layer}, {"layer_added": layer_added})
    adata = _target(adata, copy)
    setup = {
        "layer": layer,
        "batch_key": batch_key,
        "labels_key": labels_key,
        "size_factor_key": size_factor_key,
        "categorical_covariate_keys": categorical_covariate_keys,
        "continuous_covariate_keys": continuous_covariate_keys,
    }
    model_kwargs = {"n_latent": n_latent, **model_kwargs}
    fit = (max_epochs, random_state, progress_bar, device, train_kwargs)
    model = _fit(adata, SCVI, setup, model_kwargs, *fit)
    adata.obsm[key_added] = model.get_latent_representation()
    added = [f"obsm[{key_added!r}]"]
    if layer_added is not None:
        adata.layers[layer_added] = model.get_normalized_expression(
            transform_batch=list(model.registry_.batch_categories),
            # with size factors the decoder's scale is the mean at size factor 1, no proportion
            library_size=1.0 if size_factor_key is not None else 1e4,
            return_numpy=True,
        )
        added.append(f"layers[{layer_added!r}]")
    params = {
        "n_latent": n_latent,
        "max_epochs": max_epochs,
        "random_state": random_state,
        "key_added": key_added,
        "layer_added": layer_added,
    }
    added.append(_record(adata, "scvi" if key_added == "X_scVI" else key_added, model, params))
    logger.info("cellvae.tl.scvi added %s.", ", ".join(added))
    return adata if copy else None


def totalvi(
    adata,
    *,
    batch_key: str | None = None,
    layer: str | None = None,
    protein_expression_obsm_key: str = "protein_expression",
    protein_names_uns_key: str | None = None,
    labels_key: str | None = None,
    size_factor_key: str | None = None,
    categorical_covariate_keys: str | Sequence[str] | None = None,
    continuous_covariate_keys: str | Sequence[str] | None = None,
    n_latent: int = 20,
    max_epochs: int | None = None,
    key_added: str = "X_totalVI",
    protein_key_added: str | None = "protein_denoised",
    random_state: int | None = 0,
    progress_bar: bool = True,
    device: str = "auto",
    train_kwargs: dict[str, Any] | None = None,
    copy: bool = False,
    **model_kwargs: Any,
):
    """Jointly model RNA and proteins with totalVI; write the latent space and denoised proteins.

    Registers the counts and proteins (:meth:`cellvae.TOTALVI.setup_anndata`), fits
    :class:`cellvae.TOTALVI`, writes the posterior mean of z to ``adata.obsm[key_added]``, the
    denoised protein expression (foreground, averaged over the batches that measured each
    protein) to ``adata.obsm[protein_key_added]`` as a DataFrame with the protein names as
    columns, and the parameters and training history to ``adata.uns["totalvi"]``
    (``uns[key_added]`` when ``key_added`` is not the default).

    Parameters
    ----------
    adata
        AnnData with raw RNA counts in ``X`` or ``layer`` and raw protein counts in ``obsm``.
    batch_key
        ``obs`` column with the batch to correct for.
    layer
        Layer with raw RNA counts (default ``X``).
    protein_expression_obsm_key
        ``obsm`` key with the raw protein counts.
    protein_names_uns_key
        ``uns`` key with the protein names, for proteins stored as an array (a DataFrame's
        columns name them otherwise).
    labels_key, size_factor_key, categorical_covariate_keys, continuous_covariate_keys
        Passed to :meth:`cellvae.TOTALVI.setup_anndata`.
    n_latent
        Size of the latent space.
    max_epochs
        Training epochs (default from the number of cells, as in scvi-tools).
    key_added
        ``obsm`` key for the latent representation.
    protein_key_added
        ``obsm`` key for the denoised proteins; None to skip.
    random_state
        Seed: the same seed gives the same embedding on CPU.
    progress_bar
        Show a progress bar while training.
    device
        ``"auto"``, ``"cpu"`` or ``"cuda"``.
    train_kwargs
        Further options of :meth:`cellvae.TOTALVI.train` (e.g. ``{"batch_size": 128}``).
    copy
        Return a modified copy instead of writing into ``adata``.
    **model_kwargs
        Options of :class:`cellvae.TOTALVI` (``n_hidden``, ``gene_likelihood``, …).

    Returns
    -------
    None, or the modified copy with ``copy=True``.

    Examples
    --------
    >>> import cellvae, scanpy as sc
    >>> adata = cellvae.datasets.synthetic(300, 50, n_batches=2, n_proteins=6)
    >>> cellvae.tl.totalvi(adata, batch_key="batch", max_epochs=2, progress_bar=False)
    >>> adata.obsm["X_totalVI"].shape, adata.obsm["protein_denoised"].shape
    ((300, 20), (300, 6))
    >>> sc.pp.neighbors(adata, use_rep="X_totalVI")
    """
    _check_train_kwargs(train_kwargs)
    _check_outputs(
        "obsm",
        {"protein_expression_obsm_key": protein_expression_obsm_key},
        {"key_added": key_added, "protein_key_added": protein_key_added},
    )
    adata = _target(adata, copy)
    setup = {
        "layer": layer,
        "batch_key": batch_key,
        "protein_expression_obsm_key": protein_expression_obsm_key,
        "protein_names_uns_key": protein_names_uns_key,
        "labels_key": labels_key,
        "size_factor_key": size_factor_key,
        "categorical_covariate_keys": categorical_covariate_keys,
        "continuous_covariate_keys": continuous_covariate_keys,
    }
    model_kwargs = {"n_latent": n_latent, **model_kwargs}
    fit = (max_epochs, random_state, progress_bar, device, train_kwargs)
    model = _fit(adata, TOTALVI, setup, model_kwargs, *fit)
    adata.obsm[key_added] = model.get_latent_representation()
    added = [f"obsm[{key_added!r}]"]
    if protein_key_added is not None:
        _, proteins = model.get_normalized_expression(
            transform_batch=list(model.registry_.batch_categories)
        )
        adata.obsm[protein_key_added] = proteins
        added.append(f"obsm[{protein_key_added!r}]")
    params = {
        "n_latent": n_latent,
        "max_epochs": max_epochs,
        "random_state": random_state,
        "key_added": key_added,
        "protein_key_added": protein_key_added,
        "adversarial_classifier": model._adversarial(),  # as trained (None: chosen by the data)
    }
    uns_key = "totalvi" if key_added == "X_totalVI" else key_added
    added.append(_record(adata, uns_key, model, params))
    logger.info("cellvae.tl.totalvi added %s.", ", ".join(added))
    return adata if copy else None
