"""The registry: setup_anndata records, validation errors, h5ad round trip, transfer_setup."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import cellvae
from cellvae import pp
from cellvae._data import TensorData
from cellvae._registry import UNS_KEY, Registry, iter_row_chunks, scan_counts
from cellvae._sparse import as_dense


def make(n_obs=60, n_vars=20, *, n_proteins=0, seed=0, sparse=True):
    adata = cellvae.datasets.synthetic(
        n_obs, n_vars, n_batches=2, n_proteins=n_proteins, random_state=seed, sparse=sparse
    )
    rng = np.random.default_rng(seed)
    adata.obs["age"] = rng.normal(50, 10, n_obs)
    adata.obs["pct_mito"] = rng.random(n_obs).astype(np.float32)
    adata.obs["donor"] = pd.Categorical(rng.choice(["d2", "d1", "d3"], n_obs))
    adata.obs["site"] = rng.choice(["siteB", "siteA"], n_obs)  # plain strings
    adata.obs["sf"] = rng.uniform(0.5, 2.0, n_obs)
    return adata


def dense(m):
    return m.toarray() if sp.issparse(m) else np.asarray(m)


def snapshot(adata):
    """Everything setup must not touch (and uns, which it must not touch on error)."""
    return {
        "obs": adata.obs.copy(),
        "obs_columns": list(adata.obs.columns),
        "uns_keys": sorted(adata.uns.keys()),
        "uns_record": dict(adata.uns.get(UNS_KEY, {})),
        "X": dense(adata.X).copy() if adata.X is not None else None,
        "X_type": type(adata.X),
        "layers": {k: dense(v).copy() for k, v in adata.layers.items()},
        "obsm": {
            k: (v.copy() if isinstance(v, pd.DataFrame) else dense(v).copy())
            for k, v in adata.obsm.items()
        },
        "var_names": list(adata.var_names),
    }


def assert_unchanged(adata, before):
    after = snapshot(adata)
    pd.testing.assert_frame_equal(after["obs"], before["obs"])
    assert after["obs_columns"] == before["obs_columns"]
    assert after["uns_keys"] == before["uns_keys"]
    assert after["uns_record"].keys() == before["uns_record"].keys()
    assert after["X_type"] is before["X_type"]
    if before["X"] is None:
        assert after["X"] is None
    else:
        np.testing.assert_array_equal(after["X"], before["X"])
    assert after["layers"].keys() == before["layers"].keys()
    for k, v in before["layers"].items():
        np.testing.assert_array_equal(after["layers"][k], v)
    assert after["obsm"].keys() == before["obsm"].keys()
    for k, v in before["obsm"].items():
        if isinstance(v, pd.DataFrame):
            pd.testing.assert_frame_equal(after["obsm"][k], v)
        else:
            np.testing.assert_array_equal(after["obsm"][k], v)
    assert after["var_names"] == before["var_names"]


def setup_ok(adata, **kwargs) -> Registry:
    """Setup must succeed, add only uns['cellvae'], and leave every other field unchanged."""
    before = snapshot(adata)
    pp.setup_anndata(adata, **kwargs)
    after = snapshot(adata)
    assert after["obs_columns"] == before["obs_columns"]
    assert sorted(set(before["uns_keys"]) | {UNS_KEY}) == after["uns_keys"]
    before["uns_keys"] = after["uns_keys"]
    before["uns_record"] = after["uns_record"]
    assert_unchanged(adata, before)
    return Registry.from_adata(adata)


def batch_values(adata, key):
    return adata.obs[key].astype(str).to_numpy()


def all_rows(adata):
    return TensorData.from_adata(adata)[np.arange(adata.n_obs)]


# ---------------------------------------------------------------- one test per field
def test_defaults_single_batch_and_summary_stats():
    adata = make()
    reg = setup_ok(adata)
    assert reg.layer is None and reg.batch_key is None and reg.labels_key is None
    assert reg.batch_categories == ("0",) and reg.label_categories == ("0",)
    assert reg.var_names == tuple(adata.var_names)
    assert reg.n_vars == 20 and reg.n_obs == 60 and reg.n_batch == 1 and reg.n_proteins == 0
    x = dense(adata.X)
    assert reg.n_nonzero == np.count_nonzero(x)
    log_lib = np.log(x.sum(1))
    np.testing.assert_allclose(reg.library_log_means, [log_lib.mean()], rtol=1e-6)
    np.testing.assert_allclose(reg.library_log_vars, [log_lib.var()], rtol=1e-6)


def test_layer():
    adata = make()
    adata.layers["counts"] = adata.X.copy()
    adata.X = sp.csr_matrix(np.log1p(dense(adata.X)))  # non-integer: must be ignored
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reg = setup_ok(adata, layer="counts")
    assert reg.layer == "counts"
    np.testing.assert_array_equal(
        as_dense(all_rows(adata)["x"]).numpy(), dense(adata.layers["counts"])
    )


def test_batch_and_labels():
    adata = make()
    reg = setup_ok(adata, batch_key="batch", labels_key="cell_type")
    assert reg.batch_categories == tuple(adata.obs["batch"].cat.categories)
    assert reg.label_categories == tuple(adata.obs["cell_type"].cat.categories)
    b = all_rows(adata)
    assert (
        b["batch"].dtype == b["labels"].dtype == np.int64 or str(b["batch"].dtype) == "torch.int64"
    )
    np.testing.assert_array_equal(
        np.asarray(reg.batch_categories)[b["batch"].numpy()], batch_values(adata, "batch")
    )
    np.testing.assert_array_equal(
        np.asarray(reg.label_categories)[b["labels"].numpy()], batch_values(adata, "cell_type")
    )
    codes = b["batch"].numpy()
    lib = np.log(dense(adata.X).sum(1))
    for k in range(reg.n_batch):
        np.testing.assert_allclose(reg.library_log_means[k], lib[codes == k].mean(), rtol=1e-6)
        np.testing.assert_allclose(reg.library_log_vars[k], lib[codes == k].var(), rtol=1e-6)


def test_unused_categorical_levels_dropped_and_plain_strings_sorted():
    adata = make()
    adata.obs["batch"] = adata.obs["batch"].cat.add_categories(["never"])
    reg = setup_ok(adata, batch_key="batch", labels_key="site")
    assert "never" not in reg.batch_categories
    assert reg.label_categories == ("siteA", "siteB")


def test_integer_batch_column():
    adata = make()
    adata.obs["plate"] = np.arange(adata.n_obs) % 3
    reg = setup_ok(adata, batch_key="plate")
    assert reg.batch_categories == ("0", "1", "2")
    np.testing.assert_array_equal(all_rows(adata)["batch"].numpy(), np.arange(adata.n_obs) % 3)


def test_size_factors():
    adata = make()
    reg = setup_ok(adata, size_factor_key="sf")
    assert reg.size_factor_key == "sf"
    b = all_rows(adata)
    assert b["size_factor"].dtype.is_floating_point and b["size_factor"].dtype.itemsize == 4
    np.testing.assert_allclose(b["size_factor"].numpy(), adata.obs["sf"], rtol=1e-6)


def test_size_factor_errors_name_the_size_factor():
    adata = make()
    with pytest.raises(KeyError, match="size factor 'nope' is not a column"):
        pp.setup_anndata(adata, size_factor_key="nope")
    adata.obs["sf_text"] = adata.obs["sf"].astype(str)
    wrong_dtype = r"^Size factor obs\['sf_text'\] has dtype (object|str)"  # str: pandas 3
    with pytest.raises(ValueError, match=wrong_dtype) as e:
        pp.setup_anndata(adata, size_factor_key="sf_text")
    assert "categorical_covariate_keys" not in str(e.value)  # advice for covariates only
    adata.obs["sf_nan"] = adata.obs["sf"].where(np.arange(adata.n_obs) != 3)
    with pytest.raises(ValueError, match=r"1 NaN .*fillna\(1\)"):  # 0 is no size factor
        pp.setup_anndata(adata, size_factor_key="sf_nan")
    adata.obs["age_nan"] = adata.obs["age"].where(np.arange(adata.n_obs) != 3)
    with pytest.raises(ValueError, match=r"fillna\(0\)"):
        pp.setup_anndata(adata, continuous_covariate_keys="age_nan")


def test_a_column_registered_twice_is_an_error():
    adata = make()
    before = snapshot(adata)
    for kwargs in [
        {"continuous_covariate_keys": ["age", "age"]},
        {"batch_key": "batch", "categorical_covariate_keys": "batch"},
        {"categorical_covariate_keys": ["donor"], "continuous_covariate_keys": ["donor"]},
    ]:
        with pytest.raises(ValueError, match=r"obs columns \['(age|batch|donor)'\] are registered"):
            pp.setup_anndata(adata, **kwargs)
        assert_unchanged(adata, before)


def test_one_covariate_name_is_one_key():
    adata = make()
    reg = setup_ok(adata, categorical_covariate_keys="donor", continuous_covariate_keys="age")
    assert reg.categorical_covariate_keys == ("donor",)
    assert reg.continuous_covariate_keys == ("age",)
    np.testing.assert_allclose(all_rows(adata)["cont_covs"][:, 0], adata.obs["age"], rtol=1e-6)


def test_categorical_covariates():
    adata = make()
    reg = setup_ok(adata, categorical_covariate_keys=["donor", "site"])
    assert reg.categorical_covariate_keys == ("donor", "site")
    assert reg.categorical_covariate_categories == (("d1", "d2", "d3"), ("siteA", "siteB"))
    assert reg.n_cats_per_covariate == [3, 2]
    cats = all_rows(adata)["cat_covs"]
    assert cats.shape == (adata.n_obs, 2) and str(cats.dtype) == "torch.int64"
    for j, key in enumerate(("donor", "site")):
        names = np.asarray(reg.categorical_covariate_categories[j])[cats[:, j].numpy()]
        np.testing.assert_array_equal(names, batch_values(adata, key))


def test_continuous_covariates():
    adata = make()
    reg = setup_ok(adata, continuous_covariate_keys=["age", "pct_mito"])
    assert reg.continuous_covariate_keys == ("age", "pct_mito")
    assert reg.n_continuous_covariates == 2
    cont = all_rows(adata)["cont_covs"]
    assert str(cont.dtype) == "torch.float32" and cont.shape == (adata.n_obs, 2)
    np.testing.assert_allclose(cont.numpy(), adata.obs[["age", "pct_mito"]], rtol=1e-6)


def test_proteins_from_dataframe():
    adata = make(n_proteins=5)
    reg = setup_ok(adata, batch_key="batch", protein_expression_obsm_key="protein_expression")
    assert reg.protein_names == tuple(f"prot{t}" for t in range(5))
    assert reg.n_proteins == 5
    assert reg.protein_batch_mask == ((True,) * 5, (True,) * 5)
    prot = all_rows(adata)["protein"]
    assert str(prot.dtype) == "torch.float32"
    np.testing.assert_array_equal(prot.numpy(), adata.obsm["protein_expression"].to_numpy())


def test_proteins_from_array_and_uns_names():
    adata = make(n_proteins=4)
    values = adata.obsm["protein_expression"].to_numpy().astype(np.int64)
    adata.obsm["adt"] = values
    adata.uns["adt_names"] = np.array(["CD3", "CD4", "CD8", "CD19"])
    reg = setup_ok(adata, protein_expression_obsm_key="adt", protein_names_uns_key="adt_names")
    assert reg.protein_names == ("CD3", "CD4", "CD8", "CD19")
    assert reg.protein_names_uns_key == "adt_names"
    np.testing.assert_array_equal(all_rows(adata)["protein"].numpy(), values)


def test_proteins_from_array_without_names_get_placeholders():
    adata = make(n_proteins=3)
    adata.obsm["adt"] = sp.csr_matrix(adata.obsm["protein_expression"].to_numpy())
    reg = setup_ok(adata, protein_expression_obsm_key="adt")
    assert reg.protein_names == ("protein_0", "protein_1", "protein_2")


def test_protein_mask_records_batch_with_all_zero_proteins():
    adata = make(n_proteins=4)
    df = adata.obsm["protein_expression"].copy()
    in_b1 = (adata.obs["batch"] == "batch1").to_numpy()
    df.loc[in_b1, :] = 0.0  # batch1 measured no proteins at all
    df.loc[~in_b1, "prot2"] = 0.0  # batch0 did not measure prot2
    adata.obsm["protein_expression"] = df
    reg = setup_ok(adata, batch_key="batch", protein_expression_obsm_key="protein_expression")
    assert reg.batch_categories == ("batch0", "batch1")
    assert reg.protein_batch_mask == ((True, True, False, True), (False,) * 4)
    text = pp.format_setup(reg)
    assert "5 (batch, protein) pairs missing" in text


def test_record_is_plain_and_h5ad_safe():
    adata = make(n_proteins=3)
    setup_ok(adata, batch_key="batch", categorical_covariate_keys=["donor"])
    record = adata.uns[UNS_KEY]

    def plain(v):
        if isinstance(v, dict):
            return all(isinstance(k, str) and plain(x) for k, x in v.items())
        if isinstance(v, list):
            return all(plain(x) for x in v)
        if isinstance(v, np.ndarray):
            return v.dtype.kind in "biuf"
        return isinstance(v, str | int | float | bool)

    assert plain(record), record
    assert record["batch_categories"] == ["batch0", "batch1"]
    assert record["var_names"] == list(adata.var_names)


def test_view_setup_prints_table(capsys):
    adata = make(n_proteins=3)
    pp.setup_anndata(
        adata,
        batch_key="batch",
        labels_key="cell_type",
        size_factor_key="sf",
        categorical_covariate_keys=["donor"],
        continuous_covariate_keys=["age"],
        protein_expression_obsm_key="protein_expression",
    )
    pp.view_setup(adata)
    out = capsys.readouterr().out
    assert out.startswith("cellvae setup: 60 cells × 20 genes")
    for needle in (
        "obs['batch']: 2 categories (batch0, batch1)",
        "obs['cell_type']: 3 categories",
        "obs['sf']",
        "obs['donor']: 3 categories (d1, d2, d3)",
        "obs['age']",
        "obsm['protein_expression']: 3 proteins",
        "library (log)",
    ):
        assert needle in out, needle
    # every row's value starts in the same column, whichever field name is the longest
    pp.setup_anndata(adata, batch_key="batch")
    pp.view_setup(adata)
    for text in (out, capsys.readouterr().out):
        rows = text.splitlines()[3:]
        starts = {len(r) - len(r.split("  ", 1)[1].lstrip()) for r in rows}
        assert len(rows) >= 5 and len(starts) == 1, text


def test_numeric_batches_in_numeric_order():
    adata = make()
    adata.obs["plate"] = np.where(np.arange(adata.n_obs) % 2, 10, 2)
    reg = setup_ok(adata, batch_key="plate")
    assert reg.batch_categories == ("2", "10")
    codes = TensorData.from_adata(adata)[np.arange(4)]["batch"].numpy()
    np.testing.assert_array_equal(codes, [0, 1, 0, 1])
    adata.obs["dose"] = np.where(np.arange(adata.n_obs) % 2, 0.5, 1.5)
    assert setup_ok(adata, batch_key="dose").batch_categories == ("0.5", "1.5")


def test_setup_twice_replaces_record():
    adata = make()
    pp.setup_anndata(adata, batch_key="batch")
    reg = setup_ok(adata, labels_key="cell_type")
    assert reg.batch_key is None and reg.labels_key == "cell_type"


# ---------------------------------------------------------------- h5ad round trip
@pytest.mark.parametrize("full", [False, True])
def test_h5ad_round_trip_keeps_registry(tmp_path, full):
    adata = make(n_proteins=4)
    adata.layers["counts"] = adata.X.copy()
    kwargs = {}
    if full:
        kwargs = dict(
            layer="counts",
            batch_key="batch",
            labels_key="cell_type",
            size_factor_key="sf",
            categorical_covariate_keys=["donor", "site"],
            continuous_covariate_keys=["age", "pct_mito"],
            protein_expression_obsm_key="protein_expression",
        )
    pp.setup_anndata(adata, **kwargs)
    reg = Registry.from_adata(adata)
    path = tmp_path / "a.h5ad"
    adata.write_h5ad(path)
    back = ad.read_h5ad(path)
    reg_back = Registry.from_adata(back)
    assert reg_back == reg
    assert Registry.from_dict(reg.to_dict()) == reg
    b0, b1 = all_rows(adata), TensorData.from_adata(back)[np.arange(back.n_obs)]
    assert b0.keys() == b1.keys()
    for k in b0:
        np.testing.assert_array_equal(as_dense(b0[k]).numpy(), as_dense(b1[k]).numpy())


def test_h5ad_round_trip_covariate_name_with_slash(tmp_path):
    adata = make()
    adata.obs["donor/id"] = adata.obs["donor"]
    adata.obs["plate"] = np.arange(adata.n_obs) % 2  # integer categories come back as strings
    pp.setup_anndata(adata, batch_key="plate", categorical_covariate_keys=["donor/id", "site"])
    reg = Registry.from_adata(adata)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anndata may warn about "/" in obs column names
        adata.write_h5ad(tmp_path / "a.h5ad")
    assert Registry.from_adata(ad.read_h5ad(tmp_path / "a.h5ad")) == reg
    assert reg.batch_categories == ("0", "1")


def test_unknown_record_field_is_rejected():
    adata = make()
    pp.setup_anndata(adata)
    adata.uns[UNS_KEY]["from_the_future"] = 1
    with pytest.raises(ValueError, match="unknown fields.*setup_anndata"):
        Registry.from_adata(adata)


def test_not_set_up_error():
    with pytest.raises(ValueError, match="not been set up.*setup_anndata"):
        Registry.from_adata(make())


# ---------------------------------------------------------------- bad input
def _nan_count(a):
    a.X = a.X.copy()
    a.X.data[3] = np.nan


def _inf_count(a):
    x = dense(a.X)
    x[2, 5] = np.inf
    a.X = x


def _negative_count(a):
    a.X = a.X.copy()
    a.X.data[0] = -1.0


def _empty_cells(a):
    x = dense(a.X)
    x[[4, 9]] = 0
    a.X = sp.csr_matrix(x)


def _nan_batch(a):
    col = a.obs["batch"].astype(object)
    col.iloc[7] = np.nan
    a.obs["batch"] = col


def _nan_batch_categorical(a):
    col = a.obs["batch"].copy()
    col.iloc[[1, 2]] = np.nan
    a.obs["batch"] = col


def _nan_age(a):
    a.obs.loc[a.obs_names[5], "age"] = np.nan


def _inf_age(a):
    a.obs.loc[a.obs_names[5], "age"] = np.inf


def _string_age(a):
    a.obs["age"] = a.obs["age"].astype(str)


def _bad_size_factor(a):
    a.obs.loc[a.obs_names[0], "sf"] = 0.0


def _protein_non_numeric_df(a):
    df = a.obsm["protein_expression"].copy()
    df["prot1"] = "high"
    a.obsm["protein_expression"] = df


def _protein_non_numeric_array(a):
    a.obsm["adt"] = np.full((a.n_obs, 3), "x", dtype=object)


def _protein_nan(a):
    df = a.obsm["protein_expression"].copy()
    df.iloc[3, 1] = np.nan
    a.obsm["protein_expression"] = df


def _protein_negative(a):
    df = a.obsm["protein_expression"].copy()
    df.iloc[3, 1] = -2.0
    a.obsm["protein_expression"] = df


def _protein_names_wrong_length(a):
    a.obsm["adt"] = a.obsm["protein_expression"].to_numpy()
    a.uns["adt_names"] = ["A", "B"]


def _protein_names_repeated_df(a):
    a.obsm["protein_expression"].columns = ["A", "B", "A", "C"]


def _protein_names_repeated_as_text(a):
    a.obsm["protein_expression"].columns = [1, "1", "x", "y"]  # one name as text


def _protein_names_repeated_uns(a):
    a.obsm["adt"] = a.obsm["protein_expression"].to_numpy()
    a.uns["adt_names"] = ["A", "B", "B", "C"]


def _beyond_float32(a):
    x = dense(a.X).astype(np.float64)
    x[4, 2] = 1e39  # finite in float64, inf in the models' float32
    a.X = x


def _string_counts(a):
    a.layers["text"] = np.full(a.shape, "1", dtype=object)


def _x_none(a):
    a.layers["counts"] = a.X
    a.X = None


BAD = [
    # (id, mutate, setup kwargs, exception, message pattern)
    ("missing-layer", None, {"layer": "counts"}, KeyError, r"Layer 'counts' not found.*layer=None"),
    ("x-none", _x_none, {}, ValueError, r"adata.X is None.*layer='counts'"),
    ("missing-batch", None, {"batch_key": "sample"}, KeyError, r"'sample' is not a column.*Pass"),
    ("missing-labels", None, {"labels_key": "ct"}, KeyError, r"'ct' is not a column of adata.obs"),
    (
        "missing-cat-cov",
        None,
        {"categorical_covariate_keys": ["nope"]},
        KeyError,
        r"categorical covariate 'nope' is not a column",
    ),
    (
        "missing-cont-cov",
        None,
        {"continuous_covariate_keys": ["nope"]},
        KeyError,
        r"continuous covariate 'nope' is not a column",
    ),
    ("missing-size-factor", None, {"size_factor_key": "nope"}, KeyError, r"'nope' is not a column"),
    (
        "missing-obsm",
        None,
        {"protein_expression_obsm_key": "adt"},
        KeyError,
        r"'adt' is not in adata.obsm.*protein_expression_obsm_key=",
    ),
    (
        "missing-uns-names",
        None,
        {"protein_expression_obsm_key": "protein_expression", "protein_names_uns_key": "names"},
        KeyError,
        r"'names' is not in adata.uns.*Store the names",
    ),
    ("nan-count", _nan_count, {}, ValueError, r"1 NaN or infinite values.*layer='counts'"),
    ("inf-count", _inf_count, {}, ValueError, r"1 NaN or infinite values.*rows 0-60"),
    ("negative-count", _negative_count, {}, ValueError, r"1 negative values.*raw, non-negative"),
    ("string-counts", _string_counts, {"layer": "text"}, ValueError, r"non-numeric dtype object"),
    (
        "empty-cells",
        _empty_cells,
        {},
        ValueError,
        r"^2 cells have zero total counts.*sc\.pp\.filter_cells\(adata, min_counts=1\)",
    ),
    ("nan-batch", _nan_batch, {"batch_key": "batch"}, ValueError, r"1 missing \(NaN\).*notna"),
    (
        "nan-batch-categorical",
        _nan_batch_categorical,
        {"batch_key": "batch"},
        ValueError,
        r"obs\['batch'\] \(batch_key\) has 2 missing",
    ),
    (
        "nan-cont-cov",
        _nan_age,
        {"continuous_covariate_keys": ["age"]},
        ValueError,
        r"obs\['age'\] has 1 NaN or infinite.*fillna",
    ),
    (
        "inf-cont-cov",
        _inf_age,
        {"continuous_covariate_keys": ["age"]},
        ValueError,
        r"1 NaN or infinite",
    ),
    (
        "string-cont-cov",
        _string_age,
        {"continuous_covariate_keys": ["age"]},
        ValueError,
        r"must be numeric.*categorical_covariate_keys",
    ),
    ("size-factor-zero", _bad_size_factor, {"size_factor_key": "sf"}, ValueError, r"positive"),
    (
        "protein-non-numeric-df",
        _protein_non_numeric_df,
        {"protein_expression_obsm_key": "protein_expression"},
        ValueError,
        r"non-numeric protein columns \['prot1'\].*astype\(float\)",
    ),
    (
        "protein-non-numeric-array",
        _protein_non_numeric_array,
        {"protein_expression_obsm_key": "adt"},
        ValueError,
        r"dtype object; protein counts must be numeric.*astype",
    ),
    (
        "protein-nan",
        _protein_nan,
        {"protein_expression_obsm_key": "protein_expression"},
        ValueError,
        r"1 NaN or infinite protein counts.*drop those cells",
    ),
    (
        "protein-negative",
        _protein_negative,
        {"protein_expression_obsm_key": "protein_expression"},
        ValueError,
        r"1 negative protein counts.*raw ADT counts",
    ),
    (
        "protein-names-length",
        _protein_names_wrong_length,
        {"protein_expression_obsm_key": "adt", "protein_names_uns_key": "adt_names"},
        ValueError,
        r"Got 2 protein names for 4 protein columns.*one name per column",
    ),
    (
        "protein-names-repeated-df",
        _protein_names_repeated_df,
        {"protein_expression_obsm_key": "protein_expression"},
        ValueError,
        r"\['A'\] appear more than once in obsm\['protein_expression'\]'s columns",
    ),
    (
        "protein-names-repeated-as-text",
        _protein_names_repeated_as_text,
        {"protein_expression_obsm_key": "protein_expression"},
        ValueError,
        r"Protein names must be unique, but \['1'\] appear more than once",
    ),
    (
        "protein-names-repeated-uns",
        _protein_names_repeated_uns,
        {"protein_expression_obsm_key": "adt", "protein_names_uns_key": "adt_names"},
        ValueError,
        r"\['B'\] appear more than once in uns\['adt_names'\]",
    ),
    ("beyond-float32", _beyond_float32, {}, ValueError, r"1 NaN or infinite.*float32's range"),
]


@pytest.mark.parametrize(
    ("mutate", "kwargs", "exc", "match"), [b[1:] for b in BAD], ids=[b[0] for b in BAD]
)
@pytest.mark.parametrize("previous_setup", [False, True])
def test_bad_input_raises_and_leaves_adata_unchanged(mutate, kwargs, exc, match, previous_setup):
    adata = make(n_proteins=4)
    if mutate is not None:
        mutate(adata)
    if previous_setup:  # a failing setup must not clobber an earlier valid one either
        adata.uns[UNS_KEY] = {"marker": 1}
    before = snapshot(adata)
    with pytest.raises(exc, match=match):
        pp.setup_anndata(adata, **kwargs)
    assert_unchanged(adata, before)
    assert (UNS_KEY in adata.uns) == previous_setup


def test_protein_matrix_wrong_number_of_rows():
    # anndata 0.12 validates obsm shapes on every access, so an AnnData cannot hold such a matrix;
    # the registry still checks it (older anndata, duck-typed objects) with a clear message.
    adata = make(n_proteins=3)
    with pytest.raises(ValueError, match="incorrect shape"):
        adata.obsm["adt"] = np.ones((adata.n_obs - 3, 4), dtype=np.float32)
    fake = SimpleNamespace(n_obs=60, obsm={"adt": np.ones((57, 4), dtype=np.float32)})
    with pytest.raises(ValueError, match=r"shape \(57, 4\); expected \(60, n_proteins\).*one row"):
        pp.protein_matrix(fake, "adt")
    fake.obsm["adt"] = np.ones(60, dtype=np.float32)
    with pytest.raises(ValueError, match=r"shape \(60,\); expected \(60, n_proteins\)"):
        pp.protein_matrix(fake, "adt")


def test_view_is_rejected():
    adata = make()
    view = adata[:30]
    before = snapshot(adata)
    with pytest.raises(ValueError, match=r"view of an AnnData.*adata = adata\.copy\(\)"):
        pp.setup_anndata(view, batch_key="batch")
    assert view.is_view  # not silently turned into a copy
    assert UNS_KEY not in view.uns
    assert_unchanged(adata, before)


def test_view_of_a_backed_anndata_names_to_memory(tmp_path):
    adata = make()
    adata.write_h5ad(tmp_path / "a.h5ad")
    backed = ad.read_h5ad(tmp_path / "a.h5ad", backed="r")
    with pytest.raises(ValueError, match=r"view of an AnnData.*adata\.to_memory\(\)"):
        pp.setup_anndata(backed[:10], batch_key="batch")


def test_empty_adata_is_rejected():
    adata = make()[:0].copy()
    with pytest.raises(ValueError, match="empty"):
        pp.setup_anndata(adata)


def test_non_integer_counts_warn():
    adata = make()
    adata.X = adata.X * 0.5
    before = snapshot(adata)
    with pytest.warns(UserWarning, match=r"non-integer values.*layer='counts'"):
        pp.setup_anndata(adata)
    assert_unchanged(adata, {**before, "uns_keys": [UNS_KEY], "uns_record": adata.uns[UNS_KEY]})


def test_zero_count_genes_warn():
    adata = make()
    x = dense(adata.X)
    x[:, [3, 7, 11]] = 0
    adata.X = sp.csr_matrix(x)
    with pytest.warns(UserWarning, match=r"^3 genes have zero counts.*filter_genes"):
        reg = setup_ok(adata)
    assert reg.n_vars == 20


def test_duplicate_gene_names_warn():
    adata = make()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anndata's own warning at the assignment
        adata.var_names = ["g0", "g1", "g0", *adata.var_names[3:]]
    with pytest.warns(UserWarning, match=r"^1 gene names occur more than once \(e.g. \['g0'\]\)"):
        setup_ok(adata)
    adata.var_names_make_unique()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        setup_ok(adata)


def test_warnings_name_the_users_line_however_deep_the_call():
    # the user's line, not cellvae's, whether through pp, the model class or the tl one-liner
    import cellvae

    adata = make()
    adata.X = adata.X * 0.5
    calls = [
        lambda: pp.setup_anndata(adata),
        lambda: cellvae.SCVI.setup_anndata(adata),
        lambda: cellvae.tl.scvi(adata, max_epochs=1, progress_bar=False),
        lambda: (
            cellvae.SCVI(adata)  # a model registers nothing: no warning
            .train(max_epochs=1, progress_bar=False)
            .get_latent_representation(adata.copy())
        ),  # new data in a getter warns
    ]
    for call in calls:
        with pytest.warns(UserWarning, match="non-integer") as record:
            call()
        assert {w.filename for w in record if "non-integer" in str(w.message)} == {__file__}


def test_integer_and_float64_counts_accepted_without_warning():
    adata = make(sparse=False)
    adata.X = adata.X.astype(np.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        setup_ok(adata)
    adata.X = adata.X.astype(np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        setup_ok(adata)


def test_checks_see_every_chunk():
    # a bad value in the last chunk of a matrix read in 10,000-row chunks is still found
    x = np.ones((10_005, 2), dtype=np.float32)
    x[10_004, 1] = -1
    with pytest.raises(ValueError, match=r"1 negative values \(first in rows 10000-10005\)"):
        scan_counts(_Chunked(x), 10_005, 2)
    x[10_004, 1] = 0.5
    with pytest.warns(UserWarning, match="non-integer"):
        stats = scan_counts(_Chunked(x), 10_005, 2)
    np.testing.assert_array_equal(stats["library"], x.sum(1))
    np.testing.assert_array_equal(stats["gene_totals"], x.sum(0, dtype=np.float64))
    assert stats["nnz"] == 20_010


class _Chunked:
    """A minimal matrix that is neither numpy nor scipy (like an h5py dataset), 10-row chunks."""

    def __init__(self, x):
        self.x, self.shape = x, x.shape

    def __getitem__(self, key):
        return self.x[key]


def test_iter_row_chunks_bounds_dense_chunk_size():
    x = np.zeros((10, 5_000_000 // 1000 * 1000 // 1000), dtype=np.float32)  # 10 x 5000
    chunks = list(iter_row_chunks(x, 10, chunk=3))
    assert [(s, e) for s, e, _ in chunks] == [(0, 3), (3, 6), (6, 9), (9, 10)]
    wide = sp.csr_matrix((20_000, 40_000), dtype=np.float32)
    sizes = [e - s for s, e, _ in iter_row_chunks(wide, 20_000)]
    assert max(sizes) <= (1 << 24) // 40_000 and sum(sizes) == 20_000


# ---------------------------------------------------------------- transfer_setup
@pytest.fixture
def reference():
    ref = make(80, 20, n_proteins=3, seed=1)
    pp.setup_anndata(
        ref,
        batch_key="batch",
        labels_key="cell_type",
        categorical_covariate_keys=["donor"],
        continuous_covariate_keys=["age"],
        protein_expression_obsm_key="protein_expression",
    )
    return ref


def test_transfer_same_genes(reference):
    query = make(40, 20, n_proteins=3, seed=2)
    query.obs["batch"] = pd.Categorical(["batch1"] * 40)  # only the reference's second batch
    query.obs["donor"] = pd.Categorical(["d3"] * 40)
    before = snapshot(query)
    reg = pp.transfer_setup(query, reference)
    ref_reg = Registry.from_adata(reference)
    assert reg.batch_categories == ref_reg.batch_categories
    assert reg.categorical_covariate_categories == ref_reg.categorical_covariate_categories
    assert reg.var_names == ref_reg.var_names and reg.n_obs == 40
    assert Registry.from_adata(query) == reg
    b = TensorData.from_adata(query)[np.arange(40)]
    assert (b["batch"].numpy() == ref_reg.batch_categories.index("batch1")).all()
    assert (
        b["cat_covs"][:, 0].numpy() == ref_reg.categorical_covariate_categories[0].index("d3")
    ).all()
    assert list(query.obs.columns) == before["obs_columns"]


@pytest.mark.parametrize("source", ["adata", "registry"])
def test_transfer_from_adata_or_registry(reference, source):
    query = make(40, 20, n_proteins=3, seed=2)
    src = reference if source == "adata" else Registry.from_adata(reference)
    reg = pp.transfer_setup(query, src)
    assert reg.setup_kwargs() == Registry.from_adata(reference).setup_kwargs()


def test_transfer_missing_and_extra_genes_listed(reference):
    query = make(40, 20, n_proteins=3, seed=2)
    names = list(query.var_names)
    names[3], names[10] = "NEWGENE", "OTHERNEW"
    query.var_names = names
    before = snapshot(query)
    with pytest.raises(ValueError, match=r"2 missing.*gene3.*gene10.*2 extra.*NEWGENE.*OTHERNEW"):
        pp.transfer_setup(query, reference)
    assert_unchanged(query, before)
    fewer = make(40, 20, n_proteins=3, seed=2)[:, 5:].copy()
    with pytest.raises(ValueError, match=r"5 missing.*0 extra"):
        pp.transfer_setup(fewer, reference)


def test_transfer_reordered_genes_rejected(reference):
    query = make(40, 20, n_proteins=3, seed=2)
    query = query[:, list(query.var_names[::-1])].copy()
    before = snapshot(query)
    with pytest.raises(ValueError, match=r"different order.*adata\[:, genes\]\.copy.*registry_"):
        pp.transfer_setup(query, reference)
    assert_unchanged(query, before)


def test_transfer_reference_layer_missing(reference):
    ref = make(40, 20, seed=1)
    ref.layers["counts"] = ref.X.copy()
    pp.setup_anndata(ref, layer="counts")
    query = make(40, 20, seed=2)
    before = snapshot(query)
    # the query cannot choose its layer: the message says where the reference reads counts
    with pytest.raises(KeyError, match=r"reads raw counts from adata.layers\['counts'\]"):
        pp.transfer_setup(query, ref)
    assert_unchanged(query, before)
    query.layers["counts"] = query.X.copy()
    assert pp.transfer_setup(query, ref).layer == "counts"


def test_transfer_unseen_batch(reference):
    query = make(40, 20, n_proteins=3, seed=2)
    query.obs["batch"] = pd.Categorical(np.where(np.arange(40) % 2, "batch0", "new_lab"))
    before = snapshot(query)
    with pytest.raises(ValueError, match=r"\['new_lab'\] not seen.*extend_categories=True"):
        pp.transfer_setup(query, reference)
    assert_unchanged(query, before)

    reg = pp.transfer_setup(query, reference, extend_categories=True)
    assert reg.batch_categories == ("batch0", "batch1", "new_lab")
    codes = TensorData.from_adata(query)[np.arange(40)]["batch"].numpy()
    np.testing.assert_array_equal(codes, np.where(np.arange(40) % 2, 0, 2))
    # the reference's own codes are unchanged by the extension
    ref_codes = TensorData.from_adata(reference, reg)
    np.testing.assert_array_equal(
        np.asarray(reg.batch_categories)[ref_codes.batch.numpy()],
        batch_values(reference, "batch"),
    )


def test_transfer_unseen_covariate_category(reference):
    query = make(40, 20, n_proteins=3, seed=2)
    query.obs["donor"] = pd.Categorical(["d9"] * 40)
    with pytest.raises(ValueError, match=r"obs\['donor'\].*\['d9'\].*extend_categories"):
        pp.transfer_setup(query, reference)
    reg = pp.transfer_setup(query, reference, extend_categories=True)
    assert reg.categorical_covariate_categories == (("d1", "d2", "d3", "d9"),)


def test_transfer_without_labels_column_keeps_reference_labels(reference):
    query = make(40, 20, n_proteins=3, seed=2)
    del query.obs["cell_type"]
    reg = pp.transfer_setup(query, reference)
    assert reg.labels_key is None
    assert reg.label_categories == Registry.from_adata(reference).label_categories


def test_transfer_labels_with_missing_values_are_left_out(reference):
    # unannotated query cells: labels are optional there, as an absent column is
    query = make(40, 20, n_proteins=3, seed=2)
    query.obs["cell_type"] = query.obs["cell_type"].astype(object)
    query.obs.iloc[:10, query.obs.columns.get_loc("cell_type")] = np.nan
    reg = pp.transfer_setup(query, reference)
    assert reg.labels_key is None
    assert reg.label_categories == Registry.from_adata(reference).label_categories
    with pytest.raises(ValueError, match="missing"):  # a setup of its own still needs them all
        pp.setup_anndata(query, labels_key="cell_type")


def test_transfer_protein_panel_must_match(reference):
    query = make(40, 20, n_proteins=3, seed=2)
    query.obsm["protein_expression"] = query.obsm["protein_expression"][["prot2", "prot1", "prot0"]]
    before = snapshot(query)
    with pytest.raises(ValueError, match="proteins .* differ .*different order"):
        pp.transfer_setup(query, reference)
    assert_unchanged(query, before)


def test_transfer_protein_names_from_uns_columns_or_position():
    # a reference named its proteins by an uns key; a query names them by its DataFrame's
    # columns (no such uns key), or gives a plain array in the reference's order
    ref = make(40, 20, n_proteins=3, seed=1)
    frame = ref.obsm["protein_expression"]
    ref.obsm["protein_expression"] = frame.to_numpy()
    ref.uns["names"] = list(frame.columns)
    pp.setup_anndata(
        ref, protein_expression_obsm_key="protein_expression", protein_names_uns_key="names"
    )
    query = make(40, 20, n_proteins=3, seed=2)
    assert isinstance(query.obsm["protein_expression"], pd.DataFrame)
    assert pp.transfer_setup(query, ref).protein_names == tuple(frame.columns)
    query.obsm["protein_expression"] = query.obsm["protein_expression"].iloc[:, ::-1]
    with pytest.raises(ValueError, match="same names in a different order"):
        pp.transfer_setup(query, ref)
    query.obsm["protein_expression"] = query.obsm["protein_expression"].iloc[:, ::-1].to_numpy()
    assert pp.transfer_setup(query, ref).protein_names == tuple(frame.columns)
    query.obsm["protein_expression"] = query.obsm["protein_expression"][:, :2]
    with pytest.raises(ValueError, match="has 2 protein columns; the reference has 3"):
        pp.transfer_setup(query, ref)


def test_transfer_view_rejected(reference):
    query = make(40, 20, n_proteins=3, seed=2)
    with pytest.raises(ValueError, match=r"adata\.copy\(\)"):
        pp.transfer_setup(query[:10], reference)


def test_codes_reject_unknown_category_from_tensor_data(reference):
    query = make(40, 20, n_proteins=3, seed=2)
    query.obs["batch"] = pd.Categorical(["zzz"] * 40)
    with pytest.raises(ValueError, match=r"\['zzz'\].*cannot encode.*setup_anndata"):
        TensorData.from_adata(query, Registry.from_adata(reference))


def test_csr_scan_in_chunks_equals_whole_matrix():
    # the chunked scan of an in-memory CSR (bounded temporaries) gives the exact totals, with
    # empty rows, duplicates and explicit zeros, whatever the chunk size
    from cellvae._registry import _scan_csr

    rng = np.random.default_rng(7)
    m = sp.random(300, 40, density=0.2, format="csr", random_state=7, dtype=np.float32)
    m.data = rng.integers(1, 9, m.nnz).astype(np.float32)
    m[5] = 0
    m.data[::11] = 0  # explicit zeros
    dense = m.toarray()
    for entries in (1, 7, 100, 10**6):
        library, genes, nnz, integer = _scan_csr(m, 300, 40, entries=entries)
        np.testing.assert_allclose(library, dense.sum(1))
        np.testing.assert_allclose(genes, dense.sum(0))
        assert nnz == np.count_nonzero(dense) and integer
    m.data[3] = 0.5
    assert not _scan_csr(m, 300, 40, entries=50)[3]
    m.data[200] = -1
    with pytest.raises(ValueError, match="1 negative values"):
        _scan_csr(m, 300, 40, entries=50)


@pytest.mark.parametrize("kind", ["strings", "ints"])
def test_codes_of_categorical_and_plain_columns_agree(kind):
    from cellvae._registry import Registry

    rng = np.random.default_rng(0)
    raw = rng.choice(["b", "a", "c"], 50) if kind == "strings" else rng.choice([3, 1, 2], 50)
    # categories in another order than the registry's, and an unused one
    order = list(pd.unique(raw))[::-1] + (["unused"] if kind == "strings" else [7])
    missing = pd.Series(raw, dtype=object)
    missing[[4, 9]] = None
    obs = pd.DataFrame(
        {
            "plain": pd.Series(raw, dtype=object).to_numpy(),
            "cat": pd.Categorical(raw, categories=order),
            "plain_missing": missing.to_numpy(),
            "cat_missing": pd.Categorical(missing, categories=order),
        },
        index=[f"c{i}" for i in range(50)],
    )
    adata = ad.AnnData(np.ones((50, 2), np.float32), obs=obs)
    reg = Registry.__new__(Registry)  # codes() reads only its arguments
    known = ["a", "b", "c"] if kind == "strings" else ["1", "2", "3"]
    for cats in (known, known[::-1]):
        a, b = reg.codes(adata, "plain", cats), reg.codes(adata, "cat", cats)
        assert a.dtype == b.dtype == np.int32
        np.testing.assert_array_equal(b, [cats.index(str(v)) for v in raw])
        np.testing.assert_array_equal(a, b)
        for key in ("plain_missing", "cat_missing"):  # a missing value is never known
            with pytest.raises(ValueError, match="its setup does not know"):
                reg.codes(adata, key, cats)
        for key in ("plain", "cat"):  # neither is a category the model has not seen
            with pytest.raises(ValueError, match="its setup does not know"):
                reg.codes(adata, key, cats[:2])


def test_category_positions_by_text_then_by_number():
    from cellvae._registry import category_positions

    cats = ("0", "1", "10", "b", "2.5", "True")
    names = ["1", "1.0", "10.00", "+1", "1e1", "b", "2.50", "nan", "True", "1_0", " 1", "0x1"]
    # text first; plain decimal numbers by value; nothing else (not "1_0" = 10 or " 1" = 1, as
    # float() would read them)
    expected = [1, 1, 2, 1, 2, 3, 4, -1, 5, -1, -1, -1]
    np.testing.assert_array_equal(category_positions(names, cats), expected)
    # the same text wins over the same value; of two categories with one value, the first
    assert list(category_positions(["1.0", "1.00"], ("1", "1.0"))) == [1, 0]
    assert list(category_positions([], cats)) == []


@pytest.mark.parametrize("categorical", [False, True])
def test_integer_batches_read_back_as_floats_keep_their_codes(categorical):
    # an int batch column that became float (pd.concat with missing rows, read_csv) names the
    # reference's batches '0', '1' as '0.0', '1.0': the same batches, not unseen ones
    ref = make(40, 20, seed=1)
    ref.obs["run"] = np.arange(40) % 3
    pp.setup_anndata(ref, batch_key="run")
    query = make(30, 20, seed=2)
    runs = (np.arange(30) + 1) % 3
    query.obs["run"] = runs.astype(float)
    if categorical:
        query.obs["run"] = query.obs["run"].astype("category")
    before = snapshot(query)
    reg = pp.transfer_setup(query.copy(), ref, extend_categories=True)
    assert reg.batch_categories == ("0", "1", "2")  # nothing appended
    codes = TensorData.from_adata(query, Registry.from_adata(ref))[np.arange(30)]["batch"]
    np.testing.assert_array_equal(codes.numpy(), runs)
    assert_unchanged(query, before)
    query.obs["run"] = np.where(runs == 2, 2.5, runs)  # a value the reference never had
    with pytest.raises(ValueError, match=r"\['2.5'\] not seen"):
        pp.transfer_setup(query, ref)


def _split_entries(x: sp.csr_matrix, first: np.ndarray, second: np.ndarray) -> sp.csr_matrix:
    """``x`` with every stored entry written twice, as ``first`` and ``second`` (non-canonical)."""
    rows = np.repeat(np.arange(x.shape[0]), np.diff(x.indptr))
    order = np.argsort(np.concatenate([rows, rows]), kind="stable")
    data = np.concatenate([first, second])[order]
    indices = np.concatenate([x.indices, x.indices])[order]
    out = sp.csr_matrix((data, indices, 2 * x.indptr), shape=x.shape)
    assert not out.has_canonical_format
    return out


@pytest.mark.parametrize("fmt", ["csr", "csc"])  # anndata stores no COO
def test_repeated_entries_are_validated_and_counted_as_their_sums(fmt):
    adata = make()
    x = sp.csr_matrix(adata.X)
    cellvae.SCVI.setup_anndata(adata)
    expected = adata.uns[UNS_KEY]
    for first, second in [
        (x.data / 2, x.data / 2),  # halves of integers: the sums are integers
        (x.data + 1, -np.ones_like(x.data)),  # a stored -1: the sums are the counts
    ]:
        split = _split_entries(x, first, second)
        np.testing.assert_array_equal(split.toarray(), x.toarray())  # scipy sums repeated entries
        if fmt != "csr":
            split = split.asformat(fmt)
            split.has_canonical_format = False
        other = ad.AnnData(split, obs=adata.obs.copy(), var=adata.var.copy())
        stored = [a.copy() for a in _arrays(split)]
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no non-integer warning, no negative values
            cellvae.SCVI.setup_anndata(other)
        for before, after in zip(stored, _arrays(split), strict=True):
            np.testing.assert_array_equal(before, after)  # the user's matrix as it was
        got = other.uns[UNS_KEY]
        assert got["n_nonzero"] == expected["n_nonzero"] == x.nnz
        np.testing.assert_allclose(got["library_log_means"], expected["library_log_means"])
    with pytest.raises(ValueError, match="negative values"):  # a negative sum stays refused
        bad = _split_entries(x, x.data, -x.data - 1)
        pp.setup_anndata(ad.AnnData(bad))


def _arrays(m) -> list[np.ndarray]:
    return [m.data, m.indices, m.indptr]
