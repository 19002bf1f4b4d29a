"""Sparse minibatches of counts, and the linear layer that reads them without densifying.

A minibatch of a sparse count matrix is a :class:`CSRBatch`: the stored entries of its rows
(row position, column, value) plus where each row starts. Pure torch. The functions
:func:`as_dense`, :func:`row_sums` and :func:`log1p` take either a dense tensor or a
:class:`CSRBatch`, so module code has one path for both.

:func:`sparse_linear` computes ``X @ W + b`` for a CSR ``X`` (cells × genes) with
:func:`torch.nn.functional.embedding_bag` (each row is a weighted bag of rows of ``W``), or on the
CPU the compiled :func:`cellvae._kernels.csr_dense`: it reads only the stored entries, about 12×
less work than the dense product at 8% nonzero. Its weight gradient ``Xᵀ dY`` is the same kind
of product with the roles swapped (each gene a bag of rows of ``dY``), computed after sorting the
entries by column; on the CPU, where the compiled kernels were built,
:func:`cellvae._kernels.csr_t_dense` sorts the entries by column with a counting sort and sums
each gene's rows of ``dY`` in registers, as the forward product sums each cell's rows of ``W``
(at 256 cells × 2,000 genes with 9% stored, 256 hidden units, 2 threads: 350 -> 268 µs against
adding each entry's row into the gradient's, which took 77 instead of torch's 174 µs at 128 ×
2,000 and 128 units: ``benchmarks/README.md``, sessions 18 and 27).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from . import _kernels

__all__ = [
    "CSRBatch",
    "HStack",
    "as_dense",
    "gather_rows",
    "hstack",
    "log1p",
    "row_sums",
    "sparse_linear",
]


@dataclass
class CSRBatch:
    """The stored entries of a minibatch of count rows.

    Attributes
    ----------
    row
        Row (cell) position in the batch of each entry, int64, non-decreasing.
    col
        Column (gene) of each entry, int64.
    val
        Value of each entry, float32.
    offsets
        Position of the first entry of each row, int64, length ``n_rows``.
    shape
        ``(n_rows, n_cols)``.

    Examples
    --------
    >>> import torch
    >>> x = CSRBatch.from_dense(torch.tensor([[0.0, 2.0, 0.0], [1.0, 0.0, 3.0]]))
    >>> x.val.tolist(), x.offsets.tolist(), x.shape
    ([2.0, 1.0, 3.0], [0, 1], (2, 3))
    >>> bool(torch.equal(x.dense(), torch.tensor([[0.0, 2.0, 0.0], [1.0, 0.0, 3.0]])))
    True
    """

    row: torch.Tensor
    col: torch.Tensor
    val: torch.Tensor
    offsets: torch.Tensor
    shape: tuple[int, int]

    @classmethod
    def from_dense(cls, x: torch.Tensor) -> CSRBatch:
        """The nonzero entries of a dense 2-D tensor, row by row."""
        row, col = torch.nonzero(x, as_tuple=True)
        counts = torch.bincount(row, minlength=x.shape[0])
        offsets = torch.cumsum(counts, 0) - counts
        return cls(row, col, x[row, col], offsets, (x.shape[0], x.shape[1]))

    @property
    def device(self) -> torch.device:
        """Device of the tensors."""
        return self.val.device

    @property
    def dtype(self) -> torch.dtype:
        """Data type of the values."""
        return self.val.dtype

    def to(self, device: torch.device | str) -> CSRBatch:
        """The batch on ``device``."""
        return CSRBatch(
            self.row.to(device),
            self.col.to(device),
            self.val.to(device),
            self.offsets.to(device),
            self.shape,
        )

    def with_values(self, val: torch.Tensor) -> CSRBatch:
        """The same positions holding ``val``."""
        return CSRBatch(self.row, self.col, val, self.offsets, self.shape)

    def dense(self) -> torch.Tensor:
        """The batch as a dense ``(n_rows, n_cols)`` tensor."""
        n, g = self.shape
        if self.val.device.type == "cpu":  # numpy's scatter: no wait on torch's thread pool
            flat = self.row.numpy() * g
            flat += self.col.numpy()
            out = np.zeros(n * g, dtype=self.val.numpy().dtype)
            out[flat] = self.val.numpy()
            return torch.from_numpy(out).view(n, g)
        out = torch.zeros(n * g, dtype=self.val.dtype, device=self.val.device)
        out.index_put_((self.row * g + self.col,), self.val)
        return out.view(n, g)

    def tile(self, n: int) -> CSRBatch:
        """``n`` copies of the batch stacked by rows: ``(n · rows, cols)``, as ``repeat(n, 1)``.

        Examples
        --------
        >>> import torch
        >>> x = CSRBatch.from_dense(torch.tensor([[0.0, 2.0, 0.0], [1.0, 0.0, 3.0]]))
        >>> tiled = x.tile(2)
        >>> tiled.dense().tolist()
        [[0.0, 2.0, 0.0], [1.0, 0.0, 3.0], [0.0, 2.0, 0.0], [1.0, 0.0, 3.0]]
        >>> tiled.row.tolist(), tiled.offsets.tolist(), tiled.shape
        ([0, 1, 1, 2, 3, 3], [0, 1, 3, 4], (4, 3))
        """
        n_rows, n_entries = self.shape[0], len(self.val)
        copy = torch.arange(n, device=self.device).repeat_interleave(n_entries)
        row = self.row.repeat(n) + copy * n_rows
        first = torch.arange(n, device=self.device).repeat_interleave(n_rows) * n_entries
        offsets = self.offsets.repeat(n) + first
        shape = (n * n_rows, self.shape[1])
        return CSRBatch(row, self.col.repeat(n), self.val.repeat(n), offsets, shape)

    def index_select(self, rows: torch.Tensor) -> CSRBatch:
        """The batch restricted to ``rows`` (positions in this batch), in that order."""
        indptr = torch.cat([self.offsets, self.offsets.new_tensor([len(self.val)])])
        row, col, val, offsets = gather_rows(indptr, self.col, self.val, rows)
        return CSRBatch(row, col, val, offsets, (len(rows), self.shape[1]))


def gather_rows(indptr, indices, values, idx, *, n_entries: int | None = None):
    """``(row, col, val, offsets)`` of the CSR rows ``idx``, with torch ops (any device).

    ``row`` is each entry's position in ``idx``, ``col`` the int64 columns, ``val`` the values,
    ``offsets`` where each selected row starts. ``n_entries``: the number of entries of those
    rows if known; otherwise it is read back from ``idx``'s device (a host sync).
    """
    starts = indptr.index_select(0, idx).long()  # int32 or int64 row pointers
    lengths = indptr.index_select(0, idx + 1) - starts
    ends = torch.cumsum(lengths, 0)
    offsets = ends - lengths
    if n_entries is not None:
        total = n_entries
    else:
        total = int(ends[-1]) if len(idx) else 0
    # entry j, the k-th of selected row r, sits at starts[r] + k = (starts[r] - offsets[r]) + j
    pos = torch.repeat_interleave(starts - offsets, lengths, output_size=total)
    pos += torch.arange(total, device=idx.device)
    row = torch.repeat_interleave(
        torch.arange(len(idx), device=idx.device), lengths, output_size=total
    )
    return row, indices.index_select(0, pos).long(), values.index_select(0, pos), offsets


@dataclass
class HStack:
    """Sparse columns followed by dense ones, ``[sparse | dense]``, kept apart.

    An encoder input made of counts and a few dense columns (proteins, continuous covariates):
    a linear layer multiplies each part with its rows of the weight, so the counts are never
    densified.

    Examples
    --------
    >>> import torch
    >>> x = hstack(CSRBatch.from_dense(torch.tensor([[0.0, 2.0], [1.0, 0.0]])), torch.ones(2, 1))
    >>> x.shape, as_dense(x).tolist()
    ((2, 3), [[0.0, 2.0, 1.0], [1.0, 0.0, 1.0]])
    """

    sparse: CSRBatch
    dense: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        """``(n_rows, sparse columns + dense columns)``."""
        return (self.sparse.shape[0], self.sparse.shape[1] + self.dense.shape[-1])


def hstack(x: torch.Tensor | CSRBatch, dense: torch.Tensor) -> torch.Tensor | HStack:
    """Columns of ``x`` then those of ``dense``: an :class:`HStack` for a CSR ``x``."""
    if isinstance(x, CSRBatch):
        return HStack(x, dense)
    return torch.cat([x, dense], dim=-1)


def as_dense(x: torch.Tensor | CSRBatch | HStack) -> torch.Tensor:
    """``x`` as a dense tensor (a no-op for tensors)."""
    if isinstance(x, HStack):
        return torch.cat([x.sparse.dense(), x.dense], dim=-1)
    return x.dense() if isinstance(x, CSRBatch) else x


def row_sums(x: torch.Tensor | CSRBatch) -> torch.Tensor:
    """Sum of each row, shape ``(n_rows, 1)``.

    For a CSR batch, the compiled row sums on the CPU (:func:`cellvae._kernels.csr_row_sums`;
    in SCVI training at 128 rows x 2,000 genes at 8%: 66 -> 19 µs, median per step, session 22);
    elsewhere the product with a column of ones (:func:`sparse_linear`, an ``embedding_bag``):
    faster than ``index_add_`` (35 vs 70 µs for 128 rows on CPU, 153 vs 534 µs for 1,024 rows).

    Examples
    --------
    >>> import torch
    >>> x = CSRBatch.from_dense(torch.tensor([[0.0, 2.0, 5.0], [0.0, 0.0, 0.0], [1.0, 0.0, 3.0]]))
    >>> row_sums(x).squeeze(-1).tolist()
    [7.0, 0.0, 4.0]
    """
    if isinstance(x, CSRBatch):
        if _kernels.takes(x.val) and not x.val.requires_grad:
            return _kernels.csr_row_sums(x.offsets, x.val).unsqueeze(-1)
        return sparse_linear(x, x.val.new_ones(x.shape[1], 1))
    return x.sum(-1, keepdim=True)


def log1p(x: torch.Tensor | CSRBatch) -> torch.Tensor | CSRBatch:
    """``log(1 + x)``; a CSR batch stays sparse (``log1p(0) = 0``)."""
    if isinstance(x, CSRBatch):
        return x.with_values(torch.log1p(x.val))
    return torch.log1p(x)


def _column_order(col: torch.Tensor, n_cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A stable permutation sorting ``col``, and where each column starts in that order.

    On the CPU numpy's radix sort (for < 32,768 columns) and ``bincount``; elsewhere torch's sort
    and a binary search of the sorted columns, because CUDA's ``bincount`` reads its largest
    value back to the host (a synchronisation per training step).
    """
    if col.device.type == "cpu":
        small = np.int16 if n_cols < 2**15 else np.int32
        order = torch.from_numpy(np.argsort(col.numpy().astype(small), kind="stable"))
        counts = torch.bincount(col, minlength=n_cols)
        return order, torch.cumsum(counts, 0) - counts
    order = torch.argsort(col, stable=True)
    return order, _starts_in_sorted(col.index_select(0, order), n_cols)


def _starts_in_sorted(sorted_col: torch.Tensor, n_cols: int) -> torch.Tensor:
    """First position of each column ``0 … n_cols − 1`` in ``sorted_col`` (no host sync)."""
    first = torch.arange(n_cols, device=sorted_col.device, dtype=sorted_col.dtype)
    return torch.searchsorted(sorted_col, first)


def _weight_grad(grad_out, row, col, val, n_cols, dense=None):
    """``[X | D]ᵀ dY``: each column of ``X`` is a bag of rows of ``dY`` weighted by the values.

    With dense columns ``D`` the kernel writes ``Xᵀ dY`` into the first rows of the result and
    ``Dᵀ dY`` goes below it (no concatenation: 2 MB copied at 2,049 x 256 in TOTALVI).
    """
    if _kernels.takes(grad_out, val, dense):
        if dense is None:
            return _kernels.csr_t_dense(row, col, val, grad_out, n_cols)
        grad = grad_out.new_empty(n_cols + dense.shape[1], grad_out.shape[1])
        _kernels.csr_t_dense(row, col, val, grad_out, n_cols, out=grad[:n_cols])
        torch.mm(dense.t(), grad_out, out=grad[n_cols:])
        return grad
    order, offsets = _column_order(col, n_cols)
    grad = F.embedding_bag(
        row.index_select(0, order),
        grad_out,
        offsets,
        mode="sum",
        per_sample_weights=val.index_select(0, order),
    )
    return grad if dense is None else torch.cat([grad, dense.t() @ grad_out])


def sparse_linear(
    x: CSRBatch | HStack, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x @ weight + bias`` for a CSR batch ``x`` (or ``[CSR | dense]``) and a weight.

    Parameters
    ----------
    x
        The batch, ``(n_rows, n_cols)``: a :class:`CSRBatch`, or an :class:`HStack` whose sparse
        columns meet the first rows of ``weight`` and its dense columns the last ones.
    weight
        ``(n_cols, n_out)``; receives a gradient (the counts do not).
    bias
        ``(n_out,)`` or None.

    Returns
    -------
    torch.Tensor
        ``(n_rows, n_out)``.

    Examples
    --------
    >>> import torch
    >>> dense = torch.tensor([[0.0, 2.0, 0.0], [1.0, 0.0, 3.0]])
    >>> w = torch.randn(3, 4)
    >>> bool(torch.allclose(sparse_linear(CSRBatch.from_dense(dense), w), dense @ w))
    True
    >>> x = hstack(CSRBatch.from_dense(dense), torch.ones(2, 1))
    >>> w = torch.randn(4, 4)
    >>> bool(torch.allclose(sparse_linear(x, w), as_dense(x) @ w))
    True
    """
    sparse, dense = (x.sparse, x.dense) if isinstance(x, HStack) else (x, None)
    val = sparse.val.to(weight.dtype)
    return _SparseLinearFn.apply(
        weight, bias, sparse.row, sparse.col, val, sparse.offsets, sparse.shape, dense
    )


class _SparseLinearFn(torch.autograd.Function):
    """``[X | D] @ W + b`` for a CSR batch ``X`` and optional dense columns ``D``.

    The gradient flows to ``W`` and ``b`` (counts are data) and to ``D`` if it needs one. With
    ``D`` the weight gradient is written as one tensor: slicing ``W`` outside the function would
    make autograd build a zero-filled full-size gradient for each slice and add them (0.7 ms of a
    TOTALVI step at 2,049 x 256). On the CPU the compiled :func:`cellvae._kernels.csr_dense`
    computes ``X W + b`` row by row, each row starting from the bias (in SCVI training at
    128 x 2,000 genes at 8%, 128 outputs: 115 -> 81 µs for ``embedding_bag`` and the bias's add,
    median per step, session 22); elsewhere ``embedding_bag``.
    """

    @staticmethod
    def forward(ctx, weight, bias, row, col, val, offsets, shape, dense):
        n_rows, n_cols = shape
        # the weight is needed only for a gradient of the dense columns
        ctx.save_for_backward(row, col, val, weight if ctx.needs_input_grad[7] else None, dense)
        ctx.n_cols = n_cols
        if n_rows > 0 and _kernels.takes(weight, bias, val):
            out = _kernels.csr_dense(offsets, col, val, weight[:n_cols], bias)
        else:
            if n_rows == 0 or len(col) == 0:
                out = weight.new_zeros(n_rows, weight.shape[1])
            else:
                out = F.embedding_bag(
                    col, weight[:n_cols], offsets, mode="sum", per_sample_weights=val
                )
            if bias is not None:
                out = out.add_(bias)
        if dense is not None:
            out = out.addmm_(dense, weight[n_cols:])
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        row, col, val, weight, dense = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_w = _weight_grad(grad_out, row, col, val, ctx.n_cols, dense)
        grad_b = grad_out.sum(0) if ctx.needs_input_grad[1] else None
        grad_dense = None
        if dense is not None and weight is not None:
            grad_dense = grad_out @ weight[ctx.n_cols :].t()
        return grad_w, grad_b, None, None, None, None, None, grad_dense
