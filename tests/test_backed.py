"""Counts of a backed AnnData stay on disk: windows of cells are read, minibatches are exact."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch

import cellvae
from cellvae import _backed, pp
from cellvae._backed import BackedCSR
from cellvae._data import BatchSampler, TensorData, WindowSampler
from cellvae._sparse import as_dense


def write_backed(tmp_path, n_obs=700, n_vars=30, seed=0, **kw):
    """A synthetic CSR AnnData written to h5ad: (backed AnnData, in-memory AnnData).

    ``obs["row"]`` holds each cell's position, registered as a continuous covariate, so every
    minibatch says which cells it claims to hold.
    """
    adata = cellvae.datasets.synthetic(n_obs, n_vars, n_batches=3, random_state=seed, **kw)
    adata.X = sp.csr_matrix(adata.X)
    adata.obs["row"] = np.arange(n_obs, dtype=np.float64)
    path = tmp_path / f"backed_{n_obs}_{seed}.h5ad"
    adata.write_h5ad(path)
    return ad.read_h5ad(path, backed="r"), adata


def setup(adata, **kw):
    pp.setup_anndata(adata, batch_key="batch", continuous_covariate_keys=["row"], **kw)
    return TensorData.from_adata(adata)


def claimed(batch) -> np.ndarray:
    """The cell positions a minibatch claims (its ``row`` covariate)."""
    return batch["cont_covs"][:, 0].numpy().astype(np.int64)


def check_rows(batch, x: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """The minibatch holds exactly the counts and codes of the cells it claims; return them."""
    rows = claimed(batch)
    np.testing.assert_array_equal(as_dense(batch["x"]).numpy(), x[rows].astype(np.float32))
    np.testing.assert_array_equal(batch["batch"].numpy(), codes[rows])
    return rows


# ---------------------------------------------------------------- reading rows from disk
@pytest.mark.parametrize(("max_gap", "max_span"), [(0, 1 << 22), (1 << 16, 1 << 22), (3, 40)])
def test_read_rows_equals_scipy(monkeypatch, max_gap, max_span):
    rng = np.random.default_rng(0)
    m = sp.random(300, 20, density=0.2, format="csr", random_state=1, dtype=np.float32)
    keep = np.ones(300, dtype=np.float32)
    keep[rng.choice(300, 40, replace=False)] = 0
    m = sp.csr_matrix(sp.diags(keep) @ m)  # empty rows among the others
    m.eliminate_zeros()
    assert (np.diff(m.indptr) == 0).sum() >= 40
    monkeypatch.setattr(_backed, "MAX_GAP", max_gap)
    monkeypatch.setattr(_backed, "MAX_SPAN", max_span)
    source = BackedCSR(m.indptr, m.indices, m.data, m.shape)  # numpy arrays slice like h5py
    for rows in (
        np.arange(300),
        np.sort(rng.choice(300, 50, replace=False)),
        np.array([0, 1, 2, 150, 299]),
        np.array([7]),
        np.zeros(0, dtype=np.int64),
    ):
        indptr, indices, data = source.read(rows)
        got = sp.csr_matrix((data, indices, indptr), shape=(len(rows), 20))
        np.testing.assert_array_equal(got.toarray(), m[rows].toarray())
        assert indptr.dtype == np.int64 and indices.dtype == m.indices.dtype


def test_only_backed_csr_stays_on_disk(tmp_path):
    backed, adata = write_backed(tmp_path, n_obs=50)
    assert BackedCSR.from_matrix(backed.X) is not None
    assert BackedCSR.from_matrix(adata.X) is None
    assert BackedCSR.from_matrix(adata.X.toarray()) is None


def test_non_canonical_file_is_fixed_per_window(tmp_path):
    backed, adata = write_backed(tmp_path, n_obs=60)
    x = adata.X.toarray()
    # store explicit zeros and unsorted columns in the file
    m = sp.csr_matrix(x)
    m.data[::5] = 0
    x = m.toarray()
    m.indices[: m.indptr[1]] = m.indices[: m.indptr[1]][::-1].copy()
    m.data[: m.indptr[1]] = m.data[: m.indptr[1]][::-1].copy()
    m.has_sorted_indices = False
    adata.X = m
    path = tmp_path / "raw.h5ad"
    adata.write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    assert not np.all(backed.X.group["data"][:])  # the zeros really are in the file
    td = setup(backed)
    codes = td.batch.numpy()
    for batch in td.batches(torch.arange(60), 8, window_size=16):
        check_rows(batch, x, codes)
        assert torch.all(batch["x"].val != 0)


# ---------------------------------------------------------------- minibatches
@pytest.mark.parametrize("shuffle", [True, False])
def test_backed_minibatches_equal_adata_rows(tmp_path, shuffle):
    backed, adata = write_backed(tmp_path)
    td = setup(backed)
    assert td.backed is not None and td.indices is None and td.values is None
    x, codes = adata.X.toarray(), td.batch.numpy()
    idx = torch.from_numpy(np.sort(np.random.default_rng(3).choice(700, 500, replace=False)))
    gen = torch.Generator().manual_seed(0)
    seen = []
    for batch in td.batches(idx, 32, shuffle=shuffle, generator=gen, block_size=8, window_size=96):
        seen.append(check_rows(batch, x, codes))
    order = np.concatenate(seen)
    if shuffle:
        assert sorted(order.tolist()) == idx.tolist() and not np.array_equal(order, idx.numpy())
    else:
        np.testing.assert_array_equal(order, idx.numpy())


def test_backed_counts_of_any_indices(tmp_path):
    backed, adata = write_backed(tmp_path, n_obs=200)
    td = setup(backed)
    x = adata.X.toarray()
    for idx in ([5, 3, 3, 199, 0, 5], [42], list(range(199, -1, -1)), []):
        got = td[np.asarray(idx, dtype=np.int64)]
        np.testing.assert_array_equal(as_dense(got["x"]).numpy(), x[idx].astype(np.float32))
        np.testing.assert_array_equal(claimed(got), idx)


def test_backed_ordered_batches_of_any_indices(tmp_path):
    backed, adata = write_backed(tmp_path, n_obs=300)
    td = setup(backed)
    x, codes = adata.X.toarray(), td.batch.numpy()
    idx = torch.tensor([250, 3, 3, 120, 7, 299, 0, 250, 64] * 9)
    batches = list(td.batches(idx, 10, window_size=20))
    assert [len(b["batch"]) for b in batches] == [len(c) for c in BatchSampler(idx, 10)]
    order = np.concatenate([check_rows(b, x, codes) for b in batches])
    np.testing.assert_array_equal(order, idx.numpy())


@pytest.mark.parametrize("n", [1, 2, 3, 64, 65, 129, 257, 300, 1000])
@pytest.mark.parametrize("batch_size", [2, 16, 64])
def test_window_sampler_epoch_covers_each_cell_once(n, batch_size):
    gen = torch.Generator().manual_seed(n)
    indices = torch.randperm(2000, generator=gen)[:n].sort().values
    sampler = WindowSampler(
        indices, batch_size, shuffle=True, generator=gen, block_size=8, window_size=64
    )
    windows = list(sampler.windows())
    batches = [b for w in windows for b in w]
    assert len(batches) == len(sampler) == len(BatchSampler(indices, batch_size, shuffle=True))
    assert n < 2 or all(len(b) >= 2 for b in batches), [len(b) for b in batches]
    assert all(len(b) <= batch_size + 1 for b in batches)
    assert sorted(torch.cat(batches).tolist()) == indices.tolist()  # each cell exactly once
    # a window is read at once: at most window_size cells (+1 merged from a last window of one)
    assert max(sum(len(b) for b in w) for w in windows) <= sampler.window_size + 1
    again = torch.cat(list(sampler))  # a new order each epoch
    assert n < 3 or not torch.equal(again, torch.cat(batches))


def test_window_sampler_keeps_blocks_together():
    indices = torch.arange(0, 4096, 2)  # every other cell
    sampler = WindowSampler(
        indices, 32, shuffle=True, generator=_gen(0), block_size=64, window_size=256
    )
    windows = list(sampler.windows())
    assert len(windows) == 8
    for window in windows:
        cells = torch.cat(window).sort().values
        # 4 whole blocks of 64 consecutive training cells: at most 3 wider gaps
        assert len(cells) == 256 and int((cells.diff() > 2).sum()) <= 3


def test_in_memory_order_is_unchanged(tmp_path):
    """In memory, minibatches follow ``indices[randperm]`` cut in order, as before."""
    _, adata = write_backed(tmp_path, n_obs=301)
    td = setup(adata)
    assert td.backed is None
    idx = torch.arange(1, 290)  # 289 cells: the trailing batch of one is merged
    got = [claimed(b) for b in td.batches(idx, 32, shuffle=True, generator=_gen(7))]
    perm = idx[torch.randperm(len(idx), generator=_gen(7))].numpy()
    sizes = [32] * 8 + [33]
    np.testing.assert_array_equal(np.concatenate(got), perm)
    assert [len(b) for b in got] == sizes
    in_order = [claimed(b) for b in td.batches(idx, 100)]
    np.testing.assert_array_equal(np.concatenate(in_order), idx.numpy())


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_to_device_keeps_counts_on_disk(tmp_path):
    backed, adata = write_backed(tmp_path, n_obs=80)
    td = setup(backed)
    moved = td.to("cpu")
    assert moved.backed is td.backed
    x, codes = adata.X.toarray(), td.batch.numpy()
    for batch in moved.batches(torch.arange(80), 16, window_size=32):
        check_rows(batch, x, codes)


# ---------------------------------------------------------------- models
def test_scvi_trains_on_backed_and_reads_a_window_at_a_time(tmp_path, monkeypatch):
    backed, adata = write_backed(tmp_path, n_obs=1000, n_vars=40)
    cellvae.SCVI.setup_anndata(backed, batch_key="batch")
    reads = []
    read = BackedCSR.read
    monkeypatch.setattr(
        BackedCSR, "read", lambda self, rows: reads.append(len(rows)) or read(self, rows)
    )
    batches = TensorData.batches
    monkeypatch.setattr(
        TensorData,
        "batches",
        lambda self, *a, **k: batches(self, *a, **k, block_size=16, window_size=200),
    )
    model = cellvae.SCVI(backed).train(2, batch_size=50, progress_bar=False, device="cpu")
    td, _ = model._data()
    assert td.backed is not None and td.indices is None and td.values is None
    assert td.nbytes() < adata.X.data.nbytes + adata.X.indices.nbytes
    assert len(model.history) == 2 and np.isfinite(model.history.to_numpy(float)).all()
    assert max(reads) <= 200  # never the whole matrix at once
    # each training cell read once per epoch, each validation cell once per validation pass
    assert sum(reads) == 2 * 1000
    # getters read cells in order: the same values as the in-memory AnnData's
    latent = model.get_latent_representation()
    assert np.isfinite(latent).all()
    np.testing.assert_array_equal(latent, model.get_latent_representation(adata))
    idx = [999, 5, 5, 400]
    np.testing.assert_array_equal(
        model.get_latent_representation(indices=idx),
        model.get_latent_representation(adata, indices=idx),
    )
    torch.manual_seed(0)
    elbo_backed = model.get_elbo()
    torch.manual_seed(0)
    assert np.isfinite(elbo_backed) and elbo_backed == model.get_elbo(adata)


def test_backed_training_matches_in_memory_steps(tmp_path):
    """Same number of steps, so the KL warm-up ends where it does in memory."""
    backed, adata = write_backed(tmp_path, n_obs=301, n_vars=20)
    runs = {}
    for name, data in (("backed", backed), ("memory", adata)):
        cellvae.SCVI.setup_anndata(data, batch_key="batch")
        model = cellvae.SCVI(data).train(3, batch_size=32, progress_bar=False, device="cpu")
        runs[name] = model.history
    np.testing.assert_allclose(runs["backed"]["kl_weight"], runs["memory"]["kl_weight"])


def test_totalvi_trains_on_backed(tmp_path):
    backed, adata = write_backed(tmp_path, n_obs=200, n_vars=30, n_proteins=5)
    cellvae.TOTALVI.setup_anndata(
        backed, batch_key="batch", protein_expression_obsm_key="protein_expression"
    )
    model = cellvae.TOTALVI(backed).train(2, progress_bar=False, device="cpu")
    latent = model.get_latent_representation()
    assert latent.shape == (200, model.module.n_latent) and np.isfinite(latent).all()
    np.testing.assert_array_equal(latent, model.get_latent_representation(adata))


def test_tl_copy_of_backed_data_says_what_to_do_instead(tmp_path):
    backed, _ = write_backed(tmp_path, n_obs=60)
    with pytest.raises(ValueError, match="copy=True of a backed AnnData"):
        cellvae.tl.scvi(backed, batch_key="batch", copy=True, max_epochs=1, progress_bar=False)
    assert "X_scVI" not in backed.obsm and "cellvae" not in backed.uns  # nothing written


def test_getters_follow_a_replaced_layer_of_a_backed_anndata(tmp_path):
    # a backed AnnData keeps X in its file, but its layers in memory: replacing the registered
    # layer must make the getters read it again, as with an in-memory AnnData
    adata = cellvae.datasets.synthetic(120, 20, n_batches=2)
    adata.layers["counts"] = sp.csr_matrix(adata.X)
    adata.write_h5ad(tmp_path / "layer.h5ad")
    backed = ad.read_h5ad(tmp_path / "layer.h5ad", backed="r")
    cellvae.SCVI.setup_anndata(backed, layer="counts", batch_key="batch")
    model = cellvae.SCVI(backed, use_observed_lib_size=True).train(1, progress_bar=False)
    before = model.get_latent_library_size().ravel()
    np.testing.assert_allclose(before, np.asarray(adata.X.sum(1)).ravel(), rtol=1e-5)
    backed.layers["counts"] = backed.layers["counts"] * 3
    np.testing.assert_allclose(model.get_latent_library_size().ravel(), 3 * before, rtol=1e-5)
    with pytest.raises(ValueError, match="save_anndata=True with a backed AnnData"):
        model.save(tmp_path / "m", save_anndata=True)  # its data are already on disk


@pytest.mark.parametrize("max_span", [1 << 22, 7, 1])
def test_row_totals_equal_scipy_with_stored_zeros(monkeypatch, max_span):
    rng = np.random.default_rng(max_span)
    m = sp.random(200, 15, density=0.3, format="csr", random_state=2, dtype=np.float32)
    m.data[rng.random(m.nnz) < 0.4] = 0  # stored zeros, some rows only those
    m.data[m.indptr[5] : m.indptr[6]] = 0
    monkeypatch.setattr(_backed, "MAX_SPAN", max_span)
    totals = BackedCSR(m.indptr, m.indices, m.data, m.shape).row_totals()
    reference = np.asarray(m.astype(np.float64).sum(1)).ravel()
    np.testing.assert_allclose(totals, reference, rtol=1e-12)
    assert totals[5] == 0 and totals.dtype == np.float64


def test_training_refuses_a_backed_cell_with_only_stored_zeros(tmp_path):
    adata = cellvae.datasets.synthetic(120, 20, random_state=3)
    cellvae.SCVI.setup_anndata(adata, batch_key="batch")
    model = cellvae.SCVI(adata).train(max_epochs=1, progress_bar=False)
    x = sp.csr_matrix(adata.X)
    x.data[x.indptr[7] : x.indptr[8]] = 0  # cell 7 keeps its entries, all zero
    assert x.indptr[8] > x.indptr[7]
    query = ad.AnnData(x, obs=adata.obs.copy(), var=adata.var.copy())
    query.write_h5ad(tmp_path / "query.h5ad")
    query = ad.read_h5ad(tmp_path / "query.h5ad", backed="r")
    with pytest.warns(UserWarning, match="1 cells have zero total counts"):
        pp.transfer_setup(query, model)  # new data for a trained model: a warning
    with pytest.raises(ValueError, match="1 cells have zero total counts"):
        cellvae.SCVI(query).train(max_epochs=1, progress_bar=False)  # training: an error


def test_bad_options_are_refused_before_the_file_is_read(tmp_path, monkeypatch):
    backed, _ = write_backed(tmp_path, 100, 10)
    cellvae.SCVI.setup_anndata(backed, batch_key="batch")
    reads = []
    real = BackedCSR.row_totals
    monkeypatch.setattr(BackedCSR, "row_totals", lambda self: reads.append(1) or real(self))
    model = cellvae.SCVI(backed)
    with pytest.raises(ValueError, match="eval_batch_size must be at least 1"):
        model.train(max_epochs=1, eval_batch_size=0, progress_bar=False)
    assert not reads  # the empty-cell check reads every stored value: after the options
    model.train(max_epochs=1, progress_bar=False)
    assert reads == [1]


def test_getters_after_the_backed_file_is_closed_or_reopened(tmp_path):
    adata = cellvae.datasets.synthetic(120, 20, n_batches=2)
    adata.write_h5ad(tmp_path / "b.h5ad")
    backed = ad.read_h5ad(tmp_path / "b.h5ad", backed="r")
    cellvae.SCVI.setup_anndata(backed, batch_key="batch")
    model = cellvae.SCVI(backed).train(1, progress_bar=False)
    expected = model.get_latent_representation()
    backed.file.close()  # the cached datasets belong to the closed file
    np.testing.assert_array_equal(model.get_latent_representation(), expected)
    cached = model._data_cache[1]
    np.testing.assert_array_equal(model.get_latent_representation(), expected)
    assert model._data_cache[1] is cached  # rebuilt once, not again for the reopened file
    backed.file.close()
    backed.file.open()  # anndata's way to reopen: a new h5py file
    np.testing.assert_array_equal(model.get_latent_representation(), expected)
    model.train(1, progress_bar=False)
    backed.file.close()
