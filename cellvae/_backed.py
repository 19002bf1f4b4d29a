"""Rows of a CSR count matrix that stays on disk, read on demand.

A backed AnnData (``anndata.read_h5ad(path, backed="r")``) leaves its count matrix in the file.
:class:`BackedCSR` keeps only the row pointers in memory (8 bytes a cell) and reads the columns
and values of a set of rows with a few large reads: sorted rows are grouped into spans of the
file, and rows close to each other share one read (HDF5 reads whole chunks anyway, so skipping a
short gap saves nothing). Nothing here imports anndata: any matrix with ``format == "csr"`` and a
``group`` holding ``indptr``, ``indices`` and ``data`` arrays that slice like numpy (an anndata
backed sparse dataset, on h5py or zarr) is read this way.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

MAX_GAP = 1 << 16  # stored entries skipped inside one read rather than starting a new read
MAX_SPAN = 1 << 22  # stored entries one read covers at most (16 MiB of float32 values)


class BackedCSR:
    """A CSR matrix whose ``indices`` and ``data`` are read from disk, a set of rows at a time.

    Parameters
    ----------
    indptr
        Row pointers (read into memory once, as int64).
    indices, data
        On-disk arrays (h5py datasets or zarr arrays) of the column indices and the values.
    shape
        ``(n_rows, n_cols)``.
    """

    def __init__(self, indptr, indices, data, shape: tuple[int, int]):
        self.indptr = np.asarray(indptr[:], dtype=np.int64)
        self.indices = indices
        self.data = data
        self.shape = (int(shape[0]), int(shape[1]))
        if len(self.indptr) != self.shape[0] + 1:
            raise ValueError(
                f"The backed CSR matrix has {len(self.indptr) - 1} row pointers for "
                f"{self.shape[0]} rows: the file is damaged."
            )

    @classmethod
    def from_matrix(cls, matrix) -> BackedCSR | None:
        """The :class:`BackedCSR` of a backed CSR matrix, or None for any other matrix."""
        group = getattr(matrix, "group", None)
        if getattr(matrix, "format", None) != "csr" or group is None:
            return None
        return cls(group["indptr"], group["indices"], group["data"], tuple(matrix.shape))

    @property
    def nbytes(self) -> int:
        """Bytes held in memory (the row pointers)."""
        return self.indptr.nbytes

    def read(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Read rows ``rows`` (sorted, unique) into memory.

        Parameters
        ----------
        rows
            Row positions, sorted ascending, without repeats.

        Returns
        -------
        The CSR arrays ``(indptr, indices, data)`` of those rows, in that order: ``indptr``
        int64, ``indices`` and ``data`` in the file's dtypes, entries as stored in the file.
        """
        rows = np.asarray(rows, dtype=np.int64)
        starts, ends = self.indptr[rows], self.indptr[rows + 1]
        indptr = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(ends - starts, out=indptr[1:])
        indices = np.empty(indptr[-1], dtype=self.indices.dtype)
        data = np.empty(indptr[-1], dtype=self.data.dtype)
        for first, last in _spans(starts, ends):
            a, b = int(starts[first]), int(ends[last - 1])
            out = slice(indptr[first], indptr[last])
            if indptr[last] - indptr[first] == b - a:  # the rows are contiguous in the file
                indices[out], data[out] = self.indices[a:b], self.data[a:b]
            else:
                keep = _inside(starts[first:last] - a, ends[first:last] - a, b - a)
                indices[out], data[out] = self.indices[a:b][keep], self.data[a:b][keep]
        return indptr, indices, data

    def row_totals(self) -> np.ndarray:
        """The sum of each row's stored values (float64), reading the values once in spans.

        A row's entries may all be stored zeros, which the row pointers alone do not show.
        """
        totals = np.zeros(self.shape[0], dtype=np.float64)
        nnz = int(self.indptr[-1])
        for a in range(0, nnz, MAX_SPAN):
            b = min(a + MAX_SPAN, nnz)
            csum = np.zeros(b - a + 1, dtype=np.float64)
            np.cumsum(np.asarray(self.data[a:b], dtype=np.float64), out=csum[1:])
            # the rows with entries in [a, b), and where each starts and ends inside the span
            r0 = int(np.searchsorted(self.indptr, a, side="right")) - 1
            r1 = int(np.searchsorted(self.indptr, b, side="left"))
            edges = np.clip(self.indptr[r0 : r1 + 1] - a, 0, b - a)
            totals[r0:r1] += csum[edges[1:]] - csum[edges[:-1]]
        return totals


def _spans(starts: np.ndarray, ends: np.ndarray) -> Iterator[tuple[int, int]]:
    """Ranges ``[first, last)`` of sorted rows that one read covers.

    A new read starts after a gap of more than ``MAX_GAP`` entries, or where a row starts in
    another ``MAX_SPAN``-entry stretch of the file (so a read spans at most ``MAX_SPAN`` entries
    plus one row).
    """
    if not len(starts):
        return iter(())
    new = np.ones(len(starts), dtype=bool)
    new[1:] = (starts[1:] - ends[:-1] > MAX_GAP) | (
        starts[1:] // MAX_SPAN != starts[:-1] // MAX_SPAN
    )
    firsts = np.flatnonzero(new).tolist()
    return zip(firsts, [*firsts[1:], len(starts)])


def _inside(starts: np.ndarray, ends: np.ndarray, size: int) -> np.ndarray:
    """Mask of ``range(size)``: the positions inside the sorted, disjoint ``[starts, ends)``."""
    edges = np.zeros(size + 1, dtype=np.int8)
    full = ends > starts  # empty ranges mark nothing (and would collide with their neighbours)
    edges[starts[full]] = 1
    edges[ends[full]] -= 1  # a range that starts where the previous one ends nets to 0 there
    return edges.cumsum(dtype=np.int8)[:-1].astype(bool)
