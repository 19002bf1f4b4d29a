"""Registered fields → tensors, once; then minibatches by pure tensor indexing.

The count matrix stays sparse: it is held as CSR arrays (``indptr`` int64, ``indices`` int32,
``data`` float32) and a minibatch is gathered with a handful of torch ops. No pandas or scipy
call happens per batch. The only anndata access is in :meth:`TensorData.from_adata`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, fields

import numpy as np
import scipy.sparse as sp
import torch

from ._registry import Registry, get_counts, iter_row_chunks

logger = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]


@dataclass
class TensorData:
    """All registered fields of one AnnData as tensors (cells along the first axis).

    Exactly one of ``dense`` or the CSR triple (``indptr``, ``indices``, ``values``) is set.
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
        out = cls(
            n_obs=adata.n_obs,
            n_vars=adata.n_vars,
            batch=torch.from_numpy(reg.codes(adata, reg.batch_key, reg.batch_categories)),
            labels=torch.from_numpy(reg.codes(adata, reg.labels_key, reg.label_categories)),
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

    def _set_counts(self, counts) -> None:
        if isinstance(counts, np.ndarray):
            self.dense = torch.from_numpy(np.ascontiguousarray(counts, dtype=np.float32))
            return
        if sp.issparse(counts):
            if counts.format != "csr":
                logger.info("Converting the %s count matrix to CSR once.", counts.format.upper())
            csr = sp.csr_matrix(counts)
            self._set_csr(csr.indptr, csr.indices, csr.data)
            return
        # Backed (on disk) or another array type: read in row chunks, keep CSR.
        logger.info("Reading the count matrix in row chunks into CSR tensors.")
        indptr = [np.zeros(1, dtype=np.int64)]
        indices, data, offset = [], [], 0
        for _, _, block in iter_row_chunks(counts, self.n_obs):
            block = block if sp.issparse(block) else sp.csr_matrix(block)
            indptr.append(block.indptr[1:].astype(np.int64) + offset)
            indices.append(block.indices)
            data.append(block.data)
            offset += block.nnz
        self._set_csr(np.concatenate(indptr), np.concatenate(indices), np.concatenate(data))

    def _set_csr(self, indptr, indices, data) -> None:
        # int64 row pointers so more than 2^31 nonzeros index correctly; int32 columns.
        self.indptr = torch.from_numpy(np.asarray(indptr, dtype=np.int64))
        self.indices = torch.from_numpy(np.asarray(indices, dtype=np.int32))
        self.values = torch.from_numpy(np.asarray(data, dtype=np.float32))

    @property
    def is_sparse(self) -> bool:
        """Whether the counts are held as CSR."""
        return self.dense is None

    def to(self, device: torch.device | str) -> TensorData:
        """Return a copy with every tensor on ``device``."""
        kw = {}
        for f in fields(self):
            v = getattr(self, f.name)
            kw[f.name] = v.to(device) if isinstance(v, torch.Tensor) else v
        return TensorData(**kw)

    def nbytes(self) -> int:
        """Bytes held by all tensors."""
        return sum(
            v.numel() * v.element_size()
            for f in fields(self)
            if isinstance(v := getattr(self, f.name), torch.Tensor)
        )

    def rows(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """CSR entries of rows ``idx``: (row position in the batch, column, value)."""
        starts = self.indptr[idx]
        lengths = self.indptr[idx + 1] - starts
        row = torch.repeat_interleave(torch.arange(len(idx), device=idx.device), lengths)
        # position of each entry = its row's start + its rank within the row
        offsets = torch.cumsum(lengths, 0) - lengths
        pos = torch.arange(int(lengths.sum()), device=idx.device) - offsets[row] + starts[row]
        return row, self.indices[pos].long(), self.values[pos]

    def counts(self, idx: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Dense counts of rows ``idx`` and the (row, col) positions of their nonzeros."""
        if self.dense is not None:
            x = self.dense[idx]
            nz = torch.nonzero(x, as_tuple=True)
            return x, nz
        row, col, val = self.rows(idx)
        x = torch.zeros(len(idx), self.n_vars, dtype=torch.float32, device=idx.device)
        x[row, col] = val
        return x, (row, col)

    def __getitem__(self, idx: torch.Tensor) -> Batch:
        """The minibatch of cells ``idx`` as a dict of tensors."""
        x, (nz_row, nz_col) = self.counts(idx)
        out: Batch = {
            "x": x,
            "nz_row": nz_row,
            "nz_col": nz_col,
            "batch": self.batch[idx],
            "labels": self.labels[idx],
        }
        for name in ("cat_covs", "cont_covs", "size_factor", "protein"):
            v = getattr(self, name)
            if v is not None:
                out[name] = v[idx]
        return out


def split_indices(
    n_obs: int, validation_size: float, seed: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded random split of ``range(n_obs)`` into train and validation indices."""
    if not 0.0 <= validation_size < 1.0:
        raise ValueError(f"validation_size must be in [0, 1), got {validation_size}.")
    gen = torch.Generator().manual_seed(0 if seed is None else int(seed))
    perm = torch.randperm(n_obs, generator=gen)
    n_val = int(round(n_obs * validation_size))
    if n_obs - n_val < 2:
        raise ValueError(
            f"Too few cells ({n_obs}) to train with validation_size={validation_size}."
        )
    return perm[n_val:].sort().values, perm[:n_val].sort().values


class BatchSampler:
    """Iterate minibatches of index tensors over a subset of cells.

    With ``shuffle=True`` (training) the order is drawn from ``generator`` and a trailing batch
    of one cell is merged into the previous batch, so batch norm never sees a batch of one.
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
        self.batch_size = batch_size
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
            idx = idx[torch.randperm(len(idx), generator=self.generator)]
        chunks = list(torch.split(idx, self.batch_size))
        if self.shuffle and len(chunks) > 1 and len(chunks[-1]) == 1:
            chunks[-2] = torch.cat([chunks[-2], chunks.pop()])
        yield from chunks
