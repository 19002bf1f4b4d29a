"""The tensor data path: minibatches equal the AnnData's own values for every storage."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import cellvae
from cellvae import pp
from cellvae._data import BatchSampler, TensorData, split_indices
from cellvae._registry import Registry
from cellvae._sparse import CSRBatch, as_dense, gather_rows

STORAGES = ["dense", "csr", "csc", "csr_array", "csr_int64", "backed_csr", "backed_dense"]


def make(n_obs=150, n_vars=30, seed=0):
    adata = cellvae.datasets.synthetic(n_obs, n_vars, n_batches=3, n_proteins=4, random_state=seed)
    rng = np.random.default_rng(seed)
    adata.obs["age"] = rng.normal(50, 10, n_obs)
    adata.obs["pct"] = rng.random(n_obs)
    adata.obs["donor"] = pd.Categorical(rng.choice(["d1", "d2"], n_obs))
    adata.obs["sf"] = rng.uniform(0.5, 2.0, n_obs)
    return adata


SETUP = dict(
    batch_key="batch",
    labels_key="cell_type",
    size_factor_key="sf",
    categorical_covariate_keys=["donor"],
    continuous_covariate_keys=["age", "pct"],
    protein_expression_obsm_key="protein_expression",
)


def store(adata, storage, tmp_path):
    """Return ``adata`` with its counts held as ``storage`` (writing/reading h5ad for backed)."""
    x = adata.X.toarray()
    if storage == "dense":
        adata.X = x
    elif storage == "csr":
        adata.X = sp.csr_matrix(x)
    elif storage == "csc":
        adata.X = sp.csc_matrix(x)
    elif storage == "csr_array":
        adata.X = sp.csr_array(x)
    elif storage == "csr_int64":
        m = sp.csr_matrix(x)
        m.indices, m.indptr = m.indices.astype(np.int64), m.indptr.astype(np.int64)
        assert m.indices.dtype == m.indptr.dtype == np.int64
        adata.X = m
    elif storage.startswith("backed"):
        adata.X = x if storage == "backed_dense" else sp.csr_matrix(x)
        path = tmp_path / f"{storage}.h5ad"
        adata.write_h5ad(path)
        adata = ad.read_h5ad(path, backed="r")
        assert adata.isbacked
    return adata


def expected(adata, reg: Registry, idx: np.ndarray, x_full: np.ndarray) -> dict[str, np.ndarray]:
    """What a minibatch must hold, computed straight from the AnnData with pandas/numpy."""
    obs = adata.obs.iloc[idx]

    def codes(key, cats):
        return np.array([cats.index(str(v)) for v in obs[key]], dtype=np.int64)

    return {
        "x": x_full[idx].astype(np.float32),
        "batch": codes("batch", list(reg.batch_categories)),
        "labels": codes("cell_type", list(reg.label_categories)),
        "cat_covs": codes("donor", list(reg.categorical_covariate_categories[0]))[:, None],
        "cont_covs": obs[["age", "pct"]].to_numpy(dtype=np.float32),
        "size_factor": obs["sf"].to_numpy(dtype=np.float32),
        "protein": adata.obsm["protein_expression"].to_numpy()[idx].astype(np.float32),
    }


DTYPES = {
    "x": torch.float32,
    "batch": torch.int64,
    "labels": torch.int64,
    "cat_covs": torch.int64,
    "cont_covs": torch.float32,
    "size_factor": torch.float32,
    "protein": torch.float32,
}


def check_csr(x: CSRBatch, dense: np.ndarray):
    """A CSR batch holds exactly the nonzero entries of ``dense``, row by row, in row order."""
    assert x.shape == dense.shape
    assert x.row.dtype == x.col.dtype == x.offsets.dtype == torch.int64
    assert x.val.dtype == torch.float32
    row, col = np.nonzero(dense)  # row-major, like CSR with sorted columns
    np.testing.assert_array_equal(x.row.numpy(), row)
    np.testing.assert_array_equal(x.col.numpy(), col)
    np.testing.assert_array_equal(x.val.numpy(), dense[row, col])
    starts = np.searchsorted(row, np.arange(dense.shape[0]))
    np.testing.assert_array_equal(x.offsets.numpy(), starts)
    np.testing.assert_array_equal(as_dense(x).numpy(), dense)


def check_batch(batch, exp):
    assert set(batch) == set(exp)
    for key, value in exp.items():
        got = batch[key]
        if key == "x" and isinstance(got, CSRBatch):
            check_csr(got, value)
            continue
        assert isinstance(got, torch.Tensor) and got.dtype == DTYPES[key], key
        np.testing.assert_array_equal(got.numpy(), value, err_msg=key)


@pytest.mark.parametrize("storage", STORAGES)
def test_minibatches_equal_anndata_values(storage, tmp_path):
    src = make()
    x_full = src.X.toarray()
    adata = store(src, storage, tmp_path)
    pp.setup_anndata(adata, **SETUP)
    reg = Registry.from_adata(adata)
    td = TensorData.from_adata(adata)
    assert td.is_sparse == (storage != "dense")
    assert (td.backed is not None) == (storage == "backed_csr")  # stays on disk
    if td.backed is not None:
        assert td.indices is None and td.backed.indptr[-1] == np.count_nonzero(x_full)
    elif td.is_sparse:
        # scipy's int32 row pointers are kept (no copy); int64 ones too
        wide = storage in ("csr_int64", "backed_dense")
        assert td.indptr.dtype == (torch.int64 if wide else torch.int32)
        assert td.indptr[-1] == np.count_nonzero(x_full)
        assert td.indices.dtype == torch.int32 and td.values.dtype == torch.float32
    gen = np.random.default_rng(42)
    sizes = [1, 2, 7, 64, 150]
    for size in sizes:
        idx = gen.choice(adata.n_obs, size=size, replace=False)
        check_batch(td[torch.from_numpy(idx)], expected(adata, reg, idx, x_full))
    # repeated indices, numpy / list indices, the full set in order
    idx = np.array([5, 5, 0, 149, 5])
    check_batch(td[torch.from_numpy(idx)], expected(adata, reg, idx, x_full))
    check_batch(td[idx], expected(adata, reg, idx, x_full))
    check_batch(td[idx.tolist()], expected(adata, reg, idx, x_full))
    everything = np.arange(adata.n_obs)
    check_batch(td[torch.from_numpy(everything)], expected(adata, reg, everything, x_full))
    # consecutive cells (read as one slice), and orders that only look like a range at the ends
    for idx in ([37], np.arange(37, 91), np.arange(100, 150), [3, 5, 4, 6], [6, 5, 4, 3]):
        idx = np.asarray(idx)
        check_batch(td[torch.from_numpy(idx)], expected(adata, reg, idx, x_full))


@pytest.mark.parametrize("storage", ["csr", "dense"])
def test_layer_counts_on_every_path(storage, tmp_path):
    adata = make()
    counts = adata.X.toarray()
    adata.layers["counts"] = counts if storage == "dense" else sp.csr_matrix(counts)
    adata.X = np.log1p(counts)
    pp.setup_anndata(adata, layer="counts")
    td = TensorData.from_adata(adata)
    idx = torch.tensor([3, 1, 4, 1, 5])
    np.testing.assert_array_equal(as_dense(td[idx]["x"]).numpy(), counts[idx.numpy()])


def test_empty_index_gives_empty_batch():
    adata = make()
    pp.setup_anndata(adata, **SETUP)
    batch = TensorData.from_adata(adata)[torch.zeros(0, dtype=torch.int64)]
    assert batch["x"].shape == (0, adata.n_vars)
    assert batch["x"].val.numel() == 0 and batch["protein"].shape == (0, 4)


@pytest.mark.parametrize("ptr_dtype", [np.int32, np.int64])
def test_torch_gather_path_matches_numpy_path(ptr_dtype):
    # the path used on GPU (pure torch ops), checked on CPU against the numpy path
    adata = make()
    pp.setup_anndata(adata)
    adata.X = sp.csr_matrix(adata.X)
    adata.X.indptr = adata.X.indptr.astype(ptr_dtype)
    td = TensorData.from_adata(adata)
    assert td.indptr.numpy().dtype == ptr_dtype
    for seed in range(5):
        idx = torch.randperm(adata.n_obs, generator=torch.Generator().manual_seed(seed))[:37]
        x = td.counts(idx)
        row, col, val, offsets = gather_rows(td.indptr, td.indices, td.values, idx)
        for a, b in zip((x.row, x.col, x.val, x.offsets), (row, col, val, offsets)):
            assert a.dtype == b.dtype == (torch.float32 if a is x.val else torch.int64)
            assert torch.equal(a, b)
        # the number of entries given by the caller (summed on the host) instead of read back
        given = gather_rows(td.indptr, td.indices, td.values, idx, n_entries=len(val))
        assert all(torch.equal(a, b) for a, b in zip(given, (row, col, val, offsets)))
        rng = td.counts(torch.arange(5, 40))  # consecutive cells: the slice path
        assert rng.offsets.dtype == rng.row.dtype == rng.col.dtype == torch.int64


@pytest.mark.parametrize("ptr_dtype", [np.int32, np.int64])
def test_device_minibatches_count_entries_on_the_host(ptr_dtype, monkeypatch):
    # off the CPU, batches() gathers each minibatch with its number of entries summed on the
    # host (no read-back from the device); checked on CPU against plain indexing
    adata = make()
    pp.setup_anndata(adata, **SETUP)
    adata.X = sp.csr_matrix(adata.X)
    adata.X.indptr = adata.X.indptr.astype(ptr_dtype)
    td = TensorData.from_adata(adata)
    moved = td.to("cpu")
    assert moved._host_indptr is td.indptr  # .to() keeps the host row pointers, uncopied
    reads = []
    minibatch = TensorData._minibatch

    def gather(self, idx, n_entries=None):
        reads.append(n_entries)
        return minibatch(self, idx, n_entries)

    monkeypatch.setattr(TensorData, "_minibatch", gather)
    gen = torch.Generator().manual_seed(3)
    chunks = list(BatchSampler(torch.arange(adata.n_obs), 32, shuffle=True, generator=gen))
    got = list(moved._device_batches(chunks))
    counted = list(reads)
    assert len(got) == len(chunks) == len(counted) and None not in counted
    for idx, batch, n in zip(chunks, got, counted, strict=True):
        want = td[idx]
        assert n == int(want["x"].val.numel())  # the host sum is the stored entries' count
        for key, value in want.items():
            assert torch.equal(as_dense(batch[key]), as_dense(value))
    assert list(moved._device_batches([])) == []


def test_csr_shares_the_anndata_arrays():
    # a canonical float32 / int32 CSR is used in place: no copy of the count matrix
    adata = make()
    pp.setup_anndata(adata)
    adata.X = sp.csr_matrix(adata.X, dtype=np.float32)
    adata.X.indices = adata.X.indices.astype(np.int32)
    td = TensorData.from_adata(adata)
    assert np.shares_memory(td.values.numpy(), adata.X.data)
    assert np.shares_memory(td.indices.numpy(), adata.X.indices)
    assert np.shares_memory(td.indptr.numpy(), adata.X.indptr)
    before = adata.X.copy()
    _ = td[torch.arange(adata.n_obs)]
    assert (adata.X != before).nnz == 0


def test_unregistered_codes_take_no_memory_per_cell():
    adata = make()
    pp.setup_anndata(adata)  # no batch, no labels: every cell has code 0
    td = TensorData.from_adata(adata)
    assert td.batch.stride() == (0,) and td.labels.stride() == (0,)
    batch = td[torch.tensor([5, 1, 99])]
    for key in ("batch", "labels"):
        assert batch[key].dtype == torch.int64 and batch[key].tolist() == [0, 0, 0]
    x = adata.X
    assert x.indptr.dtype == np.int32  # kept as is: no int64 copy of the row pointers
    assert td.nbytes() == x.data.nbytes + x.indices.nbytes + (x.shape[0] + 1) * 4 + 2 * 4


def test_to_device_keeps_values():
    adata = make()
    pp.setup_anndata(adata, **SETUP)
    td = TensorData.from_adata(adata)
    moved = td.to("cpu")
    idx = torch.tensor([9, 2, 77])
    for key, value in td[idx].items():
        assert torch.equal(as_dense(moved[idx][key]), as_dense(value))
    assert td.nbytes() > 0 and td.device.type == "cpu"


def test_non_canonical_csr_input_is_not_modified():
    # duplicate entries are summed (as scipy does) and explicit zeros are not reported as nonzero,
    # without touching the user's matrix
    data = np.array([1.0, 2.0, 0.0, 3.0, 4.0], dtype=np.float32)
    indices = np.array([2, 2, 0, 1, 0], dtype=np.int32)
    indptr = np.array([0, 3, 5], dtype=np.int32)
    m = sp.csr_matrix((data, indices, indptr), shape=(2, 3))
    adata = ad.AnnData(X=m, var=pd.DataFrame(index=["a", "b", "c"]))
    adata.X.has_canonical_format = False  # scipy would otherwise trust a cached flag
    pp.setup_anndata(adata)
    td = TensorData.from_adata(adata)
    b = td[torch.tensor([0, 1])]
    check_csr(b["x"], np.array([[0.0, 0.0, 3.0], [4.0, 3.0, 0.0]], dtype=np.float32))
    np.testing.assert_array_equal(adata.X.data, data)  # the user's arrays are untouched
    np.testing.assert_array_equal(adata.X.indices, indices)


def test_csc_conversion_is_logged(caplog):
    adata = make()
    adata.X = sp.csc_matrix(adata.X)
    pp.setup_anndata(adata)
    with caplog.at_level("INFO", logger="cellvae._data"):
        TensorData.from_adata(adata)
    assert "Converting the CSC count matrix to CSR once" in caplog.text


def test_backed_csc_and_layer(tmp_path):
    adata = make()
    x = adata.X.toarray()
    adata.X = sp.csc_matrix(x)
    adata.layers["counts"] = sp.csr_matrix(x)
    path = tmp_path / "csc.h5ad"
    adata.write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    for layer in (None, "counts"):
        pp.setup_anndata(backed, layer=layer, batch_key="batch")
        idx = np.array([100, 0, 42])
        check_csr(TensorData.from_adata(backed)[idx]["x"], x[idx].astype(np.float32))


def test_genes_must_match_registry():
    adata = make()
    pp.setup_anndata(adata)
    reg = Registry.from_adata(adata)
    other = adata[:, ::-1].copy()
    with pytest.raises(ValueError, match="transfer_setup"):
        TensorData.from_adata(other, reg)


def test_kang_ifnb_minibatches():
    adata = cellvae.datasets.kang_ifnb()
    pp.setup_anndata(adata, batch_key="batch", labels_key="cell_type")
    reg = Registry.from_adata(adata)
    assert reg.batch_categories == ("ctrl", "stim") and reg.n_vars == adata.n_vars
    td = TensorData.from_adata(adata)
    x = adata.X
    gen = np.random.default_rng(0)
    for _ in range(3):
        idx = gen.choice(adata.n_obs, size=128, replace=False)
        b = td[torch.from_numpy(idx)]
        check_csr(b["x"], x[idx].toarray())
        np.testing.assert_array_equal(
            np.asarray(reg.batch_categories)[b["batch"].numpy()],
            adata.obs["batch"].astype(str).to_numpy()[idx],
        )
        np.testing.assert_array_equal(
            np.asarray(reg.label_categories)[b["labels"].numpy()],
            adata.obs["cell_type"].astype(str).to_numpy()[idx],
        )


# ---------------------------------------------------------------- split and sampler
@pytest.mark.parametrize(("n_obs", "validation_size"), [(10, 0.1), (1000, 0.1), (333, 0.25)])
def test_split_seeded_disjoint_covering(n_obs, validation_size):
    train, val = split_indices(n_obs, validation_size, seed=3)
    assert train.dtype == val.dtype == torch.int32  # half the memory of int64 per cell
    assert len(val) == round(n_obs * validation_size)
    assert set(train.tolist()).isdisjoint(val.tolist())
    assert sorted(train.tolist() + val.tolist()) == list(range(n_obs))
    again = split_indices(n_obs, validation_size, seed=3)
    assert torch.equal(train, again[0]) and torch.equal(val, again[1])
    other = split_indices(n_obs, validation_size, seed=4)
    assert not torch.equal(val, other[1])


def test_split_without_validation_and_bad_sizes():
    train, val = split_indices(50, 0.0, seed=0)
    assert len(val) == 0 and torch.equal(train, torch.arange(50))
    with pytest.raises(ValueError, match=r"validation_size must be in \[0, 1\)"):
        split_indices(50, 1.0, seed=0)
    with pytest.raises(ValueError, match="Too few cells"):
        split_indices(2, 0.5, seed=0)


def test_sampler_shuffled_never_yields_one_and_covers_everything():
    gen = torch.Generator().manual_seed(0)
    for n in [2, 3, 5, 127, 128, 129, 130, 257, 300]:
        for batch_size in (2, 4, 128):
            indices = torch.randperm(1000, generator=gen)[:n]
            sampler = BatchSampler(indices, batch_size, shuffle=True, generator=gen)
            batches = list(sampler)
            assert len(batches) == len(sampler)
            assert all(len(b) >= 2 for b in batches), (n, batch_size, [len(b) for b in batches])
            assert all(len(b) <= batch_size + 1 for b in batches)
            flat = torch.cat(batches).tolist()
            assert sorted(flat) == sorted(indices.tolist())  # each index exactly once


def test_sampler_is_seeded_and_reshuffles_each_epoch():
    idx = torch.arange(100)
    a = list(BatchSampler(idx, 16, shuffle=True, generator=torch.Generator().manual_seed(1)))
    b = list(BatchSampler(idx, 16, shuffle=True, generator=torch.Generator().manual_seed(1)))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    sampler = BatchSampler(idx, 16, shuffle=True, generator=torch.Generator().manual_seed(1))
    first, second = torch.cat(list(sampler)), torch.cat(list(sampler))
    assert not torch.equal(first, second)


def test_sampler_in_order_without_shuffle():
    idx = torch.arange(10, 139)  # 129 cells: a last batch of one is fine for inference
    batches = list(BatchSampler(idx, 64))
    assert [len(b) for b in batches] == [64, 64, 1] == [len(b) for b in batches[: len(batches)]]
    assert torch.equal(torch.cat(batches), idx)
    with pytest.raises(ValueError, match="batch_size must be positive"):
        BatchSampler(idx, 0)


def test_int32_randperm_draws_the_int64_permutation():
    # the split and the shuffles draw int32 permutations to halve their memory; they must be
    # the same permutations as the int64 default, so results do not depend on the dtype
    for n in (1, 10, 1000, 90_001):
        for seed in range(3):
            a = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
            b = torch.randperm(n, generator=torch.Generator().manual_seed(seed), dtype=torch.int32)
            assert b.dtype == torch.int32 and torch.equal(a, b.long())


@pytest.mark.parametrize("ptr_dtype", [np.int32, np.int64])
def test_compiled_gather_matches_numpy(ptr_dtype, monkeypatch):
    # on the CPU, minibatches are gathered by the compiled kernel where it was built: the same
    # entries as numpy's gathers for int32 / int64 pointers and columns, one-entry rows, repeated
    # and out-of-order cells; out-of-range cells raise on both paths
    from cellvae import _kernels

    if _kernels._lib is None:
        pytest.skip("the compiled kernels were not built here (test_kernels.py)")
    monkeypatch.setattr(_kernels, "_MIN_PARALLEL", 0)  # both threads, even on small batches
    rng = np.random.default_rng(0)
    counts = rng.poisson(0.3, (60, 50)).astype(np.float32)
    counts[[4, 17]] = 0
    counts[[4, 17], [3, 49]] = 2  # one entry each
    x = sp.csr_matrix(counts)
    x.indptr = x.indptr.astype(ptr_dtype)
    adata = ad.AnnData(x)
    pp.setup_anndata(adata)
    td = TensorData.from_adata(adata)
    assert td.indptr.numpy().dtype == ptr_dtype
    calls, kernel = [], _kernels.gather_csr
    monkeypatch.setattr(_kernels, "gather_csr", lambda *a: calls.append(1) or kernel(*a))
    for idx in ([4, 17], [59, 0, 4, 33, 33, 17, 2], list(rng.permutation(60))):
        got = []
        for enabled in (True, False):
            monkeypatch.setattr(_kernels, "enabled", enabled)
            got.append(td.counts(torch.tensor(idx)))
        for name in ("row", "col", "val", "offsets"):
            a, b = getattr(got[0], name), getattr(got[1], name)
            assert a.dtype == b.dtype and torch.equal(a, b)
        np.testing.assert_array_equal(as_dense(got[0]).numpy(), counts[idx])
    assert len(calls) == 3
    # int64 columns (TensorData stores them as int32 where they fit): the kernel alone
    idx = torch.tensor([5, 0, 5, 59])
    ptr, cols = (torch.from_numpy(a.astype(np.int64)) for a in (x.indptr, x.indices))
    row, col, val, offsets = kernel(idx, ptr, cols, torch.from_numpy(x.data))
    want = td.counts(idx)
    for name, got in (("row", row), ("col", col), ("val", val), ("offsets", offsets)):
        assert torch.equal(got, getattr(want, name)), name
    with pytest.raises(IndexError, match="cell index 60 is outside the 60 cells"):
        kernel(torch.tensor([1, 60]), ptr, cols, torch.from_numpy(x.data))
    for enabled in (True, False):
        monkeypatch.setattr(_kernels, "enabled", enabled)
        for bad in ([0, 60], [3, -1]):
            with pytest.raises(IndexError):
                td.counts(torch.tensor(bad))


def test_numpy_integer_batch_size_in_training_and_getters():
    # numbers.Integral passes the checks, but torch.split needs a Python int
    adata = cellvae.datasets.synthetic(90, 12, n_batches=2, random_state=0)
    cellvae.SCVI.setup_anndata(adata, batch_key="batch")
    model = cellvae.SCVI(adata, n_latent=2, n_hidden=8)
    model.train(max_epochs=1, batch_size=np.int64(32), progress_bar=False)
    np.testing.assert_array_equal(
        model.get_latent_representation(batch_size=np.int32(16)),
        model.get_latent_representation(batch_size=16),
    )
    sizes = [len(b) for b in BatchSampler(torch.arange(70), np.int64(32))]
    assert sizes == [32, 32, 6]


def test_synthetic_declares_every_batch_and_type_and_checks_its_arguments():
    adata = cellvae.datasets.synthetic(20, 5, n_batches=10, n_labels=10, random_state=0)
    assert list(adata.obs["batch"].cat.categories) == [f"batch{i}" for i in range(10)]
    assert list(adata.obs["cell_type"].cat.categories) == [f"type{i}" for i in range(10)]
    assert adata.obs["batch"].nunique() < 10  # 20 cells do not draw every one of them here
    for kwargs, name in [
        ({"n_vars": 0}, "n_vars"), ({"n_batches": 0}, "n_batches"), ({"n_obs": -5}, "n_obs"),
        ({"n_obs": 2.5}, "n_obs"), ({"n_labels": True}, "n_labels"),
        ({"n_proteins": -1}, "n_proteins"), ({"batch_effect": -1.0}, "batch_effect"),
        ({"batch_effect": float("nan")}, "batch_effect"),
    ]:  # fmt: skip
        with pytest.raises(ValueError, match=f"^{name} must be"):
            cellvae.datasets.synthetic(**kwargs)


def test_demo_refuses_bad_arguments_before_any_work(tmp_path, capsys, monkeypatch):
    import logging

    from cellvae import demo

    monkeypatch.setattr(logging, "basicConfig", lambda **kwargs: None)  # the test's own logging
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    for argv, message in [
        (["--out", str(a_file)], "cannot be a folder"),
        (["--out", str(a_file / "sub")], "cannot be a folder"),
        (["--max-epochs", "0"], "must be at least 1"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            demo.main([*argv, "--max-epochs", "1"] if "--max-epochs" not in argv else argv)
        assert exit_.value.code == 2
        assert message in capsys.readouterr().err
    assert a_file.read_text() == ""


@pytest.mark.parametrize("fmt", ["csr", "csc"])
def test_repeated_narrow_integer_entries_are_summed_without_wrapping(fmt):
    # two int8 100s at one position: 200, at set-up (library) and in training (it was -56)
    data = np.array([100, 100, 3, 1, 1], dtype=np.int8)
    m = sp.csr_matrix(
        (data, np.array([0, 0, 1, 0, 1]), np.array([0, 3, 5])), shape=(2, 2), dtype=np.int8
    )
    adata = ad.AnnData(X=m if fmt == "csr" else m.tocsc(), var=pd.DataFrame(index=["a", "b"]))
    adata.X.has_canonical_format = False
    pp.setup_anndata(adata)
    assert adata.uns["cellvae"]["library_log_means"][0] == pytest.approx(
        (np.log(203.0) + np.log(2.0)) / 2
    )
    b = TensorData.from_adata(adata)[torch.tensor([0, 1])]
    np.testing.assert_array_equal(as_dense(b["x"]).numpy(), [[200.0, 3.0], [1.0, 1.0]])
