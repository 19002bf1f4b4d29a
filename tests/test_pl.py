import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import scanpy as sc

import cellvae


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def scvi_trained():
    adata = cellvae.datasets.synthetic(120, 25, n_batches=2)
    cellvae.SCVI.setup_anndata(adata, batch_key="batch")
    model = cellvae.SCVI(adata, n_latent=4, n_hidden=16).train(max_epochs=2, progress_bar=False)
    adata.obsm["X_scVI"] = model.get_latent_representation()
    return adata, model


# ---------------------------------------------------------------- history
def test_history_one_panel_per_key_train_and_validation(scvi_trained):
    _, model = scvi_trained
    axes = cellvae.pl.history(model, show=False)
    assert len(axes) == 3
    assert axes[0].get_title() == "negative ELBO per cell"
    for ax, key in zip(axes, ("elbo", "reconstruction", "kl_local")):
        assert [line.get_label() for line in ax.lines] == ["train", "validation"]
        assert ax.get_xlabel() == "epoch"
        train, val = ax.lines
        np.testing.assert_array_equal(train.get_xdata(), [0, 1])
        np.testing.assert_allclose(train.get_ydata(), model.history[f"train_{key}"])
        np.testing.assert_allclose(val.get_ydata(), model.history[f"validation_{key}"])


def test_history_single_key_plain_column_and_given_axes(scvi_trained):
    _, model = scvi_trained
    ax = cellvae.pl.history(model, keys="kl_weight", show=False)
    assert len(ax.lines) == 1 and ax.lines[0].get_label() == "kl_weight"
    fig, given = plt.subplots(1, 2)
    out = cellvae.pl.history(model, keys=("elbo", "lr"), ax=given, show=False)
    assert out == list(given)
    assert len(given[0].lines) == 2 and len(given[1].lines) == 1
    with pytest.raises(ValueError, match="axes for"):
        cellvae.pl.history(model, keys=("elbo", "lr"), ax=given[0], show=False)


def test_history_sources_and_errors(scvi_trained):
    adata, model = scvi_trained
    ax = cellvae.pl.history(model.history, keys="elbo", show=False)
    assert len(ax.lines) == 2
    with pytest.raises(KeyError, match="available"):
        cellvae.pl.history(model, keys="nope", show=False)
    untrained = cellvae.SCVI(adata)
    with pytest.raises(ValueError, match="train"):
        cellvae.pl.history(untrained, show=False)
    # no validation set: train curve only
    no_val = cellvae.SCVI(adata, n_hidden=8).train(
        max_epochs=1, validation_size=0.0, progress_bar=False
    )
    ax = cellvae.pl.history(no_val, keys="elbo", show=False)
    assert [line.get_label() for line in ax.lines] == ["train"]


def test_history_from_tl_record():
    adata = cellvae.datasets.synthetic(100, 20)
    cellvae.tl.scvi(adata, batch_key="batch", max_epochs=2, progress_bar=False, n_hidden=16)
    axes = cellvae.pl.history(adata, keys=["elbo"], show=False)
    assert len(axes) == 1 and len(axes[0].lines) == 2
    assert list(axes[0].lines[0].get_xdata()) == [0, 1]
    # a second record: the choice is the user's, by uns_key
    cellvae.tl.scvi(
        adata, batch_key="batch", max_epochs=3, progress_bar=False, n_hidden=16, key_added="X_b"
    )
    with pytest.raises(ValueError, match=r"several training histories.*uns_key='scvi'"):
        cellvae.pl.history(adata, show=False)
    ax = cellvae.pl.history(adata, keys="elbo", uns_key="X_b", show=False)
    assert list(ax.lines[0].get_xdata()) == [0, 1, 2]
    with pytest.raises(KeyError, match=r"uns\['nope'\] holds no training history"):
        cellvae.pl.history(adata, uns_key="nope", show=False)
    plt.close("all")


def test_history_save(scvi_trained, tmp_path):
    _, model = scvi_trained
    old = sc.settings.figdir
    sc.settings.figdir = tmp_path
    try:
        cellvae.pl.history(model, show=False, save="_scvi.png")
        cellvae.pl.history(model, keys="elbo", show=False, save=True)
    finally:
        sc.settings.figdir = old
    assert (tmp_path / "history_scvi.png").stat().st_size > 0
    assert (tmp_path / f"history.{sc.settings.file_format_figs}").stat().st_size > 0


# ---------------------------------------------------------------- latent
def test_latent_writes_own_keys_and_draws_all_cells(scvi_trained, caplog):
    adata, _ = scvi_trained
    adata = adata.copy()
    adata.obsm["X_umap"] = np.zeros((adata.n_obs, 2))
    with caplog.at_level("INFO", logger="cellvae.pl"):
        axes = cellvae.pl.latent(adata, color=["batch", "cell_type"], show=False)
    assert len(axes) == 2
    assert [ax.get_title() for ax in axes] == ["batch", "cell_type"]
    for ax in axes:
        offsets = [c.get_offsets() for c in ax.collections if len(c.get_offsets())]
        assert sum(len(o) for o in offsets) == adata.n_obs
        assert ax.get_xlabel() == "UMAP1 (scVI)"
    assert adata.obsm["X_umap_scVI"].shape == (adata.n_obs, 2)
    assert adata.uns["neighbors_scVI"]["params"]["use_rep"] == "X_scVI"
    assert "neighbors_scVI_connectivities" in adata.obsp
    assert "X_umap_scVI" in adata.uns
    # the user's own UMAP and neighbours are untouched
    assert not adata.obsm["X_umap"].any() and "neighbors" not in adata.uns
    assert "obsm['X_umap_scVI']" in caplog.text
    # scanpy can reuse the embedding
    ax = sc.pl.embedding(adata, basis="X_umap_scVI", color="batch", show=False)
    np.testing.assert_allclose(ax.collections[0].get_offsets(), adata.obsm["X_umap_scVI"])


def test_latent_custom_key_given_axes_and_errors(scvi_trained):
    adata, _ = scvi_trained
    adata = adata.copy()
    adata.obsm["latent"] = adata.obsm["X_scVI"][:, :2] + 1.0
    fig, ax = plt.subplots()
    out = cellvae.pl.latent(adata, key="latent", color="batch", ax=ax, show=False, n_neighbors=5)
    assert out is ax
    assert "X_umap_latent" in adata.obsm and "neighbors_latent" in adata.uns
    with pytest.raises(KeyError, match="cellvae.tl.scvi"):
        cellvae.pl.latent(adata, key="X_missing", show=False)
    with pytest.raises(ValueError, match="copy"):
        cellvae.pl.latent(adata[:50], show=False)
    # an unknown colour is caught before the neighbours and the UMAP are computed and written
    fresh = adata.copy()
    del fresh.obsm["X_umap_latent"], fresh.uns["neighbors_latent"]
    with pytest.raises(KeyError, match=r"color \['nope'\] is neither"):
        cellvae.pl.latent(fresh, key="latent", color=["batch", "nope"], show=False)
    assert "X_umap_latent" not in fresh.obsm and "neighbors_latent" not in fresh.uns
    gene = str(fresh.var_names[0])
    cellvae.pl.latent(fresh, key="latent", color=[gene, "batch"], show=False, n_neighbors=5)
    plt.close("all")


def test_latent_keys_survive_write_h5ad(scvi_trained, tmp_path):
    adata, _ = scvi_trained
    adata = adata.copy()
    cellvae.pl.latent(adata, color="batch", show=False)
    adata.write_h5ad(tmp_path / "a.h5ad")
    back = sc.read_h5ad(tmp_path / "a.h5ad")
    np.testing.assert_array_equal(back.obsm["X_umap_scVI"], adata.obsm["X_umap_scVI"])
    assert isinstance(back.obs, pd.DataFrame)


# ---------------------------------------------------------------- TOTALVI
@pytest.fixture(scope="module")
def totalvi_trained():
    if not hasattr(cellvae, "TOTALVI"):
        pytest.skip("cellvae.TOTALVI is not available")
    adata = cellvae.datasets.synthetic(120, 25, n_proteins=4, n_batches=2)
    cellvae.TOTALVI.setup_anndata(
        adata, batch_key="batch", protein_expression_obsm_key="protein_expression"
    )
    model = cellvae.TOTALVI(adata, n_latent=4, n_hidden=16).train(max_epochs=2, progress_bar=False)
    return adata, model


def test_protein_denoised_from_model_and_obsm(totalvi_trained):
    adata, model = totalvi_trained
    axes = cellvae.pl.protein_denoised(
        adata, proteins=["prot0", "prot2"], model=model, color="cell_type", show=False
    )
    assert [ax.get_title() for ax in axes] == ["prot0", "prot2"]
    _, denoised = model.get_normalized_expression(protein_list=["prot0", "prot2"])
    raw = adata.obsm["protein_expression"]
    for ax, name in zip(axes, ["prot0", "prot2"]):
        (points,) = ax.collections
        offsets = points.get_offsets()
        assert len(offsets) == adata.n_obs
        np.testing.assert_allclose(offsets[:, 0], np.log1p(raw[name]), rtol=1e-6)
        np.testing.assert_allclose(offsets[:, 1], np.log1p(denoised[name]), rtol=1e-5)
        assert ax.get_xlabel() == "log1p(raw counts)"
    legend = axes[-1].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["type0", "type1", "type2"]
    # from obsm (as cellvae.tl.totalvi writes it), a plain array named by the setup, no log
    adata = adata.copy()
    adata.obsm["protein_denoised"] = model.get_normalized_expression(return_numpy=True)[1]
    ax = cellvae.pl.protein_denoised(adata, proteins="prot1", log=False, show=False)
    offsets = ax.collections[0].get_offsets()
    np.testing.assert_allclose(offsets[:, 0], raw["prot1"])
    np.testing.assert_allclose(offsets[:, 1], adata.obsm["protein_denoised"][:, 1], rtol=1e-6)


def test_protein_denoised_after_tl_scvi_replaced_the_setup():
    # tl.scvi after tl.totalvi registers the AnnData again without proteins; the plot of
    # tl.totalvi's results finds the raw proteins from tl.totalvi's record in uns
    adata = cellvae.datasets.synthetic(80, 12, n_proteins=3)
    kw = {"max_epochs": 1, "progress_bar": False, "labels_key": "cell_type"}
    cellvae.tl.totalvi(adata, batch_key="batch", **kw)
    cellvae.tl.scvi(adata, batch_key="batch", **kw)
    assert "protein_expression_obsm_key" not in adata.uns["cellvae"]
    for key in ("scvi", "totalvi"):  # the records name the whole setup
        assert adata.uns[key]["params"]["labels_key"] == "cell_type"
    assert adata.uns["totalvi"]["params"]["protein_expression_obsm_key"] == "protein_expression"
    ax = cellvae.pl.protein_denoised(adata, proteins="prot1", log=False, show=False)
    offsets = ax.collections[0].get_offsets()
    np.testing.assert_allclose(offsets[:, 0], adata.obsm["protein_expression"]["prot1"])
    np.testing.assert_allclose(offsets[:, 1], adata.obsm["protein_denoised"]["prot1"], rtol=1e-6)


def test_protein_denoised_errors(totalvi_trained, scvi_trained):
    adata, model = totalvi_trained
    rna_adata, rna_model = scvi_trained
    with pytest.raises(TypeError, match="must be a trained cellvae.TOTALVI, got SCVI"):
        cellvae.pl.protein_denoised(rna_adata, proteins="prot0", model=rna_model, show=False)
    with pytest.raises(KeyError, match="protein_denoised"):
        cellvae.pl.protein_denoised(adata, proteins="prot0", show=False)
    with pytest.raises(KeyError, match="nope"):
        cellvae.pl.protein_denoised(adata, proteins="nope", model=model, show=False)
    with pytest.raises(ValueError, match="at least one"):
        cellvae.pl.protein_denoised(adata, proteins=[], model=model, show=False)
    with pytest.raises(ValueError, match=r"Each protein once: \['prot0'\]"):
        cellvae.pl.protein_denoised(adata, proteins=["prot0", "prot0"], model=model, show=False)
    with pytest.raises(ValueError, match=r"Each protein once"):
        cellvae.pl.foreground_probability(
            adata, proteins=["prot1", "prot1"], model=model, groupby="batch", show=False
        )
    one = adata.copy()
    one.obsm["one"] = np.ones((one.n_obs, 1))
    with pytest.raises(ValueError, match=r"obsm\['one'\] has shape \(120, 1\): a basis needs two"):
        cellvae.pl.foreground_probability(one, proteins="prot0", model=model, basis="one")


def test_protein_plots_with_integer_protein_columns():
    # a DataFrame made from an array has the columns 0, 1, ...: the setup names them '0', '1'
    adata = cellvae.datasets.synthetic(60, 12, n_proteins=3, random_state=2)
    frame = adata.obsm["protein_expression"]
    adata.obsm["protein_expression"] = pd.DataFrame(frame.to_numpy(), index=adata.obs_names)
    cellvae.TOTALVI.setup_anndata(adata, protein_expression_obsm_key="protein_expression")
    model = cellvae.TOTALVI(adata, n_latent=2, n_hidden=8).train(max_epochs=1, progress_bar=False)
    assert model.registry_.protein_names == ("0", "1", "2")
    for name in (1, "1"):
        ax = cellvae.pl.protein_denoised(adata, proteins=name, model=model, log=False, show=False)
        offsets = ax.collections[0].get_offsets()
        np.testing.assert_allclose(offsets[:, 0], frame.to_numpy()[:, 1])
        assert ax.get_title() == "1"


def test_foreground_probability_violin_and_embedding(totalvi_trained):
    adata, model = totalvi_trained
    adata = adata.copy()
    prob = model.get_protein_foreground_probability(adata)
    ax = cellvae.pl.foreground_probability(
        adata, proteins="prot0", model=model, groupby="cell_type", show=False
    )
    assert [t.get_text() for t in ax.get_xticklabels()] == ["type0", "type1", "type2"]
    assert ax.get_ylabel() == "foreground probability"
    with pytest.raises(KeyError, match="cellvae.pl.latent"):
        cellvae.pl.foreground_probability(adata, proteins="prot0", model=model, show=False)
    adata.obsm["X_totalVI"] = model.get_latent_representation()
    cellvae.pl.latent(adata, key="X_totalVI", show=False)
    with pytest.raises(KeyError, match=r"= model.get_protein_foreground_probability\(\)"):
        cellvae.pl.foreground_probability(adata, proteins="prot0", show=False)
    adata.obsm["protein_foreground_probability"] = prob
    axes = cellvae.pl.foreground_probability(adata, proteins=["prot0", "prot3"], show=False)
    assert len(axes) == 2
    for ax, name in zip(axes, ["prot0", "prot3"]):
        (points,) = ax.collections
        assert len(points.get_offsets()) == adata.n_obs
        np.testing.assert_allclose(np.sort(points.get_array()), np.sort(prob[name]), rtol=1e-6)
        assert points.get_clim() == (0.0, 1.0)
        assert ax.get_title() == name
    # drawn in increasing probability, so positive cells are on top
    assert np.all(np.diff(axes[0].collections[0].get_array()) >= 0)


def test_saved_figures_are_closed_as_in_scanpy(scvi_trained, tmp_path):
    _, model = scvi_trained
    old = sc.settings.figdir
    sc.settings.figdir = tmp_path
    try:
        plt.close("all")
        for i in range(3):
            axes = cellvae.pl.history(model, show=False, save=f"_{i}.png")
        assert plt.get_fignums() == []  # a loop of saves leaves no figure open
        assert axes is not None  # still returned, as scanpy returns them
        cellvae.pl.history(model, show=False)
        assert len(plt.get_fignums()) == 1  # not saved: left open for the user
    finally:
        sc.settings.figdir = old
        plt.close("all")
    assert (tmp_path / "history_2.png").stat().st_size > 0


def test_latent_under_scanpy_autosave_writes_one_file(scvi_trained, tmp_path):
    # scanpy's own autosave inside pl.latent wrote a second file under scanpy's name
    adata, _ = scvi_trained
    adata = adata.copy()
    old = sc.settings.figdir, sc.settings.autosave
    sc.settings.figdir, sc.settings.autosave = tmp_path, True
    try:
        cellvae.pl.latent(adata, color="batch", show=False)
    finally:
        sc.settings.figdir, sc.settings.autosave = old
    assert [p.name for p in tmp_path.iterdir()] == [f"latent.{sc.settings.file_format_figs}"]
