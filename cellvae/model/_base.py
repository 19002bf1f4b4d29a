"""The one small model base: data resolution, training entry point, save / load, history.

Subclasses (SCVI, TOTALVI) say which module to build from the registry and add getters.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import inspect
import json
import logging
import numbers
import os
import secrets
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from .. import pp
from .._data import TensorData, sample_digest, split_indices
from .._registry import UNS_KEY, Registry, category_positions, get_counts, warn_user
from ..module._base import check_flags, norm_places
from ..train import (
    TrainConfig,
    _keep_freed_memory_in_heap,
    check_not_inference_mode,
    default_max_epochs,
    resolve_device,
    train_module,
)

logger = logging.getLogger(__name__)

# 2: TOTALVI's decoder heads take the covariates and its background scale is a softplus
_FORMAT_VERSION = 2


def output_array(shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
    """An uninitialised array for a getter's output, backed by ordinary 4 kB pages.

    ``np.empty`` asks the kernel for transparent huge pages on large arrays; where the kernel
    then compacts memory to find them (``defrag = madvise``, this project's machines), the
    first write to a fresh 763 MB output (100k cells × 2,000 genes) took 0.7–1.3 s against
    0.3–0.6 s in 4 kB pages (fresh processes, 4 of each). The outputs are written once, so huge
    pages buy nothing back; torch's allocator does not ask for them.

    Examples
    --------
    >>> a = output_array((3, 2))
    >>> a.shape, a.dtype, a.flags.writeable
    ((3, 2), dtype('float32'), True)
    """
    return torch.empty(shape, dtype=torch.from_numpy(np.empty(0, dtype)).dtype).numpy()


def as_list(values) -> list:
    """``values`` as a list; one name or number (a string or a scalar) becomes a list of one.

    Examples
    --------
    >>> as_list("CD3E"), as_list(np.int64(2)), as_list(("a", "b")), as_list({"x"})
    (['CD3E'], [np.int64(2)], ['a', 'b'], ['x'])
    """
    zero_d_array = isinstance(values, np.ndarray) and values.ndim == 0
    if isinstance(values, str) or not isinstance(values, Iterable) or zero_d_array:
        return [values]
    return list(values)


def check_count(name: str, value, *, allow_none: bool = False) -> None:
    """Raise unless ``value`` is a positive integer (or None where that means the default)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def library_scale(library_size) -> float | None:
    """The factor for a numeric ``library_size``, None for ``"latent"``; raises otherwise."""
    if isinstance(library_size, str) and library_size == "latent":
        return None
    if isinstance(library_size, numbers.Real) and not isinstance(library_size, bool):
        if 0 < library_size <= _FLOAT32_MAX:  # the outputs are float32
            return float(library_size)
    raise ValueError(
        f"library_size must be a positive number within float32's range (≤ 3.4e38) or "
        f"'latent', got {library_size!r}."
    )


# the getters' shared parameter entries, written into their docstrings by getter_doc
_GETTER_DOC = {
    "{adata}": "adata\n            Data (default: the model's AnnData). Other data need the "
    "model's genes, in its\n            order; an in-memory view (``adata[mask]``) is read as it "
    "is.",
    "{indices}": "indices\n            Cells to use (default: all): integer positions or a "
    "boolean mask.",
    "{batch_size}": "batch_size\n            Cells per forward pass.",
    "{return_mean_cells}": "return_mean\n            The mean over the cells (default), or one "
    "float32 value per cell.",
    "{return_mean_samples}": "return_mean\n            With ``n_samples > 1``, False returns "
    "every sample instead of their mean: a float32\n            array, ``n_samples`` times the "
    "memory, in scvi-tools' layout: samples × cells ×\n            features for SCVI, cells × "
    "features × samples for TOTALVI.",
    "{return_numpy}": "return_numpy\n            Return a float32 array instead of a DataFrame "
    "(default: only for the samples of\n            ``return_mean=False``).",
}


def getter_doc(fn):
    """Write the shared parameter entries (``{adata}``, ``{indices}``, ...) into a getter's doc."""
    if fn.__doc__:  # None under python -OO
        for key, text in _GETTER_DOC.items():
            fn.__doc__ = fn.__doc__.replace(key, text)
    return fn


def samples_kept(n_samples: int, return_mean: bool, return_numpy: bool | None) -> tuple[bool, bool]:
    """Whether a getter keeps its samples axis, and whether it returns arrays.

    With ``n_samples > 1`` and ``return_mean=False`` the output is samples × cells × features,
    which only an array holds (as in scvi-tools): ``return_numpy=False`` then warns and is
    overridden; ``None`` means arrays exactly then.

    Examples
    --------
    >>> samples_kept(5, False, None), samples_kept(5, True, None), samples_kept(1, False, True)
    ((True, True), (False, False), (False, True))
    """
    check_count("n_samples", n_samples)
    check_flags(return_mean=return_mean)
    if return_numpy is not None:
        check_flags(return_numpy=return_numpy)
    keep = n_samples > 1 and not return_mean
    if keep and return_numpy is False:
        warn_user(
            "return_numpy=False is overridden: with n_samples > 1 and return_mean=False the output "
            "is samples × cells × features, returned as an array."
        )
    return keep, keep or bool(return_numpy)


def rows_into_one(chunks: Iterable[np.ndarray], n_rows: int) -> np.ndarray | None:
    """Write consecutive row blocks into one array of ``n_rows`` rows, allocated once.

    The getters' outputs are built this way rather than by concatenating a list of blocks,
    which holds every block and the result at the same time (twice the output at its peak).
    Returns None when there are no blocks.
    """
    out, start = None, 0
    for block in chunks:
        if out is None:
            out = output_array((n_rows, *block.shape[1:]), dtype=block.dtype)
        out[start : start + len(block)] = block
        start += len(block)
    if out is not None and start != n_rows:
        raise RuntimeError(f"Expected {n_rows} rows, got {start}.")
    return out


# network sizes among the models' options, each a positive integer
_SIZES = ("n_latent", "n_hidden", "n_layers", "n_layers_encoder", "n_layers_decoder")


class BaseModel:
    """Shared machinery of the user-facing models (not used directly).

    Subclasses set ``_module_cls`` and implement ``_module_kwargs()``.
    """

    _module_cls: type[torch.nn.Module]
    _train_defaults: dict[str, Any] = {}
    # the save format in which this model's module last changed (older saves cannot load)
    _module_format: int = 1

    def __init__(self, adata, **hparams: Any):
        if adata is not None:
            pp.check_anndata(adata)
            pp.check_not_view(adata)
        self.adata = adata
        self.registry_ = _setup_of(adata) if adata is not None else None
        self.hparams = dict(hparams)
        self.module_: torch.nn.Module | None = None
        self.history_: dict[str, list] = {}
        self.is_trained_ = False
        self._data_cache: tuple[list, TensorData, Registry] | None = None
        self.train_indices_: np.ndarray | None = None
        self.validation_indices_: np.ndarray | None = None
        if self.registry_ is not None:
            self._check_setup(self.registry_)

    # ------------------------------------------------------------------ to override
    def _check_setup(self, registry: Registry) -> None:
        """Raise if the registry lacks what this model needs."""

    def _module_kwargs(self) -> dict[str, Any]:
        raise NotImplementedError

    def _per_label_option(self) -> str | None:
        """The option that gave the trained module parameters per label, if any."""
        return None

    def _check_new_data(self, registry: Registry) -> None:
        """Raise if new data lack the labels of a module with parameters per label."""
        option = None if self.module_ is None else self._per_label_option()
        if option is None:
            return
        key, known = self.registry_.labels_key, self.registry_.label_categories
        why = f"This model has parameters per label ({option}), so it needs"
        if registry.labels_key is None:
            raise ValueError(
                f"{why} the label of every cell: the new data has no obs[{key!r}], or cells "
                "without a label (NaN) in it."
            )
        unseen = [c for c in registry.label_categories if c not in set(known)]
        if unseen:
            raise ValueError(
                f"{why} labels it was trained on: obs[{key!r}] has {unseen[:10]} (known: "
                f"{list(known)[:10]})."
            )

    # ------------------------------------------------------------------ module
    def _build_module(self) -> torch.nn.Module:
        for name in _SIZES:  # sizes of the network: 0 or 2.5 would fail deep in torch, or not
            if name in self.hparams:
                check_count(name, self.hparams[name])
        kwargs = self._module_kwargs()
        # float32 weights, as the data: whatever default dtype the user's session has set
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.float32)
        try:
            return self._module_cls(**kwargs)
        finally:
            torch.set_default_dtype(default)

    @property
    def module(self) -> torch.nn.Module:
        """The torch module (built by the first call to ``train`` or by ``load``)."""
        if self.module_ is None:
            raise RuntimeError(
                f"The {type(self).__name__} module does not exist yet: call model.train() first."
            )
        return self.module_

    @property
    def device(self) -> torch.device:
        """Device of the module's parameters."""
        return next(self.module.parameters()).device

    @property
    def history(self) -> pd.DataFrame:
        """Per-epoch training history (one row per epoch).

        Columns ``train_<term>`` and ``validation_<term>`` hold per-cell means of ``elbo`` (the
        negative ELBO), ``reconstruction``, ``kl_local`` and a model's own terms (TOTALVI:
        ``reconstruction_protein``, ``kl_background``); ``train_loss`` is the optimised,
        KL-weighted loss, and ``kl_weight`` and ``lr`` the epoch's settings. scvi-tools'
        ``history["elbo_train"]`` is ``history["train_elbo"]`` here,
        ``"reconstruction_loss_validation"`` is ``"validation_reconstruction"``, and so on.
        """
        if not self.history_:
            return pd.DataFrame()
        return pd.DataFrame(self.history_).set_index("epoch")

    def _check_trained(self) -> None:
        if not self.is_trained_:
            raise RuntimeError(
                f"This {type(self).__name__} has not been trained: call model.train() first "
                f"(or load a saved model with {type(self).__name__}.load(dir, adata))."
            )

    # ------------------------------------------------------------------ data
    def _data(self, adata=None) -> tuple[TensorData, Registry]:
        """Tensors of ``adata`` (default: the training data), checked against the registry."""
        if adata is None:
            if self.adata is None:
                name = type(self).__name__
                raise ValueError(
                    f"This model has no AnnData attached: pass the data to the getter (adata=...),"
                    f" or attach it with {name}.load(dir_path, adata) to train or use the getters"
                    " without it."
                )
            adata = self.adata
        if adata is self.adata and self.registry_ is not None:
            sources, cache = _sources(adata, self.registry_), self._data_cache
            if cache is None or not _same_sources(cache[0], sources):
                self._data_cache = None  # free the old tensors before building the new ones
                # changed since its tensors were built: checked against the model like new data
                reg = self._own_registry(adata) if cache is None else self._registry_of(adata)
                td = TensorData.from_adata(adata, reg)
                sources = _sources(adata, self.registry_)  # reading may reopen a backed file
                self._data_cache = ([_ref(s) for s in sources], td, reg)
            return self._data_cache[1], self._data_cache[2]
        reg = self._registry_of(adata)
        return TensorData.from_adata(adata, reg), reg

    def _own_registry(self, adata) -> Registry:
        """The registry of the attached AnnData, at its first use.

        The model's own for its training data as set up; otherwise (data attached by ``load``,
        a setup changed since, or a subset that kept its parent's record in ``uns``) the
        data's, checked against the model.
        """
        try:
            stored = Registry.from_adata(adata)
            if stored == self.registry_ and stored.n_obs == adata.n_obs:
                return self.registry_
        except ValueError:  # no setup stored
            pass
        return self._registry_of(adata)

    def _registry_of(self, adata) -> Registry:
        """The registry of data other than the training data, checked against the model."""
        reg = pp.registry_like(adata, self.registry_, unseen_hint=pp.MODEL_UNSEEN_HINT)
        self._check_new_data(reg)
        return reg

    @staticmethod
    def _indices(td: TensorData, indices) -> torch.Tensor:
        """Cell positions from integer positions or a boolean mask of the cells."""
        if indices is None:
            return torch.arange(td.n_obs)
        arr = np.asarray(indices).reshape(-1)
        if arr.dtype == bool:
            if len(arr) != td.n_obs:
                raise IndexError(
                    f"A boolean mask as indices needs one entry per cell ({td.n_obs}), "
                    f"got {len(arr)}."
                )
            arr = np.flatnonzero(arr)
        elif len(arr) and not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(
                f"indices must be integer positions or a boolean mask of the cells, got "
                f"values of dtype {arr.dtype}. For cell names use "
                "adata.obs_names.get_indexer(names)."
            )
        arr = arr.astype(np.int64, copy=False)
        if len(arr) and (arr.min() < -td.n_obs or arr.max() >= td.n_obs):
            raise IndexError(f"indices must be in [-{td.n_obs}, {td.n_obs}).")
        idx = torch.as_tensor(np.where(arr < 0, arr + td.n_obs, arr))  # numpy's negative positions
        return idx

    def _batches(self, td: TensorData, indices, batch_size: int | None):
        """Yield minibatch dicts on the module's device, in order (only each batch is moved)."""
        check_count("batch_size", batch_size, allow_none=True)
        idx = self._indices(td, indices)
        dev = self.device
        # each batch's ~8 MB temporaries stay in the heap for the next batch instead of being
        # faulted in again (normalised expression of 100k cells x 2,000 genes in fresh processes:
        # 228-251k page faults without, 195-204k with, the output's 195k; 6 alternating runs
        # each, medians 1.62 / 1.56 s)
        _keep_freed_memory_in_heap()
        for batch in td.batches(idx, batch_size or 1024):
            yield {k: v.to(dev) for k, v in batch.items()}

    # ------------------------------------------------------------------ shared getters
    @getter_doc
    @torch.no_grad()
    def get_latent_representation(
        self,
        adata=None,
        *,
        indices: Sequence[int] | None = None,
        give_mean: bool = True,
        return_dist: bool = False,
        batch_size: int | None = None,
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Return the latent representation of each cell (cells × n_latent).

        Parameters
        ----------
        {adata}
        {indices}
        give_mean
            Return the posterior mean (for ``"ln"``, the mean of the softmax over 512
            quasi-random points of q(z | x), the same points for every cell); otherwise one
            sample.
        return_dist
            Return the mean and the variance of the Gaussian q(z | x) instead, as two arrays
            (for ``"ln"``, before the softmax; ``give_mean`` is then ignored), as scvi-tools.
        {batch_size}

        Examples
        --------
        >>> import cellvae
        >>> adata = cellvae.datasets.synthetic(200, 30)
        >>> cellvae.SCVI.setup_anndata(adata, batch_key="batch")
        >>> model = cellvae.SCVI(adata).train(max_epochs=1, progress_bar=False)
        >>> model.get_latent_representation(indices=[0, 1, 2]).shape
        (3, 10)
        """
        check_flags(give_mean=give_mean, return_dist=return_dist)
        noise = _ln_points(self.module.n_latent, self.device)

        def latent(batch):
            inf = self.module.inference(batch)
            if return_dist:
                return torch.cat([inf["qz_m"], inf["qz_v"]], -1)
            if not give_mean:
                return inf["z"]
            if self.module.latent_distribution == "ln":
                qz_m, qz_s = inf["qz_m"][:, None], inf["qz_v"].sqrt()[:, None]
                return torch.softmax(qz_m + qz_s * noise, -1).mean(1)
            return inf["qz_m"]

        deterministic = return_dist or give_mean
        out = self._per_cell(adata, indices, batch_size, latent, deterministic=deterministic)
        n_latent = self.module.n_latent
        if out is None:
            out = np.zeros((0, 2 * n_latent if return_dist else n_latent), np.float32)
        return (out[:, :n_latent], out[:, n_latent:]) if return_dist else out

    @getter_doc
    @torch.no_grad()
    def get_latent_library_size(
        self,
        adata=None,
        *,
        indices: Sequence[int] | None = None,
        give_mean: bool = True,
        batch_size: int | None = None,
    ) -> np.ndarray:
        """Return each cell's library size as the model sees it (cells × 1, counts).

        The observed library (or the size factor) when the model uses it; with a latent library
        (``use_observed_lib_size=False``) the mean of its log-normal posterior, or one sample
        of it without ``give_mean``.

        Parameters
        ----------
        {adata}
        {indices}
        give_mean
            The posterior mean of a latent library; otherwise one sample.
        {batch_size}

        Examples
        --------
        >>> import cellvae
        >>> adata = cellvae.datasets.synthetic(200, 30)
        >>> cellvae.SCVI.setup_anndata(adata)
        >>> model = cellvae.SCVI(adata).train(max_epochs=1, progress_bar=False)
        >>> import numpy as np
        >>> np.allclose(model.get_latent_library_size()[:, 0], adata.X.sum(1).A1, rtol=1e-5)
        True
        """
        check_flags(give_mean=give_mean)

        def library(batch):
            inf = self.module.inference(batch)
            if inf["ql_m"] is not None and give_mean:
                return torch.exp(inf["ql_m"] + inf["ql_v"] / 2)  # log-normal mean
            return self._library_counts(inf)

        out = self._per_cell(adata, indices, batch_size, library, deterministic=give_mean)
        return np.zeros((0, 1), np.float32) if out is None else out

    def _library_counts(self, inf: dict[str, torch.Tensor]) -> torch.Tensor:
        """The inference's library on the count scale (SCVI's is a log)."""
        return torch.exp(inf["library"])

    def _batch_codes(self, transform_batch, reg: Registry) -> list[int | None]:
        if transform_batch is None:
            return [None]
        codes = []
        if not as_list(transform_batch):
            raise ValueError("transform_batch is empty: pass a batch, a list of them, or None.")
        for b in as_list(transform_batch):
            name = _batch_name(b, reg.batch_categories)
            if name is None:
                raise ValueError(
                    f"transform_batch {b!r} is not a batch of the model "
                    f"(batches: {list(reg.batch_categories)})."
                )
            codes.append(reg.batch_categories.index(name))
        return codes

    def _gene_idx(self, gene_list, reg: Registry) -> tuple[torch.Tensor | None, list[str]]:
        if gene_list is None:
            return None, list(reg.var_names)
        gene_list = as_list(gene_list)
        if not gene_list:
            raise ValueError("gene_list is empty: pass gene names, or None for all genes.")
        lookup = {g: i for i, g in enumerate(reg.var_names)}
        missing = [g for g in gene_list if g not in lookup]
        if missing:
            raise KeyError(f"Genes not in the model: {missing[:10]}.")
        return torch.tensor([lookup[g] for g in gene_list]), list(gene_list)

    def _obs_names(self, adata, idx: torch.Tensor) -> pd.Index:
        adata = self.adata if adata is None else adata
        return adata.obs_names[idx.numpy()]

    @torch.no_grad()
    def _per_cell(
        self, adata, indices, batch_size, fn, *, deterministic: bool = False
    ) -> np.ndarray | None:
        """``fn`` of every minibatch of ``adata``'s cells ``indices``, rows in one array."""
        self._check_trained()
        td, _ = self._data(adata)
        return self._rows(td, indices, batch_size, fn, deterministic=deterministic)

    @torch.no_grad()
    def _rows(
        self, td: TensorData, indices, batch_size, fn, *, deterministic: bool = False
    ) -> np.ndarray | None:
        """:meth:`_per_cell` on tensors already built (None for no cells), in eval mode."""
        idx = self._indices(td, indices)
        with self._getter_mode(deterministic):
            chunks = (fn(b).cpu().numpy() for b in self._batches(td, idx, batch_size))
            return rows_into_one(chunks, len(idx))

    @contextlib.contextmanager
    def _getter_mode(self, deterministic: bool = False) -> Iterator[None]:
        """The module in eval mode for a getter, its own mode restored after.

        ``deterministic``: the getter's result draws on no randomness (posterior means), so
        torch's global generators are restored too: the encoder still draws a sample it does
        not use, which would advance the user's random stream.
        """
        was = self.module.training
        self.module.eval()
        dev = self.device
        rng = (
            torch.random.fork_rng(devices=[dev.index or 0] if dev.type == "cuda" else [])
            if deterministic
            else contextlib.nullcontext()
        )
        try:
            with rng:
                yield
        finally:
            self.module.train(was)

    @getter_doc
    def get_elbo(
        self, adata=None, *, indices=None, batch_size: int | None = None, return_mean: bool = True
    ) -> float | np.ndarray:
        """Return the ELBO per cell (a lower bound on log p(x); higher is better).

        The same quantity, and sign, as scvi-tools' ``get_elbo`` (the KL at full weight).

        Parameters
        ----------
        {adata}
        {indices}
        {batch_size}
        {return_mean_cells}

        Examples
        --------
        >>> import cellvae
        >>> adata = cellvae.datasets.synthetic(200, 30)
        >>> cellvae.SCVI.setup_anndata(adata)
        >>> model = cellvae.SCVI(adata).train(max_epochs=1, progress_bar=False)
        >>> model.get_elbo() < 0
        True
        """
        values = self._per_cell(adata, indices, batch_size, lambda b: -self.module(b).elbo)
        return mean_or_rows(values, return_mean)

    # names and per-cell terms of get_reconstruction_error (scvi-tools' keys)
    _reconstruction_names: tuple[str, ...] = ("reconstruction_loss",)

    def _reconstruction_terms(self, out) -> list[torch.Tensor]:
        return [out.reconstruction]

    @getter_doc
    def get_reconstruction_error(
        self, adata=None, *, indices=None, batch_size: int | None = None, return_mean: bool = True
    ) -> dict[str, float] | dict[str, np.ndarray]:
        """Return the reconstruction error −log p(x | z) per cell (lower is better).

        As in scvi-tools, a dict: ``{"reconstruction_loss": ...}`` (SCVI), or the genes' and the
        proteins' terms (TOTALVI's ``"reconst_loss_gene"``, ``"reconst_loss_protein"``).

        Parameters
        ----------
        {adata}
        {indices}
        {batch_size}
        {return_mean_cells}

        Examples
        --------
        >>> import cellvae
        >>> adata = cellvae.datasets.synthetic(200, 30)
        >>> cellvae.SCVI.setup_anndata(adata)
        >>> model = cellvae.SCVI(adata).train(max_epochs=1, progress_bar=False)
        >>> model.get_reconstruction_error()["reconstruction_loss"] > 0
        True
        """
        fn = lambda b: torch.stack(self._reconstruction_terms(self.module(b)), -1)
        values = self._per_cell(adata, indices, batch_size, fn)
        return {
            k: mean_or_rows(None if values is None else values[:, i], return_mean)
            for i, k in enumerate(self._reconstruction_names)
        }

    # ------------------------------------------------------------------ training
    def train(
        self,
        max_epochs: int | None = None,
        *,
        batch_size: int | None = None,
        lr: float | None = None,
        validation_size: float = 0.1,
        early_stopping: bool | None = None,
        seed: int | None = 0,
        device: str = "auto",
        progress_bar: bool = True,
        **train_options: Any,
    ):
        """Fit the model; return ``self``.

        A second call continues from the current weights, as in scvi-tools: with a new
        optimiser and a new KL warm-up (pass ``kl_warmup_fraction=0`` to keep the full KL
        weight), and its epochs are appended to :attr:`history`, numbered on.

        Parameters
        ----------
        max_epochs
            Number of passes over the training cells; default from the data size, as in
            scvi-tools (``min(400, 20000 / n_cells · 400)``).
        batch_size
            Cells per minibatch. None: the model's default, as in scvi-tools (SCVI 128,
            TOTALVI 256).
        lr
            Adam learning rate. None: the model's default (SCVI 1e-3, TOTALVI 4e-3).
        validation_size
            Fraction of cells held out for validation (seeded split).
        early_stopping
            Stop when the validation ELBO has not improved by more than
            ``early_stopping_min_delta`` for ``early_stopping_patience`` epochs (default 45);
            the weights are those of the last epoch. None: the model's default (SCVI off,
            TOTALVI on; TOTALVI also lowers the learning rate on plateaus,
            ``reduce_lr_on_plateau=True``, as scvi-tools' totalVI does).
        seed
            Seeds the split, the shuffling, the initialisation, dropout and sampling: the same
            seed gives the same model on CPU from the same kind of data and in the same
            ``precision`` (a backed AnnData is shuffled in chunks read from disk, so its model
            differs from the in-memory one's).
            None: all of them are drawn afresh. Global random state is left untouched.
        device
            ``"auto"`` (CUDA if available), ``"cpu"`` or ``"cuda"``.
        progress_bar
            Show a tqdm progress bar.
        **train_options
            Further :class:`~cellvae.train.TrainConfig` fields: ``weight_decay``, ``eps``,
            ``kl_warmup_fraction``, ``n_epochs_kl_warmup``, ``early_stopping_patience``,
            ``early_stopping_min_delta``, ``reduce_lr_on_plateau``, ``lr_factor``,
            ``lr_patience``, ``lr_min``, ``gradient_clip_val``, ``eval_batch_size`` (cells per
            validation minibatch, default 128). The KL weight rises linearly to 1 over
            ``kl_warmup_fraction`` (default 0.75) of ``max_epochs``, or over
            ``n_epochs_kl_warmup`` epochs when given, step by step; scvi-tools' SCVI warms up
            over a fixed 400 epochs, raised once per epoch (``n_epochs_kl_warmup=400`` comes
            closest), and its TOTALVI over ``0.75 · n_cells`` steps.
            ``precision``: ``"auto"`` (default), ``"32-true"`` (or ``"32"``) or ``"bf16-mixed"``,
            Lightning's names as in scvi-tools. ``"bf16-mixed"`` runs the decoders'
            hidden-to-genes products, most of a step's arithmetic, in bfloat16 during training
            and validation, as Lightning does (weights, optimiser and every other operator stay
            float32; the getters run in float32). ``"auto"`` chooses it on a CPU with bfloat16
            instructions (AVX512-BF16 or AMX), where it trains 25–45% faster with the same
            held-out ELBO (``benchmarks/README.md``), and float32 everywhere else.

        Raises
        ------
        cellvae.train.TrainingError
            When training diverges: at the end of an epoch whose loss was not finite or in
            which more than half of the steps had non-finite gradients. Such steps are always
            skipped (a RuntimeWarning names them when an epoch goes on), so the model keeps
            finite weights (with the batch-norm statistics of the last good epoch) and the
            history of the completed epochs.

        Notes
        -----
        Training (and each getter) allocates and frees one untouched 16 MB block first, which
        raises glibc's thresholds for returning freed memory to 16 / 32 MB for the rest of the
        process, as freeing any array of that size would: without it each step's ~1 MB
        temporaries were returned and faulted in again (10-15% of a step). The process may then
        keep up to ~32 MB of freed memory between its own allocations. Runs with gradients on
        inside a ``torch.no_grad()`` block; not inside ``torch.inference_mode()``.

        Examples
        --------
        >>> import cellvae
        >>> adata = cellvae.datasets.synthetic(200, 30)
        >>> cellvae.SCVI.setup_anndata(adata, batch_key="batch")
        >>> model = cellvae.SCVI(adata).train(max_epochs=3, progress_bar=False)
        >>> len(model.history)
        3
        """
        unknown = set(train_options) - set(TrainConfig.__dataclass_fields__)
        if unknown:
            options = sorted(TrainConfig.__dataclass_fields__)
            close = {k: difflib.get_close_matches(k, options, n=1) for k in sorted(unknown)}
            close_hint = "; ".join(f"{k!r}: did you mean {m[0]!r}?" for k, m in close.items() if m)
            raise TypeError(
                f"Unknown training options {sorted(unknown)}"
                + (f" ({close_hint})" if close_hint else "")
                + f"; allowed: {options}."
                + _renamed_hint(unknown)
                + (
                    " train() fits the model's own AnnData (given to the constructor or to "
                    "load(dir_path, adata))."
                    if "adata" in unknown
                    else ""
                )
            )
        td, reg = self._data()
        if seed is None:  # unseeded: split, order, initialisation and dropout drawn afresh
            seed = secrets.randbits(63)
        options = {**self._train_defaults, **train_options}
        for name, value in (
            ("batch_size", batch_size),
            ("lr", lr),
            ("early_stopping", early_stopping),
        ):
            if value is not None:
                options[name] = value
        config = TrainConfig(
            max_epochs=default_max_epochs(td.n_obs) if max_epochs is None else max_epochs,
            validation_size=validation_size,
            seed=seed,
            device=device,
            progress_bar=progress_bar,
            **options,
        )
        # everything that can refuse the call comes before anything changes: the options, the
        # device, the cells (a backed file's values are read for it) and the split
        config.validate()
        check_not_inference_mode()
        resolve_device(device)
        empty = td.n_empty_cells()
        if empty:  # data attached by load, edited after setup, or registered by transfer_setup
            raise pp.empty_cells_error(empty)
        train_idx, val_idx = split_indices(td.n_obs, validation_size, seed)
        if self.module_ is None:
            with torch.random.fork_rng(devices=[]):
                if seed is not None:
                    torch.manual_seed(int(seed))
                self.module_ = self._build_module()
        self.train_indices_, self.validation_indices_ = train_idx.numpy(), val_idx.numpy()
        try:
            train_module(self.module_, td, train_idx, val_idx, config, self.history_)
        finally:
            if self.history_:
                self.is_trained_ = True
            self.module_.eval()
        return self

    # ------------------------------------------------------------------ save / load
    def _config(self) -> dict[str, Any]:
        from .. import __version__

        return {
            "format_version": _FORMAT_VERSION,
            "model": type(self).__name__,
            "cellvae_version": __version__,
            "hparams": _jsonable(self.hparams),
            "registry": _jsonable(self.registry_.to_dict()),
            "history": self.history_,
            "is_trained": self.is_trained_,
        }

    def save(
        self, dir_path: str | os.PathLike, *, overwrite: bool = False, save_anndata: bool = False
    ) -> None:
        """Save weights (``torch.save`` of the state dict) and setup (JSON) into ``dir_path``.

        The save is atomic: weights go to a new file named by their hash, then ``model.json``
        (which names that file) is replaced in one rename. An interrupted save leaves the
        previous model intact.

        Parameters
        ----------
        dir_path
            Folder to write (created if missing).
        overwrite
            Replace a model already saved there.
        save_anndata
            Also write the model's AnnData to ``dir_path/adata.h5ad`` (as scvi-tools does), which
            :meth:`load` then attaches when given no AnnData. Not for a backed AnnData, which
            is already on disk. An ``adata.h5ad`` that no cellvae save wrote is never removed
            or replaced (FileExistsError with ``save_anndata=True``).

        Examples
        --------
        >>> import tempfile, cellvae
        >>> adata = cellvae.datasets.synthetic(200, 30)
        >>> cellvae.SCVI.setup_anndata(adata)
        >>> model = cellvae.SCVI(adata).train(max_epochs=1, progress_bar=False)
        >>> folder = tempfile.mkdtemp()
        >>> model.save(folder, overwrite=True)
        """
        self._check_trained()
        check_flags(overwrite=overwrite, save_anndata=save_anndata)
        path = Path(dir_path).expanduser()
        config_file = path / "model.json"
        if config_file.exists() and not overwrite:
            raise FileExistsError(f"{config_file} exists; pass overwrite=True to replace it.")
        # an adata.h5ad is removed or replaced only when an earlier save wrote it (records
        # before "anndata" was kept: when there was a model.json): never a user's own file
        old_config = _read_json(config_file) if config_file.exists() else {}
        data_file = path / "adata.h5ad"
        ours = data_file.exists() and old_config.get("anndata", bool(old_config)) is not False
        if save_anndata and data_file.exists() and not ours:
            raise FileExistsError(
                f"{data_file} exists and was not written by a cellvae save: save into another "
                "folder, or move that file."
            )
        if save_anndata and (self.adata is None or self.adata.isbacked):
            where = "no AnnData attached" if self.adata is None else "a backed AnnData"
            raise ValueError(
                f"save_anndata=True with {where}: save the model alone and pass the data to "
                f"{type(self).__name__}.load(dir_path, adata)."
            )
        try:  # before anything is written: a setting JSON cannot hold leaves no partial save
            json.dumps(self._config())
        except TypeError as err:
            raise TypeError(
                f"Cannot save this {type(self).__name__}: its settings must be numbers, strings, "
                f"lists or dicts ({err})."
            ) from err
        path.mkdir(parents=True, exist_ok=True)
        old = old_config.get("weights")
        # Stage 1: every new file is written aside; on any failure they are removed and the
        # previous save is left whole, data included.
        written: list[Path] = []
        try:
            state = {k: v.detach().cpu() for k, v in self.module.state_dict().items()}
            tmp = _written_file(path, ".weights-", ".tmp", lambda fh: torch.save(state, fh), "wb")
            written.append(tmp)
            digest = _sha256(tmp)
            weights_name = f"weights-{digest[:16]}.pt"
            if weights_name != old:  # the same weights again: the file is already there
                written.append(path / weights_name)
            os.replace(tmp, path / weights_name)
            data_tmp = None
            if save_anndata:
                data_tmp = _new_file(path, ".adata-", ".h5ad")
                written.append(data_tmp)
                self.adata.write_h5ad(data_tmp)
            config = self._config() | {
                "weights": weights_name,
                "sha256": digest,
                "anndata": bool(save_anndata),
            }
            json_tmp = _written_file(path, ".model-", ".json.tmp", lambda fh: json.dump(config, fh))
            written.append(json_tmp)
        except BaseException:
            for f in written:
                f.unlink(missing_ok=True)
            raise
        # Stage 2: renames. The earlier save's own data go first, so that no moment has
        # model.json name one model next to another model's data.
        if ours:
            data_file.unlink()
        os.replace(json_tmp, config_file)
        if old and old != weights_name and (path / old).exists():
            (path / old).unlink()
        if data_tmp is not None:
            os.replace(data_tmp, data_file)
        logger.info("Saved %s to %s.", type(self).__name__, path)

    @classmethod
    def load(cls, dir_path: str | os.PathLike, adata=None, *, device: str = "auto"):
        """Load a model saved with :meth:`save`; ``adata`` (optional) must match its genes.

        Parameters
        ----------
        dir_path
            Folder written by :meth:`save`.
        adata
            Data to attach. If it has no cellvae setup (or another one), it is registered with
            the saved model's setup; the genes must be the same, in the same order. Default:
            the ``adata.h5ad`` that ``save(..., save_anndata=True)`` wrote, if any.
        device
            Where to put the weights (a model saved on GPU loads on CPU and vice versa).

        Examples
        --------
        >>> import tempfile, numpy as np, cellvae
        >>> adata = cellvae.datasets.synthetic(200, 30)
        >>> cellvae.SCVI.setup_anndata(adata)
        >>> model = cellvae.SCVI(adata).train(max_epochs=1, progress_bar=False)
        >>> folder = tempfile.mkdtemp()
        >>> model.save(folder, overwrite=True)
        >>> loaded = cellvae.SCVI.load(folder, adata)  # device="auto", where it was trained
        >>> np.array_equal(loaded.get_latent_representation(), model.get_latent_representation())
        True
        >>> on_cpu = cellvae.SCVI.load(folder, adata, device="cpu")  # equal up to float rounding
        >>> np.allclose(on_cpu.get_latent_representation(), model.get_latent_representation(),
        ...             atol=1e-5)
        True
        """
        path = Path(dir_path).expanduser()
        config_file = path / "model.json"
        if not config_file.exists():
            raise FileNotFoundError(f"No saved model in {path} (missing model.json).")
        config = _read_json(config_file)
        if config.get("model") != cls.__name__:
            raise ValueError(
                f"{path} holds a {config.get('model')!r} model, not {cls.__name__}: "
                f"use cellvae.{config.get('model')}.load."
            )
        weights = path / config["weights"]
        if not weights.exists():
            raise FileNotFoundError(f"The weights file {weights} named by model.json is missing.")
        if _sha256(weights) != config["sha256"]:
            raise ValueError(
                f"The weights file {weights} is corrupted or truncated (checksum mismatch); "
                "save the model again."
            )
        dev = resolve_device(device)
        try:  # read on the CPU (torch.load refuses "cpu:0"); load_state_dict copies to dev
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(f"Could not read the weights in {weights}: {err}") from err
        model = cls.__new__(cls)
        BaseModel.__init__(model, None, **config["hparams"])
        model.registry_ = Registry.from_dict(config["registry"])
        with torch.random.fork_rng(devices=[]):  # its random initial weights are replaced
            model.module_ = model._build_module().to(dev)  # from the registry: no data read
        try:
            model.module_.load_state_dict(state)
        except RuntimeError as err:
            saved = config.get("format_version", 1)
            hint = (
                f" They were saved in format {saved} by an earlier cellvae, whose {cls.__name__}"
                " module differs: train the model again with this version."
                if saved < cls._module_format
                else ""
            )
            raise ValueError(f"The saved weights do not fit this model:{hint} {err}") from err
        model.module_.eval()
        model.history_ = {k: list(v) for k, v in config.get("history", {}).items()}
        model.is_trained_ = bool(config.get("is_trained", True))
        data_file = path / "adata.h5ad"
        if adata is None and data_file.exists() and config.get("anndata", True):
            import anndata

            try:
                adata = anndata.read_h5ad(data_file)
            except Exception as err:
                raise ValueError(
                    f"Could not read {data_file}, the AnnData saved with the model ({err}); "
                    f"pass the data yourself: {cls.__name__}.load(dir_path, adata)."
                ) from err
        if adata is not None:
            pp.check_anndata(adata)
            pp.check_not_view(adata)
            model.adata = adata
            # checked against the model now (genes, proteins, categories, labels), as a
            # getter's new data are; registered with the model's setup unless set up so
            _, reg = model._data()
            try:
                stored = Registry.from_adata(adata)
            except ValueError:
                stored = None
            if stored != reg:  # none, another setup, or a record of other cells (a subset's)
                adata.uns[UNS_KEY] = reg.to_dict()
        return model

    def __getstate__(self) -> dict:
        # the tensor cache holds weak references, which do not pickle: it is rebuilt on use
        return {**self.__dict__, "_data_cache": None}

    def __getattr__(self, name: str):
        # only reached when the attribute does not exist: point scvi-tools' names (is_trained,
        # train_indices) at the fitted attributes, which end in "_" here
        if not name.startswith("_") and name + "_" in self.__dict__:
            raise AttributeError(
                f"{type(self).__name__!r} object has no attribute {name!r}; fitted attributes "
                f"end in '_': {name}_"
            )
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __repr__(self) -> str:
        status = "trained" if self.is_trained_ else "not trained"
        if self.adata is not None:  # the attached data (after load, not the training data)
            shape = f"{self.adata.n_obs} cells × {self.adata.n_vars} genes"
        elif self.registry_ is not None:
            shape = f"no data attached ({self.registry_.n_vars} genes)"
        else:
            shape = "no data"
        params = ", ".join(f"{k}={v!r}" for k, v in self.hparams.items())
        return f"{type(self).__name__}({params}) — {shape}, {status}"


# scvi-tools' training options that have another name (or form) here
_SCVI_TOOLS_OPTIONS = {
    "accelerator": "device='cpu' / 'cuda' / 'auto'",
    "devices": "device='cuda:N'",
    "train_size": "validation_size=1 - train_size",
    "enable_progress_bar": "progress_bar",
    "plan_kwargs": "its options themselves (lr=..., weight_decay=..., n_epochs_kl_warmup=...)",
    "n_steps_kl_warmup": "n_epochs_kl_warmup or kl_warmup_fraction (the weight rises by step)",
    "check_val_every_n_epoch": "nothing (cellvae validates every epoch, ~5% of its time)",
}


def _new_file(folder: Path, prefix: str, suffix: str) -> Path:
    """A new, empty file in ``folder`` with a random name and the permissions ``open()`` gives.

    ``tempfile.mkstemp`` makes files readable by their owner only; renamed into place they
    made a saved model unreadable to the user's group. Created with mode 0o666 here, the
    umask (and default ACLs) apply, and the process's umask is never changed.
    """
    while True:
        name = folder / f"{prefix}{secrets.token_hex(8)}{suffix}"
        try:
            os.close(os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        except FileExistsError:
            continue
        return name


def _written_file(folder: Path, prefix: str, suffix: str, write, mode: str = "w") -> Path:
    """A :func:`_new_file` filled by ``write(file)`` and synced to disk (removed on failure)."""
    name = _new_file(folder, prefix, suffix)
    try:
        with open(name, mode) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        name.unlink(missing_ok=True)
        raise
    return name


def _renamed_hint(unknown: set[str]) -> str:
    """Advice for scvi-tools' names among ``unknown`` options ('' if none)."""
    hints = [f"{k}: {_SCVI_TOOLS_OPTIONS[k]}" for k in sorted(unknown & _SCVI_TOOLS_OPTIONS.keys())]
    return " Instead of scvi-tools' " + "; ".join(hints) + "." if hints else ""


def check_model_options(cls: type, given: Mapping[str, Any], allowed: set[str]) -> None:
    """Raise a TypeError for a model's unknown options, naming training options passed to it.

    ``allowed`` are the options ``cls`` takes through ``**kwargs``; the message lists them with
    the named parameters of its constructor, and the closest names to a mistyped one. The
    values of the flags and normalisation places among ``given`` are checked too (the module
    is built by ``train``: a bad value would otherwise surface there).
    """
    unknown = set(given) - allowed
    if not unknown:
        for name, value in given.items():
            if name in ("use_batch_norm", "use_layer_norm"):
                norm_places(name, value)
            elif name in ("encode_covariates", "deeply_inject_covariates", "log_variational"):
                check_flags(**{name: value})
        return
    named = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "adata")]
    options = sorted({p for p in named if p != "module_kwargs"} | allowed)
    close = {k: difflib.get_close_matches(k, options, n=1) for k in sorted(unknown)}
    close_hint = "; ".join(f"{k!r}: did you mean {m[0]!r}?" for k, m in close.items() if m)
    training = sorted(unknown & (set(TrainConfig.__dataclass_fields__) | set(_SCVI_TOOLS_OPTIONS)))
    raise TypeError(
        f"Unknown {cls.__name__} options {sorted(unknown)}"
        + (f" ({close_hint})" if close_hint else "")
        + f"; allowed: {options}."
        + _renamed_hint(unknown)
        + (
            f" {training} go to training: model.train(...), or train_kwargs=dict(...) in tl."
            if training
            else ""
        )
    )


def _setup_of(adata) -> Registry:
    """The setup stored in ``adata``, checked to be this AnnData's (not its parent's)."""
    reg = Registry.from_adata(adata)
    if reg.n_obs != adata.n_obs or list(reg.var_names) != [str(v) for v in adata.var_names]:
        args = ", ".join(f"{k}={v!r}" for k, v in reg.setup_kwargs().items() if v is not None)
        raise ValueError(
            f"adata.uns[{UNS_KEY!r}] was set up for {reg.n_obs} cells × {reg.n_vars} genes, but "
            f"this AnnData has {adata.n_obs} × {adata.n_vars}: it was subset or filtered after "
            "setup_anndata (a copy keeps its parent's setup, with its categories and library "
            f"statistics). Set it up again: cellvae.pp.setup_anndata(adata{', ' if args else ''}"
            f"{args})."
        )
    return reg


def _batch_name(batch, categories: Sequence[str]) -> str | None:
    """The category named by ``batch`` (its text, or for a number its value), or None.

    A float column's categories read '1.0', and ``1`` names that one
    (:func:`~cellvae._registry.category_positions`).
    """
    pos = category_positions([str(batch)], categories)[0]
    return None if pos < 0 else categories[pos]


def mean_or_rows(values: np.ndarray | None, return_mean: bool) -> float | np.ndarray:
    """A getter's per-cell ``values`` (None: no cells), or their mean with ``return_mean``."""
    check_flags(return_mean=return_mean)
    if not return_mean:
        return np.empty(0, np.float32) if values is None else values
    if values is None or not len(values):
        raise ValueError("indices selects no cells: a mean over no cells is undefined.")
    return float(values.mean())


def _ln_points(n_latent: int, device) -> torch.Tensor:
    """Standard normal points for the mean of a logistic-normal posterior, ``(512, n_latent)``.

    The same points for every cell, so that a cell's mean does not depend on the other cells of
    its minibatch, on ``batch_size`` or on ``indices``; a scrambled Sobol sequence (seeded: the
    same at every call, and the global random state untouched) mapped through the normal
    quantile, whose error falls faster with the number of points than independent draws'.
    """
    u = torch.quasirandom.SobolEngine(n_latent, scramble=True, seed=0).draw(512)
    return torch.special.ndtri(u.clamp(1e-7, 1 - 1e-7)).to(device, torch.float32)


def _sources(adata, reg: Registry) -> list:
    """The objects the tensors of a model's own AnnData are built from.

    scanpy's in-place functions (``sc.pp.filter_cells(adata)``, ``filter_genes``) and
    assignments such as ``adata.X = ...`` or ``adata.obs_names = ...`` replace them, so
    comparing them by identity tells when cached tensors are stale. A sparse matrix's arrays are
    compared too: ``sc.pp.normalize_total`` and ``sc.pp.log1p`` keep the matrix but replace its
    ``data``. The registered ``obs`` columns (a few bytes per cell) are compared by a digest of
    their values, which also catches a column reassigned or edited in place. Counts and proteins
    edited inside the same arrays (``np.log1p(adata.X.data, out=adata.X.data)``) are caught by
    a digest of a sample of their values (up to 65,536, spread over the matrix): an edit of a
    few entries can escape it, a transformation of the matrix cannot.
    """
    # a backed AnnData's X stays in its file; its layers are in memory and can be replaced
    backed_x = adata.isbacked and reg.layer is None
    # the open file too: reading through a closed or reopened file's datasets fails
    h5 = adata.file._file if backed_x else None
    if backed_x:
        counts = ("backed", str(adata.filename), bool(h5 is not None and h5.id.valid))
    else:
        counts = get_counts(adata, reg.layer)
    # (a dense array's .data is a new buffer object at each access: not compared)
    sparse = sp.issparse(counts)
    parts = [getattr(counts, n, None) if sparse else None for n in ("data", "indices", "indptr")]
    key = reg.protein_expression_obsm_key
    protein = adata.obsm[key] if key is not None and key in adata.obsm else None
    values = ("values", None if backed_x else sample_digest(counts), sample_digest(protein))
    return [
        adata.obs_names,
        adata.var_names,
        counts,
        h5,
        *parts,
        protein,
        _obs_digest(adata, reg),
        values,
    ]


def _obs_digest(adata, reg: Registry) -> tuple:
    """A digest of the values of the registered ``obs`` columns (a tuple, compared by value)."""
    keys = [
        reg.batch_key,
        reg.labels_key,
        reg.size_factor_key,
        *reg.categorical_covariate_keys,
        *reg.continuous_covariate_keys,
    ]
    h = hashlib.blake2b(digest_size=16)
    for key in keys:
        if key is None:
            continue
        col = adata.obs.get(key)
        if col is None:
            h.update(b"missing")
        elif isinstance(col.dtype, pd.CategoricalDtype):
            h.update(np.ascontiguousarray(col.cat.codes.to_numpy()).tobytes())
            h.update(repr(col.cat.categories.tolist()).encode())
        elif col.dtype.kind in "biuf":
            h.update(np.ascontiguousarray(col.to_numpy()).tobytes())
        else:  # strings or objects
            h.update(pd.util.hash_pandas_object(col, index=False).to_numpy().tobytes())
        h.update(f"|{key}|{col.dtype if col is not None else ''}|".encode())
    return ("obs", h.hexdigest())


def _ref(obj):
    """A weak reference where the object allows one (the cache must not keep old data alive)."""
    try:
        return weakref.ref(obj)
    except TypeError:
        return obj


def _same_sources(refs: list, sources: list) -> bool:
    for ref, obj in zip(refs, sources, strict=True):
        if isinstance(ref, weakref.ref):
            if ref() is not obj:
                return False
        elif ref is not obj and not (isinstance(ref, tuple) and ref == obj):
            return False  # objects without weak references: compared by identity, tuples by value
    return True


def _sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON (corrupted or truncated save): {err}") from err


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    return obj
