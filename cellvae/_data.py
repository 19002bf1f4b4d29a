"""Registered fields → tensors, once; then minibatches by pure tensor indexing.

The count matrix stays sparse: it is held as CSR arrays (``indptr`` int32 or int64,
``indices`` int32, ``values`` float32, sharing the AnnData's arrays when the dtypes fit) and a
minibatch is gathered with a handful of vectorised numpy ops on CPU (zero-copy views of the
tensors) or torch ops on other devices. No pandas or scipy call happens per batch. The only
anndata access is in :meth:`TensorData.from_adata`. Per-cell index arrays (codes, the split,
the shuffled order) are int32.

The CSR matrix of a backed AnnData stays on disk (:class:`~cellvae._backed.BackedCSR`):
:meth:`TensorData.batches` then reads windows of nearby cells, a few tens of MB each, and gathers
the minibatches from them in memory (:class:`WindowSampler`).
"""

from __future__ import annotations

import hashlib
import logging
import numbers
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, fields

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from . import _kernels
from ._backed import BackedCSR
from ._registry import Registry, get_counts, iter_row_chunks
from ._sparse import CSRBatch, gather_rows

logger = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]

BLOCK_SIZE = 256  # consecutive cells kept together when training from disk
WINDOW_SIZE = 16_384  # cells read into memory at once from disk (~50 MB at 2,000 genes, 18%)
_PER_CELL = ("batch", "labels", "cat_covs", "cont_covs", "size_factor", "protein")


@dataclass
class TensorData:
    """All registered fields of one AnnData as tensors (cells along the first axis).

    Exactly one of ``dense``, the CSR triple (``indptr``, ``indices``, ``values``) or
    ``backed`` (a CSR matrix left on disk) holds the counts. Codes (``batch``, ``labels``,
    ``cat_covs``) are held as int32 and come out of ``td[idx]`` as int64; ``cont_covs``,
    ``size_factor`` and ``protein`` float32. Index it with a 1-D tensor (or array) of cell
    positions, ``td[idx]``, or iterate minibatches with :meth:`batches` (which reads counts on
    disk a window at a time).
    """

    n_obs: int
    n_vars: int
    batch: torch.Tensor
    labels: torch.Tensor
    indptr: torch.Tensor | None = None
    indices: torch.Tensor | None = None
    values: torch.Tensor | None = None
    dense: torch.Tensor | None = None
    cat_covs: torch.Tensor | None = None
    cont_covs: torch.Tensor | None = None
    size_factor: torch.Tensor | None = None
    protein: torch.Tensor | None = None
    backed: BackedCSR | None = None
    # the row pointers in host memory, kept by .to() for data moved off the CPU: minibatches
    # sum their numbers of stored entries there instead of reading them back from the device
    _host_indptr = None

    @classmethod
    def from_adata(cls, adata, registry: Registry | None = None) -> TensorData:
        """Convert the fields registered in ``adata`` (or by ``registry``) into tensors."""
        reg = registry if registry is not None else Registry.from_adata(adata)
        if [str(v) for v in adata.var_names] != list(reg.var_names):
            raise ValueError(
                "adata's genes differ from the registered ones; run "
                "cellvae.pp.transfer_setup(adata, model) to register it against the model."
            )
        counts = get_counts(adata, reg.layer)

        def codes(key: str | None, categories) -> torch.Tensor:
            if key is None:  # one code for every cell: a stride-0 view, no memory per cell
                return torch.zeros(1, dtype=torch.int32).expand(adata.n_obs)
            return torch.from_numpy(reg.codes(adata, key, categories))

        out = cls(
            n_obs=adata.n_obs,
            n_vars=adata.n_vars,
            batch=codes(reg.batch_key, reg.batch_categories),
            labels=codes(reg.labels_key, reg.label_categories),
        )
        out._set_counts(counts)
        if reg.categorical_covariate_keys:
            codes = [
                reg.codes(adata, k, cats)
                for k, cats in zip(
                    reg.categorical_covariate_keys, reg.categorical_covariate_categories
                )
            ]
            out.cat_covs = torch.from_numpy(np.stack(codes, axis=1))
        if reg.continuous_covariate_keys:
            cont = adata.obs[list(reg.continuous_covariate_keys)].to_numpy(dtype=np.float32)
            out.cont_covs = torch.from_numpy(np.ascontiguousarray(cont))
        if reg.size_factor_key is not None:
            sf = adata.obs[reg.size_factor_key].to_numpy(dtype=np.float32)
            out.size_factor = torch.from_numpy(np.ascontiguousarray(sf))
        if reg.protein_expression_obsm_key is not None:
            from .pp import protein_matrix

            prot = protein_matrix(adata, reg.protein_expression_obsm_key)
            out.protein = torch.from_numpy(np.ascontiguousarray(prot, dtype=np.float32))
        return out

    def n_empty_cells(self) -> int:
        """The number of cells without counts (no stored entry, or an all-zero dense row)."""
        if self.dense is not None:
            return int((self.dense.sum(1) <= 0).sum())  # counts are non-negative
        if self.backed is not None:  # a row may store only zeros: its values are read
            return int((self.backed.row_totals() <= 0).sum())
        return int((torch.diff(self.indptr) == 0).sum())  # canonical CSR: no stored zeros

    def _set_counts(self, counts) -> None:
        if isinstance(counts, np.ndarray) or sp.issparse(counts):
            # one conversion per matrix, shared by every model (and getter) that holds it
            dense = isinstance(counts, np.ndarray)
            names = ("dense",) if dense else ("indptr", "indices", "values")
            tensors = _converted.get(counts)
            if tensors is None:
                self._convert_counts(counts)
                tensors = [getattr(self, name) for name in names]
                _converted.put(counts, tensors)
            for name, tensor in zip(names, tensors, strict=True):
                setattr(self, name, tensor)
            return
        backed = BackedCSR.from_matrix(counts)
        if backed is not None:  # CSR on disk: stays there, read a window at a time
            self.backed = backed
            return
        # Backed dense or another array type: read in row chunks, keep CSR.
        logger.info("Reading the count matrix in row chunks into CSR tensors.")
        indptr = [np.zeros(1, dtype=np.int64)]
        indices, data, offset = [], [], 0
        for _, _, block in iter_row_chunks(counts, self.n_obs):
            block = block if sp.issparse(block) else sp.csr_matrix(block)
            block_indptr, block_indices, block_data = _canonical(block, copy=False)
            indptr.append(block_indptr[1:].astype(np.int64) + offset)
            indices.append(block_indices.astype(np.int32, copy=False))
            data.append(block_data.astype(np.float32, copy=False))
            offset += int(block_indptr[-1])
        self._set_csr(np.concatenate(indptr), np.concatenate(indices), np.concatenate(data))

    def _convert_counts(self, counts) -> None:
        """Dense or CSR tensors of an in-memory matrix (sharing its arrays where they fit)."""
        if isinstance(counts, np.ndarray):
            self.dense = torch.from_numpy(np.ascontiguousarray(counts, dtype=np.float32))
            return
        if counts.format != "csr":
            logger.info("Converting the %s count matrix to CSR once.", counts.format.upper())
        csr = sp.csr_matrix(counts)
        # a CSR input shares its arrays with `csr`: fix a copy, never the user's matrix
        self._set_csr(*_canonical(csr, copy=counts.format == "csr"))

    def _set_csr(self, indptr, indices, data) -> None:
        # Row pointers as scipy stores them: int32 while the nonzeros fit, int64 beyond 2^31.
        # int32 columns. Row pointers, columns and values share the AnnData's own arrays when
        # their dtypes already fit (no copy: the training data costs no memory beyond what the
        # AnnData holds). They are only read, never written.
        ptr_dtype = np.int32 if np.asarray(indptr).dtype == np.int32 else np.int64
        self.indptr = torch.from_numpy(_readable(indptr, ptr_dtype))
        self.indices = torch.from_numpy(_readable(indices, np.int32))
        self.values = torch.from_numpy(_readable(data, np.float32))

    @property
    def is_sparse(self) -> bool:
        """Whether the counts are held as CSR."""
        return self.dense is None

    @property
    def device(self) -> torch.device:
        """The device the tensors live on."""
        return self.batch.device

    def to(self, device: torch.device | str) -> TensorData:
        """Return a copy with every tensor on ``device``.

        Counts on disk stay there (the copy shares them); what is read of them goes to
        ``device``.
        """
        kw = {}
        for f in fields(self):
            v = getattr(self, f.name)
            kw[f.name] = v.to(device) if isinstance(v, torch.Tensor) else v
        out = TensorData(**kw)
        if self.indptr is not None:
            out._host_indptr = (
                self.indptr if self.indptr.device.type == "cpu" else self._host_indptr
            )
        return out

    def _device_batches(self, chunks: list[torch.Tensor]) -> Iterator[Batch]:
        """The minibatches ``chunks`` (index tensors) of data off the CPU, never waiting for it.

        The indices go to the device in one copy per pass, and each minibatch's number of
        stored entries is summed on the host from the row pointers there, so gathering a
        minibatch reads nothing back from the device: the host queues the next steps' work while
        the device runs.
        """
        if not chunks:
            return
        sizes = [len(c) for c in chunks]
        order = torch.cat(chunks)
        on_device = torch.split(self._index(order), sizes)  # one copy either way
        totals: list[int | None] = [None] * len(chunks)
        ptr = self._host_indptr
        if self.indptr is not None and ptr is not None:
            order_np, ptr_np = order.cpu().numpy(), ptr.numpy()
            lengths = ptr_np.take(order_np + 1).astype(np.int64) - ptr_np.take(order_np)
            sums = np.concatenate([[0], np.cumsum(lengths)])[np.cumsum(sizes)]
            totals = np.diff(sums, prepend=0).tolist()
        for idx, total in zip(on_device, totals, strict=True):
            yield self._minibatch(idx, total)

    def nbytes(self) -> int:
        """Bytes held in memory by all tensors (and by the row pointers of counts on disk)."""
        held = sum(
            v.untyped_storage().nbytes()  # a stride-0 view (unregistered codes) holds one value
            for f in fields(self)
            if isinstance(v := getattr(self, f.name), torch.Tensor)
        )
        return held + (self.backed.nbytes if self.backed is not None else 0)

    def counts(self, idx: torch.Tensor, *, n_entries: int | None = None) -> torch.Tensor | CSRBatch:
        """Counts of rows ``idx``: a :class:`~cellvae._sparse.CSRBatch`, or dense rows.

        CSR entries come row by row in the order of ``idx``; columns are int64, values float32.
        On CPU the gather runs in the compiled kernel (one copy per row) or, without it, in
        single-threaded numpy: the same chain of small torch ops waits on torch's thread pool
        for every op, which made it 20x slower on a busy machine.
        Elsewhere it runs in torch; ``n_entries``, the number of stored entries of the rows
        when the caller knows it (:meth:`batches` does), saves reading it back from the device.
        No dense ``cells × genes`` array is built: the models read the entries directly. Counts
        on disk are read for each call: iterate with :meth:`batches` to read each cell once per
        pass.
        """
        idx = self._index(idx)
        if self.dense is not None:
            return self.dense.index_select(0, idx)
        if self.backed is not None:
            rows, local = torch.unique(idx.cpu(), return_inverse=True)
            return self._read(rows).counts(local)
        if self.indptr.device.type == "cpu":
            idx_np = idx.numpy()
            indptr = self.indptr.numpy()
            if _is_range(idx_np):  # consecutive cells (getters): copy one slice, no gather
                ptr = indptr[idx_np[0] : idx_np[-1] + 2]
                lo, hi = int(ptr[0]), int(ptr[-1])
                row = np.arange(len(idx_np), dtype=np.int64).repeat(np.diff(ptr))
                col = self.indices.numpy()[lo:hi].astype(np.int64)
                # a copy, not a view: a view would keep a whole window read from disk alive
                parts = (row, col, self.values.numpy()[lo:hi].copy(), ptr[:-1] - np.int64(lo))
                row, col, val, offsets = (torch.from_numpy(a) for a in parts)
            elif _kernels.available():  # values are float32 (_set_csr)
                row, col, val, offsets = _kernels.gather_csr(
                    idx, self.indptr, self.indices, self.values
                )
            else:
                row, col, val, offsets = _gather(indptr, self.indices, self.values, idx_np)
        else:
            row, col, val, offsets = gather_rows(
                self.indptr, self.indices, self.values, idx, n_entries=n_entries
            )
        return CSRBatch(row, col, val, offsets, (len(idx), self.n_vars))

    def _index(self, idx) -> torch.Tensor:
        """``idx`` as a 1-D int64 tensor on this data's device."""
        if not isinstance(idx, torch.Tensor):
            idx = torch.as_tensor(np.asarray(idx, dtype=np.int64))
        if idx.dtype != torch.int64:
            idx = idx.long()
        device = self.batch.device
        if idx.device != device:
            idx = idx.to(device)
        return idx.reshape(-1)

    def __getitem__(self, idx: torch.Tensor) -> Batch:
        """The minibatch of cells ``idx`` as a dict of tensors.

        Keys: ``"x"`` (the counts: a :class:`~cellvae._sparse.CSRBatch` for sparse data, else a
        dense float32 tensor, cells × genes), ``"batch"`` and ``"labels"``
        (int64 codes; held as int32 per cell) and, when registered, ``"cat_covs"`` (int64,
        cells × covariates), ``"cont_covs"`` (float32), ``"size_factor"`` (float32) and
        ``"protein"`` (float32).
        """
        return self._minibatch(self._index(idx))

    def _minibatch(self, idx: torch.Tensor, n_entries: int | None = None) -> Batch:
        """``self[idx]`` for ``idx`` already on this data's device (see :meth:`counts`)."""
        out: Batch = {
            "x": self.counts(idx, n_entries=n_entries),
            "batch": self.batch.index_select(0, idx).long(),
            "labels": self.labels.index_select(0, idx).long(),
        }
        for name in ("cat_covs", "cont_covs", "size_factor", "protein"):
            v = getattr(self, name)
            if v is not None:
                v = v.index_select(0, idx)
                out[name] = v.long() if name == "cat_covs" else v
        return out

    def batches(
        self,
        indices: torch.Tensor,
        batch_size: int,
        *,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        block_size: int = BLOCK_SIZE,
        window_size: int = WINDOW_SIZE,
    ) -> Iterator[Batch]:
        """Yield the minibatches of cells ``indices`` as dicts (see :meth:`__getitem__`).

        Counts in memory: the minibatches of :class:`BatchSampler`, each gathered by indexing.
        Counts on disk: those of :class:`WindowSampler` (``block_size`` and ``window_size`` are
        its options): the cells of each window are read from disk once, into memory on this
        data's device, and its minibatches are gathered from there. Either way there are
        ``len(BatchSampler(indices, batch_size, shuffle=shuffle))`` minibatches, of the same
        sizes; without shuffling they come in the order of ``indices``.

        Parameters
        ----------
        indices
            Cell positions (1-D int64 tensor).
        batch_size
            Cells per minibatch.
        shuffle
            Draw the order from ``generator``, merging a trailing batch of one cell.
        generator
            Random source of the shuffling.
        block_size, window_size
            Counts on disk only: see :class:`WindowSampler`.
        """
        if self.backed is None:
            sampler = BatchSampler(indices, batch_size, shuffle=shuffle, generator=generator)
            if self.device.type == "cpu":
                for idx in sampler:
                    yield self[idx]
            else:
                yield from self._device_batches(list(sampler))
            return
        sampler = WindowSampler(
            indices.cpu(),
            batch_size,
            shuffle=shuffle,
            generator=generator,
            block_size=block_size,
            window_size=window_size,
        )
        for window in sampler.windows():
            rows = torch.cat(window).unique()  # sorted
            cells = self._read(rows)
            for idx in window:
                yield cells[torch.searchsorted(rows, idx)]

    def _read(self, rows: torch.Tensor) -> TensorData:
        """Cells ``rows`` (sorted, unique) with their counts read from disk, on this device."""
        on_device = rows.to(self.device)
        per_cell = {
            name: v.index_select(0, on_device)
            for name in _PER_CELL
            if (v := getattr(self, name)) is not None
        }
        out = TensorData(n_obs=len(rows), n_vars=self.n_vars, **per_cell)
        indptr, indices, data = self.backed.read(rows.numpy())
        csr = sp.csr_matrix((data, indices, indptr), shape=(len(rows), self.n_vars))
        out._set_csr(*_canonical(csr, copy=False))  # the arrays are ours: fixed in place
        return out.to(self.device)


class _Conversions:
    """Float32 count tensors copied from in-memory matrices, shared while both are alive.

    A float64, integer, non-contiguous dense or non-canonical CSR matrix is copied into float32
    tensors; without this, each model on the same AnnData held its own copy (six models on 100k
    cells x 2,000 dense genes: six times 800 MB). A copy is reused only while the matrix holds
    exactly the values it was made from, compared in full (in chunks: about the time of
    converting again, without a second copy), so no edit of the matrix, in place or by replacing
    its arrays, reaches a model through a shared copy. Tensors that are the matrix's own memory
    are not entered (nothing to save). Entries hold weak references only; thread-safe.
    """

    def __init__(self):
        self._entries: dict[int, tuple] = {}
        self._lock = threading.Lock()

    def get(self, matrix) -> list[torch.Tensor] | None:
        with self._lock:
            entry = self._entries.get(id(matrix))
        if entry is None:
            return None
        ref, refs = entry
        tensors = [r() for r in refs]
        if ref() is not matrix or any(t is None for t in tensors):
            return None
        return tensors if _same_values(matrix, tensors) else None

    def put(self, matrix, tensors: list[torch.Tensor]) -> None:
        dense = isinstance(matrix, np.ndarray)
        if not dense and matrix.format != "csr":
            return  # converted again each time (_same_values compares CSR only)
        own = [matrix] if dense else [matrix.indptr, matrix.indices, matrix.data]
        if all(np.may_share_memory(t.numpy(), a) for t, a in zip(tensors, own, strict=True)):
            return  # the matrix's own arrays: a new model gets them for free
        try:
            ref = weakref.ref(matrix)
        except TypeError:  # an array type without weak references: not shared
            return
        with self._lock:
            self._entries = {k: e for k, e in self._entries.items() if e[0]() is not None}
            self._entries[id(matrix)] = (ref, [weakref.ref(t) for t in tensors])


_converted = _Conversions()


def _same_values(matrix, tensors: list[torch.Tensor], chunk: int = 1 << 22) -> bool:
    """Whether ``tensors`` (dense, or CSR arrays) hold exactly ``matrix`` (dense or CSR).

    A CSR matrix compares one to one only where its conversion kept its entries (canonical, no
    stored zeros); any other compares unequal and is converted again.
    """
    if isinstance(matrix, np.ndarray):
        (dense,) = tensors
        if dense.shape != matrix.shape:
            return False
        rows = max(1, chunk // max(1, matrix.shape[1] if matrix.ndim > 1 else 1))
        d = dense.numpy()
        return all(
            np.array_equal(d[i : i + rows], matrix[i : i + rows].astype(np.float32))
            for i in range(0, matrix.shape[0], rows)
        )
    indptr, indices, values = (t.numpy() for t in tensors)
    if len(values) != matrix.nnz or len(indptr) != len(matrix.indptr):  # put() enters CSR only
        return False
    if not (np.array_equal(indptr, matrix.indptr) and np.array_equal(indices, matrix.indices)):
        return False
    return all(
        np.array_equal(values[i : i + chunk], matrix.data[i : i + chunk].astype(np.float32))
        for i in range(0, len(values), chunk)
    )


def sample_digest(a, n: int = 1 << 16) -> str | None:
    """A digest of up to ``n`` values spread evenly over an in-memory matrix, else ``None``.

    Strided views, so only the sample is copied: ~2 ms at 65,536 values, whatever the size.
    An edit of a few entries can escape it; a transformation of the matrix cannot. Takes a
    sparse matrix, a numpy array or a DataFrame (proteins).
    """
    if sp.issparse(a):
        data = getattr(a, "data", None)  # CSR, CSC, COO, BSR; not LIL's lists or DOK
        if not isinstance(data, np.ndarray) or data.dtype == object:
            return None
        sample, kind = data[:: max(1, data.size // n)], str(a.dtype)
    elif isinstance(a, np.ndarray) or hasattr(a, "iloc"):
        if isinstance(a, np.ndarray) and (a.ndim == 0 or a.dtype == object):
            return None
        n_cols = a.shape[1] if a.ndim > 1 else 1
        col_step = max(1, n_cols // max(1, int(n**0.5)))
        row_step = max(1, a.shape[0] * -(-n_cols // col_step) // n)
        if isinstance(a, np.ndarray):
            sample = a[::row_step, ::col_step] if a.ndim > 1 else a[::row_step]
            kind = str(a.dtype)
        elif not all(pd.api.types.is_numeric_dtype(t) for t in a.dtypes):
            return None  # the set-up's checks say what is wrong with it
        else:  # sampled before the conversion: a frame of several dtypes is not copied whole
            sample = a.iloc[::row_step, ::col_step].to_numpy(dtype=np.float64, na_value=np.nan)
            kind = ",".join(map(str, a.dtypes))
    else:
        return None  # no matrix, or one that stays where it is (on disk)
    h = hashlib.blake2b(np.ascontiguousarray(sample).tobytes(), digest_size=16)
    h.update(f"{a.shape}|{kind}".encode())
    return h.hexdigest()


def _readable(a, dtype) -> np.ndarray:
    """``a`` as a contiguous, writeable-flagged array of ``dtype``, copying only if needed."""
    out = np.ascontiguousarray(a, dtype=dtype)
    return out if out.flags.writeable else out.copy()


def _canonical(csr: sp.csr_matrix, *, copy: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSR arrays with duplicates summed and explicit zeros dropped (copying if ``copy``).

    Repeated entries of a type narrower than 32 bits are summed in float32 (the tensors' type):
    two int8 100s would wrap to -56, where the set-up's scan counted 200.
    """
    explicit_zeros = csr.nnz and not np.all(csr.data)
    if not csr.has_canonical_format or explicit_zeros:
        if csr.dtype.itemsize < 4:
            csr = csr.astype(np.float32)  # a copy
        elif copy:
            csr = csr.copy()
        csr.sum_duplicates()
        csr.eliminate_zeros()
    return csr.indptr, csr.indices, csr.data


def _is_range(idx: np.ndarray) -> bool:
    """Whether ``idx`` is ``first, first + 1, …, last`` (non-empty)."""
    n = len(idx)
    if n == 0 or int(idx[-1]) - int(idx[0]) + 1 != n:
        return False
    return n == 1 or bool(np.all(np.diff(idx) == 1))


def _gather(
    indptr: np.ndarray, indices: torch.Tensor, values: torch.Tensor, idx: np.ndarray
) -> tuple[torch.Tensor, ...]:
    """``(row, col, val, offsets)`` of the CSR rows ``idx`` (int64), in numpy, on the CPU.

    The path without the compiled kernels, which gather with one copy per row
    (:func:`cellvae._kernels.gather_csr`: 35 instead of 103 µs for 128 random cells of
    100,000 × 2,000 at 8%, session 18) and work out the rows' offsets in the same library
    (session 21: numpy's five calls took ~70 µs of a training step).
    """
    if len(idx) and idx.min() < 0:
        raise IndexError(f"cell index {idx.min()} is negative.")
    starts = indptr.take(idx).astype(np.int64)  # raises past the last cell
    lengths = indptr.take(idx + 1) - starts
    row, pos, offsets = _positions(starts, lengths)
    col = indices.numpy().take(pos).astype(np.int64)
    val = values.numpy().take(pos)
    return tuple(torch.from_numpy(a) for a in (row, col, val, offsets))


def _offsets(lengths: np.ndarray) -> tuple[np.ndarray, int]:
    """Where each of the rows of these lengths begins in the batch, and the batch's entries."""
    ends = lengths.cumsum()
    return ends - lengths, int(ends[-1]) if len(ends) else 0


def _positions(
    starts: np.ndarray, lengths: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Batch row and CSR position of every stored entry of the rows, and where each row starts."""
    # ndarray methods and C-level numpy functions only: no Python-level numpy wrapper per batch
    offsets, total = _offsets(lengths)
    # entry j of the batch, the k-th of batch row r, sits at starts[r] + k = (starts[r] -
    # offsets[r]) + j
    pos = (starts - offsets).repeat(lengths)
    pos += np.arange(total, dtype=np.int64)
    row = np.arange(len(starts), dtype=np.int64).repeat(lengths)
    return row, pos, offsets


def seeded_generator(seed: int | None) -> torch.Generator:
    """A CPU random generator seeded with ``seed``, or from a fresh random seed for None."""
    gen = torch.Generator()
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(int(seed))
    return gen


def split_indices(
    n_obs: int, validation_size: float, seed: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random split of ``range(n_obs)`` into train and validation indices (seeded unless None)."""
    if not isinstance(validation_size, numbers.Real) or not 0.0 <= validation_size < 1.0:
        raise ValueError(f"validation_size must be in [0, 1), got {validation_size}.")
    gen = seeded_generator(seed)
    # int32 per cell (half the memory of int64): the same permutation as the int64 draw
    perm = torch.randperm(n_obs, generator=gen, dtype=torch.int32)
    n_val = int(round(n_obs * validation_size))
    if n_obs - n_val < 2:
        lower = " Lower validation_size (0 for none) or add cells." if n_val else " Add cells."
        raise ValueError(
            f"Too few cells ({n_obs}) to train with validation_size={validation_size}: at least "
            f"2 training cells are needed.{lower}"
        )
    return perm[n_val:].sort().values, perm[:n_val].sort().values


class BatchSampler:
    """Iterate minibatches of index tensors over a subset of cells.

    With ``shuffle=True`` (training) the order is drawn from ``generator`` and a trailing batch
    of one cell is merged into the previous batch, so batch norm never sees a batch of one
    (unless ``indices`` holds a single cell or ``batch_size`` is 1). Without shuffling the order
    is kept and the last batch may be any size (inference).
    """

    def __init__(
        self,
        indices: torch.Tensor,
        batch_size: int,
        *,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}.")
        self.indices = indices
        self.batch_size = int(batch_size)  # a numpy integer is no size for torch.split
        self.shuffle = shuffle
        self.generator = generator

    def __len__(self) -> int:
        n = len(self.indices)
        n_batches = -(-n // self.batch_size)
        if self.shuffle and n_batches > 1 and n % self.batch_size == 1:
            n_batches -= 1
        return n_batches

    def __iter__(self) -> Iterator[torch.Tensor]:
        idx = self.indices
        if self.shuffle:
            perm = torch.randperm(len(idx), generator=self.generator, dtype=torch.int32)
            idx = idx[perm]
        yield from self._split(idx)

    def _split(self, idx: torch.Tensor) -> list[torch.Tensor]:
        """``idx`` in batches of ``batch_size``; shuffled, a trailing batch of one is merged."""
        chunks = list(torch.split(idx, self.batch_size))
        if self.shuffle and len(chunks) > 1 and len(chunks[-1]) == 1:
            last = chunks.pop()
            chunks[-1] = torch.cat([chunks[-1], last])
        return chunks


class WindowSampler(BatchSampler):
    """Minibatches grouped into windows of cells that lie close together on disk.

    For counts read from disk (:meth:`TensorData.batches`): each window's cells are read once,
    in a few large reads, and its minibatches are gathered in memory. Windows hold a whole
    number of minibatches (``window_size`` rounded to a multiple of ``batch_size``), so there
    are as many minibatches, of the same sizes, as :class:`BatchSampler` gives.

    Shuffled (training), the order is block-shuffled: the sorted ``indices`` are cut into blocks
    of ``block_size`` consecutive cells, the blocks are shuffled, the shuffled sequence is cut
    into windows, and the cells of each window are shuffled and cut into minibatches. The
    trade-off: a minibatch draws from the ``window_size / block_size`` blocks of its window
    (64 with the defaults, spread at random over the data) rather than from all cells, so cells
    stored next to each other (e.g. a file sorted by sample) meet in a minibatch more often than
    under a full shuffle; every cell is still seen once per epoch, in a new order each epoch.
    Larger windows mix more and hold more memory; larger blocks mean fewer, larger reads and
    less mixing. Without shuffling, ``indices`` are cut into windows in their order.

    Parameters
    ----------
    indices, batch_size, shuffle, generator
        As for :class:`BatchSampler`.
    block_size
        Consecutive cells (of the sorted ``indices``) kept together when shuffling.
    window_size
        Cells per window (rounded to a whole number of minibatches, at least one).
    """

    def __init__(
        self,
        indices: torch.Tensor,
        batch_size: int,
        *,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        block_size: int = BLOCK_SIZE,
        window_size: int = WINDOW_SIZE,
    ):
        super().__init__(indices, batch_size, shuffle=shuffle, generator=generator)
        if block_size < 1 or window_size < 1:
            raise ValueError(
                f"block_size and window_size must be positive, got {block_size}, {window_size}."
            )
        self.block_size = block_size
        self.window_size = max(1, round(window_size / self.batch_size)) * self.batch_size

    def __iter__(self) -> Iterator[torch.Tensor]:
        for window in self.windows():
            yield from window

    def windows(self) -> Iterator[list[torch.Tensor]]:
        """Yield the minibatches (index tensors) of each window, a list per window."""
        order = self.indices
        if self.shuffle:
            blocks = torch.split(order.sort().values, self.block_size)
            perm = torch.randperm(len(blocks), generator=self.generator).tolist()
            order = torch.cat([blocks[i] for i in perm]) if blocks else order
        n = len(order)
        bounds = [*range(0, n, self.window_size), n]
        if self.shuffle and len(bounds) > 2 and bounds[-1] - bounds[-2] == 1:
            del bounds[-2]  # a last window of one cell joins the previous one (no batch of one)
        for start, stop in zip(bounds[:-1], bounds[1:]):
            cells = order[start:stop]
            if self.shuffle:
                cells = cells[torch.randperm(len(cells), generator=self.generator)]
            yield self._split(cells)
