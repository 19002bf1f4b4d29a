import json
import os
import sys
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import special
from sklearn.neighbors import NearestNeighbors

import cellvae
from cellvae import _kernels
from cellvae._data import TensorData
from cellvae._registry import UNS_KEY, Registry
from cellvae._sparse import (
    CSRBatch,
    _column_order,
    _starts_in_sorted,
    hstack,
    row_sums,
    sparse_linear,
)
from cellvae.module import VAE
from cellvae.module._base import rows_of, tile_cells
from cellvae.nn import DecoderSCVI, Dropout, Encoder, FCLayers
from cellvae.train import TrainConfig, TrainingError, train_module


def _without_counts(adata, rows):
    """A copy of ``adata`` whose CSR counts are empty in ``rows``."""
    out = adata.copy()
    for row in rows:
        out.X.data[out.X.indptr[row] : out.X.indptr[row + 1]] = 0
    out.X.eliminate_zeros()
    return out


def _setup(n_obs=300, n_vars=40, **kw):
    adata = cellvae.datasets.synthetic(n_obs, n_vars, **kw)
    cellvae.SCVI.setup_anndata(adata, batch_key="batch", labels_key="cell_type")
    return adata


@pytest.fixture(scope="module")
def trained():
    adata = _setup(300, 40, n_batches=2)
    model = cellvae.SCVI(adata, n_latent=4).train(max_epochs=5, progress_bar=False)
    return adata, model


# ---------------------------------------------------------------- layers
@pytest.mark.parametrize("compiled", [True, False])  # the kernels' SplitMix64 lanes, or randint
@pytest.mark.parametrize("p", [0.1, 0.2, 0.5])
def test_dropout_rate_scaling_and_independence(p, compiled, monkeypatch):
    monkeypatch.setattr(_kernels, "enabled", compiled)
    torch.manual_seed(0)
    drop = Dropout(p).train()
    x = torch.rand(1000, 1001, dtype=torch.float64) + 0.5  # an odd size: partial 64-bit words
    x.requires_grad_()
    y = drop(x)
    kept = y != 0
    n = x.numel()
    # the drop rate: within 5 binomial standard deviations of p
    assert abs(1 - kept.double().mean().item() - p) < 5 * (p * (1 - p) / n) ** 0.5
    # kept entries are scaled by 1 / (1 - p): the output is unbiased
    torch.testing.assert_close(y[kept], x[kept] / (1 - p), rtol=1e-4, atol=0)
    # the gradient is the same mask and scale
    (y * 3).sum().backward()
    torch.testing.assert_close(x.grad, 3 * kept.double() / (1 - p), rtol=1e-4, atol=0)
    # neighbouring entries (lanes of one 64-bit word, and adjacent words) are independent
    k = kept.reshape(-1).double()
    for lag in (1, 2, 3, 4, 5):
        corr = torch.corrcoef(torch.stack([k[:-lag], k[lag:]]))[0, 1].item()
        assert abs(corr) < 5 / n**0.5, (lag, corr)
    # a new mask at every call
    assert (drop(x) != y).any()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_dropout_mask_in_low_precision_inputs(dtype):
    # the random lanes reach ±2^15, which float16 / bfloat16 cannot hold exactly
    torch.manual_seed(1)
    p = 0.2
    drop = Dropout(p).train()
    y = drop(torch.ones(400, 500, dtype=dtype))
    assert y.dtype == dtype
    values = set(y.unique().float().tolist())
    assert values == {0.0, torch.tensor(drop._scale, dtype=dtype).item()}  # ~1 / (1 - p)
    n = y.numel()
    assert abs((y == 0).double().mean().item() - p) < 5 * (p * (1 - p) / n) ** 0.5


def test_dropout_is_identity_in_eval_mode_and_seeded():
    x = torch.randn(64, 33)
    drop = Dropout(0.3)
    assert drop.eval()(x) is x
    drop.train()
    torch.manual_seed(5)
    a = drop(x)
    torch.manual_seed(5)
    torch.testing.assert_close(drop(x), a, rtol=0, atol=0)
    with pytest.raises(ValueError, match="Dropout probability"):
        Dropout(1.0)
    # a rate within 2^-17 of 1 keeps one entry in 2^16 (the rates are multiples of 2^-16)
    near_one = Dropout(1 - 1e-6).train()
    assert near_one._scale == 65536.0
    assert 0 < (near_one(torch.ones(1000, 1000)) != 0).sum().item() < 100
    assert "Dropout(p=0.3)" in repr(FCLayers(5, 4, dropout_rate=0.3))


def test_fc_layers_inject_covariates_changes_output():
    torch.manual_seed(0)
    fc = FCLayers(6, 5, n_cat_list=[3], n_layers=2, n_hidden=8, dropout_rate=0.0)
    fc.eval()
    x = torch.randn(4, 6).repeat(2, 1)
    c = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    out = fc(x, c)
    assert out.shape == (8, 5)
    assert not torch.allclose(out[:4], out[4:])
    # covariates with one category are ignored
    fc1 = FCLayers(6, 5, n_cat_list=[1], dropout_rate=0.0)
    assert len(fc1.linears[0].embeddings) == 0


def test_embedding_injection_equals_one_hot_concat():
    torch.manual_seed(0)
    fc = FCLayers(6, 5, n_cat_list=[3], n_layers=1, dropout_rate=0.0, use_batch_norm=False)
    layer = fc.linears[0]
    x, c = torch.randn(7, 6), torch.randint(3, (7,))
    onehot = torch.nn.functional.one_hot(c, 3).float()
    weight = torch.cat([layer.weight, layer.embeddings[0].weight], dim=0)
    expected = torch.relu(torch.cat([x, onehot], 1) @ weight + layer.bias)
    torch.testing.assert_close(fc(x, c), expected)


def test_sparse_first_layer_equals_dense():
    """A CSR batch through the first layer gives the dense result and the dense weight gradient."""
    g = torch.Generator().manual_seed(3)
    dense = torch.poisson(torch.rand(9, 40, generator=g)) * (torch.rand(9, 40, generator=g) < 0.3)
    dense[4] = 0  # a cell without counts
    fc = FCLayers(40, 6, n_cat_list=[3], n_layers=2, n_hidden=8, dropout_rate=0.0)
    fc.eval()  # batch norm with running statistics: the two calls see the same normalisation
    c = torch.randint(3, (9,), generator=g)
    out_sparse = fc(CSRBatch.from_dense(torch.log1p(dense)), c)
    grad_sparse = torch.autograd.grad(out_sparse.square().sum(), fc.linears[0].weight)[0]
    out_dense = fc(torch.log1p(dense), c)
    grad_dense = torch.autograd.grad(out_dense.square().sum(), fc.linears[0].weight)[0]
    torch.testing.assert_close(out_sparse, out_dense)
    torch.testing.assert_close(grad_sparse, grad_dense)


def test_hstack_first_layer_equals_dense():
    """[CSR counts | dense columns] through a layer = the dense concatenation, with gradients."""
    g = torch.Generator().manual_seed(5)
    counts = torch.poisson(torch.rand(7, 20, generator=g)) * (torch.rand(7, 20, generator=g) < 0.3)
    extra = torch.randn(7, 3, generator=g)
    layer = FCLayers(23, 4, n_cat_list=[2], n_layers=1, dropout_rate=0.0, use_batch_norm=False)
    c = torch.randint(2, (7,), generator=g)
    weight = layer.linears[0].weight
    outs, grads = [], []
    for x in (hstack(CSRBatch.from_dense(counts), extra), torch.cat([counts, extra], 1)):
        outs.append(layer(x, c))
        grads.append(torch.autograd.grad(outs[-1].square().sum(), weight)[0])
    torch.testing.assert_close(outs[0], outs[1])
    torch.testing.assert_close(grads[0], grads[1])
    assert grads[0][20:].abs().sum() > 0  # the dense rows of the weight get their gradient


def test_column_starts_by_binary_search_equal_bincount():
    # off the CPU the weight gradient finds where each column starts by a binary search of the
    # sorted columns (CUDA's bincount synchronises); the same offsets as bincount, empty columns
    # (also before the first and after the last stored one) included
    g = torch.Generator().manual_seed(6)
    for n_cols, n in ((40, 300), (40, 0), (7, 1), (2000, 5000)):
        col = torch.randint(3, max(n_cols - 3, 4), (n,), generator=g)
        order = torch.argsort(col, stable=True)
        counts = torch.bincount(col, minlength=n_cols)
        expected = torch.cumsum(counts, 0) - counts
        torch.testing.assert_close(_starts_in_sorted(col[order], n_cols), expected)
        cpu_order, cpu_starts = _column_order(col, n_cols)
        torch.testing.assert_close(cpu_starts, expected)
        assert torch.equal(col[cpu_order], col[order])


def test_sparse_linear_gradcheck_and_empty_batches():
    g = torch.Generator().manual_seed(4)
    dense = torch.rand(6, 30, generator=g, dtype=torch.float64)
    dense[dense > 0.25] = 0
    dense[2] = 0
    w = torch.randn(30, 5, generator=g, dtype=torch.float64, requires_grad=True)
    x = CSRBatch.from_dense(dense)
    assert torch.autograd.gradcheck(lambda w: sparse_linear(x, w), (w,))
    # reordered / repeated rows select the same entries as the dense rows
    rows = torch.tensor([5, 2, 0, 0])
    torch.testing.assert_close(sparse_linear(x.index_select(rows), w), dense[rows] @ w)
    for empty in (torch.zeros(3, 30, dtype=torch.float64), torch.zeros(0, 30, dtype=torch.float64)):
        out = sparse_linear(CSRBatch.from_dense(empty), w)
        assert out.shape == (empty.shape[0], 5) and not out.any()
        (grad,) = torch.autograd.grad(out.sum(), w, allow_unused=True)
        assert grad is None or not grad.any()


def test_sparse_linear_of_an_hstack_equals_the_dense_product():
    """``[CSR | dense] @ W``: value and both gradients (weight, dense columns) by gradcheck and
    against the dense product, including a batch with no stored entry."""
    g = torch.Generator().manual_seed(7)
    w = torch.randn(33, 4, generator=g, dtype=torch.float64, requires_grad=True)
    for counts in (torch.rand(6, 30, generator=g, dtype=torch.float64), torch.zeros(6, 30)):
        counts = counts.to(torch.float64)
        counts[counts > 0.3] = 0
        extra = torch.randn(6, 3, generator=g, dtype=torch.float64, requires_grad=True)
        x = hstack(CSRBatch.from_dense(counts), extra)
        ref = torch.cat([counts, extra], 1) @ w
        torch.testing.assert_close(sparse_linear(x, w), ref)
        gw, ge = torch.autograd.grad((sparse_linear(x, w) * ref.detach()).sum(), (w, extra))
        rw, re = torch.autograd.grad((ref * ref.detach()).sum(), (w, extra))
        torch.testing.assert_close(gw, rw)
        torch.testing.assert_close(ge, re)
        assert torch.autograd.gradcheck(
            lambda w, e, c=counts: sparse_linear(hstack(CSRBatch.from_dense(c), e), w), (w, extra)
        )


def test_row_sums_of_csr_equal_dense_sums():
    # random values with empty rows (first, middle, last), float32 and float64, and empty batches
    g = torch.Generator().manual_seed(11)
    for dtype in (torch.float32, torch.float64):
        dense = torch.rand(40, 300, generator=g, dtype=dtype) * 50
        dense[torch.rand(40, 300, generator=g) > 0.1] = 0
        dense[[0, 17, 39]] = 0
        got = row_sums(CSRBatch.from_dense(dense))
        assert got.shape == (40, 1) and got.dtype == dtype
        torch.testing.assert_close(got, dense.sum(-1, keepdim=True, dtype=torch.float64).to(dtype))
    for empty in (torch.zeros(3, 30), torch.zeros(0, 30)):
        assert torch.equal(row_sums(CSRBatch.from_dense(empty)), torch.zeros(len(empty), 1))


@pytest.mark.parametrize("dispersion", ["gene", "gene-batch", "gene-label", "gene-cell"])
def test_decoder_contract(dispersion):
    dec = DecoderSCVI(4, 30, n_cat_list=[2])
    z, lib = torch.randn(5, 4), torch.full((5, 1), 3.0)
    px_scale, px_r, px_rate, px_dropout = dec(dispersion, z, lib, torch.tensor([0, 1, 0, 1, 0]))
    assert px_scale.shape == px_rate.shape == px_dropout.shape == (5, 30)
    torch.testing.assert_close(px_scale.sum(-1), torch.ones(5))
    torch.testing.assert_close(px_rate, px_scale * np.exp(3.0))
    assert (px_r is None) == (dispersion != "gene-cell")


def test_decoder_builds_only_the_output_layers_in_use():
    z, lib = torch.randn(5, 4), torch.zeros(5, 1)
    dec = DecoderSCVI(4, 30, gene_cell_dispersion=False, zero_inflation=False)
    px_scale, px_r, px_rate, px_dropout = dec("gene", z, lib)
    assert px_r is None and px_dropout is None and px_rate.shape == (5, 30)
    assert dec.px_r_decoder is None and dec.px_dropout_decoder is None
    with pytest.raises(ValueError, match="gene_cell_dispersion=True"):
        dec("gene-cell", z, lib)
    n_head = 30 * 128 + 30  # one output layer's weight and bias
    sizes = {}
    for likelihood in ("zinb", "nb"):
        for dispersion in ("gene", "gene-cell"):
            module = VAE(30, gene_likelihood=likelihood, dispersion=dispersion)
            decoder = module.decoder
            assert (decoder.px_dropout_decoder is not None) == (likelihood == "zinb")
            assert (decoder.px_r_decoder is not None) == (dispersion == "gene-cell")
            sizes[likelihood, dispersion] = sum(p.numel() for p in decoder.parameters())
    assert sizes["zinb", "gene"] - sizes["nb", "gene"] == n_head
    assert sizes["nb", "gene-cell"] - sizes["nb", "gene"] == n_head


@pytest.mark.parametrize("dispersion", ["gene", "gene-batch"])
@pytest.mark.parametrize("size_factor", [False, True])
def test_expression_scale_equals_generative_px_scale(dispersion, size_factor):
    """The getters' shortcut (scale head only) equals the full decoder's px_scale."""
    torch.manual_seed(0)
    module = VAE(25, n_batch=3, dispersion=dispersion, use_size_factor_key=size_factor).eval()
    tensors = {
        "x": torch.poisson(torch.full((6, 25), 2.0)),
        "batch": torch.tensor([0, 1, 2, 0, 1, 2]),
        "size_factor": torch.full((6,), 2.0),
    }
    inf = module.inference(tensors, n_samples=3)  # (samples, cells, latent)
    other = torch.full((6,), 2)
    for z in (inf["qz_m"], inf["z"]):
        for batch in (None, other):
            for gene_idx in (None, torch.tensor([4, 0, 19])):
                lib = inf["library"] if z.dim() == 3 else inf["library"][0]
                gen = module.generative(z, lib, tensors, batch=batch, gene_idx=gene_idx)
                got = module.expression_scale(z, tensors, batch=batch, gene_idx=gene_idx)
                torch.testing.assert_close(got, gen["px_scale"])


@pytest.mark.parametrize("dispersion", ["gene", "gene-batch", "gene-label"])
def test_dispersion_of_each_cell_is_its_categorys_row(dispersion):
    """θ of each cell is exp(px_r) of its batch (the ``batch`` override's) or label, per gene."""
    torch.manual_seed(0)
    module = VAE(25, n_batch=3, n_labels=4, dispersion=dispersion)
    with torch.no_grad():
        module.px_r.normal_()
    tensors = {
        "x": torch.poisson(torch.full((7, 25), 2.0)),
        "batch": torch.tensor([0, 1, 2, 0, 1, 2, 1]),
        "labels": torch.tensor([3, 0, 1, 2, 3, 0, 2]),
    }
    table = np.exp(module.px_r.detach().double().numpy())
    inf = module.inference(tensors, n_samples=2)
    other = torch.tensor([2, 2, 0, 1, 0, 0, 2])
    for z, lib in ((inf["qz_m"], inf["library"][0]), (inf["z"], inf["library"])):
        for batch in (None, other):
            for gene_idx in (None, torch.tensor([4, 0, 19])):
                gen = module.generative(z, lib, tensors, batch=batch, gene_idx=gene_idx)
                codes = {"gene-batch": tensors["batch"] if batch is None else batch}
                codes["gene-label"] = tensors["labels"]
                want = table if dispersion == "gene" else table[codes[dispersion].numpy()]
                want = want if gene_idx is None else want[..., gene_idx.numpy()]
                got = gen["px"].theta.expand(gen["px"].mu.shape).detach().double().numpy()
                np.testing.assert_allclose(got, np.broadcast_to(want, got.shape), rtol=1e-6)


def test_decoder_gene_subset_matches_full_output():
    dec = DecoderSCVI(4, 30)
    z, lib = torch.randn(5, 4), torch.zeros(5, 1)
    full = dec("gene-cell", z, lib)
    idx = torch.tensor([3, 7, 29])
    sub = dec("gene-cell", z, lib, gene_idx=idx)
    for a, b in zip(full, sub):
        torch.testing.assert_close(a[:, idx], b)


def test_encoder_logistic_normal_latent_on_simplex():
    enc = Encoder(12, 5, distribution="ln")
    q_m, q_v, z = enc(torch.randn(6, 12))
    torch.testing.assert_close(z.sum(-1), torch.ones(6))
    assert (q_v > 0).all()


@pytest.mark.parametrize("dispersion", ["gene", "gene-batch", "gene-label", "gene-cell"])
@pytest.mark.parametrize("likelihood", ["zinb", "nb", "poisson", "normal"])
@pytest.mark.parametrize("latent", ["normal", "ln"])
def test_vae_shapes_all_options(dispersion, likelihood, latent):
    adata = _setup(40, 15, n_batches=2)
    td = TensorData.from_adata(adata)
    module = VAE(
        15,
        n_batch=2,
        n_labels=3,
        n_latent=3,
        dispersion=dispersion,
        gene_likelihood=likelihood,
        latent_distribution=latent,
    )
    batch = td[torch.arange(40)]
    inf = module.inference(batch)
    assert inf["z"].shape == (40, 3)
    gen = module.generative(inf["z"], inf["library"], batch)
    assert gen["px_rate"].shape == (40, 15)
    out = module(batch)
    assert out.reconstruction.shape == out.kl_local.shape == (40,)
    assert torch.isfinite(out.loss)
    out.loss.backward()


def assert_same_loss_grads_mean(eager, lazy):
    """Two ``(loss, parameter gradients, mean)`` results agree (also used by test_totalvi)."""
    (loss0, grads0, mean0), (loss1, grads1, mean1) = eager, lazy
    torch.testing.assert_close(loss1, loss0, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(mean1, mean0)
    for a, b in zip(grads1, grads0, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dispersion", ["gene", "gene-cell"])
@pytest.mark.parametrize("likelihood", ["zinb", "nb", "poisson"])
@pytest.mark.parametrize("size_factor", [False, True])
def test_lazy_mean_gives_the_same_loss_and_gradients(dispersion, likelihood, size_factor):
    # the training loss builds px from the decoder's logits (softmax inside the likelihood
    # kernel where it applies); the getters' eager px_rate / px_scale path must agree with it
    adata = _setup(40, 15, n_batches=2)
    adata.obs["sf"] = np.linspace(0.5, 2.0, 40)
    kwargs = {"size_factor_key": "sf"} if size_factor else {}
    cellvae.SCVI.setup_anndata(adata, batch_key="batch", **kwargs)
    batch = TensorData.from_adata(adata)[torch.arange(40)]
    torch.manual_seed(0)
    module = VAE(
        15, n_batch=2, dispersion=dispersion, gene_likelihood=likelihood,
        use_size_factor_key=size_factor,
    )  # fmt: skip
    module.eval()  # no dropout, running batch-norm statistics: both passes see the same network
    inf = module.inference(batch)
    results = []
    for lazy in (False, True):
        gen = module.generative(inf["z"], inf["library"], batch, lazy_mean=lazy)
        softmax_kernel = lazy and likelihood != "poisson" and not size_factor
        assert (gen["px_scale"] is None) == softmax_kernel
        loss = module.loss(batch, inf, gen).loss
        params = list(module.parameters())
        grads = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)
        results.append((loss, grads, gen["px"].mean))
    assert_same_loss_grads_mean(*results)


def test_latent_library_and_covariates():
    adata = cellvae.datasets.synthetic(60, 12, n_batches=3)
    adata.obs["donor"] = ["a", "b", "c"] * 20
    adata.obs["pct"] = np.linspace(0, 1, 60)
    cellvae.SCVI.setup_anndata(
        adata,
        batch_key="batch",
        categorical_covariate_keys=["donor"],
        continuous_covariate_keys=["pct"],
    )
    model = cellvae.SCVI(adata, use_observed_lib_size=False, n_latent=3)
    model.train(max_epochs=2, progress_bar=False)
    assert model.module.l_encoder is not None
    assert model.get_latent_representation().shape == (60, 3)
    assert np.isfinite(model.get_elbo())
    # with n_samples=1 the latent library is its posterior mean, as z is: the same at every call
    got = model.get_normalized_expression(library_size="latent", return_numpy=True)
    np.testing.assert_array_equal(
        got, model.get_normalized_expression(library_size="latent", return_numpy=True)
    )
    with torch.no_grad():
        cells = TensorData.from_adata(adata).to(model.device)[torch.arange(60)]
        inf = model.module.inference(cells)
    scale = model.get_normalized_expression(return_numpy=True)
    want = scale * np.exp(inf["ql_m"].cpu().numpy() + inf["ql_v"].cpu().numpy() / 2)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # the library decoded is the one get_latent_library_size reports (log-normal mean)
    np.testing.assert_allclose(got.sum(1), model.get_latent_library_size().ravel(), rtol=1e-4)
    mean = model.get_likelihood_parameters()["mean"]
    np.testing.assert_allclose(mean.sum(1), model.get_latent_library_size().ravel(), rtol=1e-4)


def test_logistic_normal_latent_mean_does_not_depend_on_the_global_rng():
    adata = _setup(60, 12)
    model = cellvae.SCVI(adata, latent_distribution="ln", n_latent=3)
    model.train(max_epochs=1, progress_bar=False)
    torch.manual_seed(1)
    first = model.get_latent_representation()
    torch.manual_seed(2)
    np.testing.assert_array_equal(first, model.get_latent_representation())
    np.testing.assert_allclose(first.sum(1), 1.0, rtol=1e-5)
    # a cell's mean does not depend on the other cells of its minibatch
    np.testing.assert_allclose(model.get_latent_representation(indices=[5])[0], first[5], atol=1e-6)
    np.testing.assert_allclose(model.get_latent_representation(batch_size=7), first, atol=1e-6)
    # and it is the mean of the softmax of q(z | x): against 200,000 float64 draws
    mean, var = (
        v[:8].astype(np.float64) for v in model.get_latent_representation(return_dist=True)
    )
    draws = np.random.default_rng(0).standard_normal((200_000, 1, 3))
    logits = mean + np.sqrt(var) * draws
    want = special.softmax(logits, axis=-1).mean(0)
    np.testing.assert_allclose(first[:8], want, atol=3e-3)


def test_bad_options_raise_early():
    adata = _setup(40, 10)
    with pytest.raises(ValueError, match="gene_likelihood must be one of"):
        cellvae.SCVI(adata, gene_likelihood="zip")
    with pytest.raises(TypeError, match="Unknown SCVI options") as err:
        cellvae.SCVI(adata, n_hiden=3)
    # the constructor's named parameters are among the allowed, the closest one suggested
    assert "did you mean 'n_hidden'" in str(err.value) and "'n_latent'" in str(err.value)


# ---------------------------------------------------------------- training
def test_training_lowers_validation_elbo_on_kang():
    adata = cellvae.datasets.kang_ifnb()
    top = np.argsort(-np.asarray(adata.X.sum(0)).ravel())[:800]
    adata = adata[:, np.sort(top)].copy()
    cellvae.SCVI.setup_anndata(adata, batch_key="batch")
    model = cellvae.SCVI(adata).train(max_epochs=6, progress_bar=False)
    val = model.history["validation_elbo"].to_numpy()
    assert np.isfinite(val).all()
    assert val[-1] < val[0] - 1.0


def test_same_seed_identical_latent_and_global_rng_untouched():
    adata = _setup(200, 30)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    z1 = cellvae.SCVI(adata).train(max_epochs=3, seed=7, progress_bar=False)
    after = torch.rand(1)
    assert torch.equal(before, after), "training must not consume the global RNG"
    z2 = cellvae.SCVI(adata).train(max_epochs=3, seed=7, progress_bar=False)
    z3 = cellvae.SCVI(adata).train(max_epochs=3, seed=8, progress_bar=False)
    l1, l2, l3 = (m.get_latent_representation() for m in (z1, z2, z3))
    np.testing.assert_array_equal(l1, l2)
    assert not np.allclose(l1, l3)


def test_seed_none_draws_a_fresh_split_and_initialisation():
    adata = _setup(200, 30)
    m1 = cellvae.SCVI(adata).train(max_epochs=1, seed=None, progress_bar=False)
    m2 = cellvae.SCVI(adata).train(max_epochs=1, seed=None, progress_bar=False)
    assert not np.array_equal(m1.validation_indices_, m2.validation_indices_)
    assert not np.allclose(m1.get_latent_representation(), m2.get_latent_representation())


def test_second_train_call_continues_and_numbers_its_epochs_on():
    adata = _setup(150, 10)
    model = cellvae.SCVI(adata).train(max_epochs=3, progress_bar=False)
    weights = {k: v.clone() for k, v in model.module.state_dict().items()}
    fresh_loss = cellvae.SCVI(adata).train(max_epochs=1, progress_bar=False).history["train_loss"]
    model.train(max_epochs=2, kl_warmup_fraction=0, progress_bar=False)
    hist = model.history
    assert list(hist.index) == [0, 1, 2, 3, 4]
    assert list(hist["kl_weight"].iloc[3:]) == [1.0, 1.0]
    # it went on from the trained weights: its first epoch is far better than a fresh model's
    assert hist["train_loss"].iloc[3] < fresh_loss.iloc[0]
    assert any(not torch.equal(v, model.module.state_dict()[k]) for k, v in weights.items())
    # a third call without validation: one row per epoch, NaN where there was none
    model.train(max_epochs=1, validation_size=0, progress_bar=False)
    hist = model.history
    assert list(hist.index) == [0, 1, 2, 3, 4, 5]
    assert hist["validation_elbo"].iloc[:5].notna().all() and np.isnan(
        hist["validation_elbo"].iloc[5]
    )


def test_kl_warmup_reaches_one_at_fraction_of_run():
    adata = _setup(150, 10)
    model = cellvae.SCVI(adata).train(max_epochs=8, progress_bar=False)
    w = model.history["kl_weight"].to_numpy()
    assert np.all(np.diff(w) >= 0)
    assert w[4] < 1.0 and w[6] == 1.0  # reaches 1 at 75% of 8 epochs


def test_trailing_batch_of_one_does_not_crash():
    adata = _setup(144, 10)  # 130 training cells = 128 + 2; 129 + 1 with the split below
    model = cellvae.SCVI(adata)
    model.train(max_epochs=1, batch_size=128, validation_size=1 - 129 / 144, progress_bar=False)
    assert len(model.train_indices_) == 129
    assert np.isfinite(model.history["train_loss"]).all()


def test_nan_guard_keeps_last_good_weights():
    """A NaN loss from epoch 2 on: every step of epoch 2 is skipped, so the parameters are those
    of the end of epoch 1, bit for bit, and so are the restored batch-norm statistics."""
    adata = _setup(100, 10)
    td = TensorData.from_adata(adata)
    torch.manual_seed(0)
    module = VAE(10, n_batch=2)
    calls = {"n": 0}
    original = module.forward

    def poisoned(tensors, kl_weight=1.0):
        calls["n"] += 1
        if calls["n"] == 4:  # the weights at the end of epoch 1, the last good one
            snapshot.update({k: v.clone() for k, v in module.state_dict().items()})
        out = original(tensors, kl_weight)
        if calls["n"] > 3:  # epoch 1 is clean, epoch 2 turns NaN
            out.loss = out.loss * float("nan")
        return out

    snapshot = {}

    module.forward = poisoned
    idx = torch.arange(100)
    config = TrainConfig(max_epochs=3, batch_size=32, progress_bar=False)
    history = {}
    with pytest.raises(TrainingError, match="epoch 2: the loss was nan and 3 of 3 steps"):
        train_module(module, td, idx[:96], idx[96:], config, history)
    assert len(history["train_loss"]) == 1
    assert any("running_var" in k for k in snapshot)  # batch-norm statistics are compared too
    restored = module.state_dict()
    assert restored.keys() == snapshot.keys()
    for k, v in restored.items():
        assert torch.equal(v, snapshot[k]), k
        assert torch.isfinite(v.float()).all()


def test_step_with_non_finite_gradient_is_skipped():
    """A finite loss whose gradient overflows (step 2 of 3): that step alone is skipped, with a
    warning; the others train, the weights stay finite, the epoch's averages are those of the
    applied steps, and training goes on to epoch 2."""
    adata = _setup(100, 10)
    td = TensorData.from_adata(adata)
    torch.manual_seed(0)
    module = VAE(10, n_batch=2)
    weight = module.decoder.px_scale_decoder.weight
    seen, losses, original = [], [], module.forward

    def hook(grad):
        seen.append(weight.detach().clone())
        return grad * float("inf") if len(seen) == 2 else grad

    def recording(tensors, kl_weight=1.0):
        out = original(tensors, kl_weight)
        if module.training:
            losses.append((float(out.loss.detach()), len(tensors["batch"])))
        return out

    weight.register_hook(hook)
    module.forward = recording
    idx = torch.arange(100)
    config = TrainConfig(max_epochs=2, batch_size=32, progress_bar=False)
    with pytest.warns(RuntimeWarning, match="Epoch 1: 1 of 3 training steps had non-finite"):
        history = train_module(module, td, idx[:96], idx[96:], config)
    assert len(seen) == 6 and len(history["train_loss"]) == 2
    assert not torch.equal(seen[0], seen[1])  # step 1 was applied
    assert torch.equal(seen[1], seen[2])  # step 2 was skipped
    assert not torch.equal(seen[2], seen[3])  # step 3 was applied
    kept = [losses[0], losses[2]]
    expected = sum(v * n for v, n in kept) / sum(n for _, n in kept)
    assert history["train_loss"][0] == pytest.approx(expected, rel=1e-6)
    for p in module.parameters():
        assert torch.isfinite(p).all()


def test_epoch_with_most_steps_skipped_stops_training():
    """Two of three steps with non-finite gradients: the epoch counts as diverged."""
    adata = _setup(100, 10)
    td = TensorData.from_adata(adata)
    torch.manual_seed(0)
    module = VAE(10, n_batch=2)
    calls = []

    def hook(grad):
        calls.append(1)
        return grad * float("nan") if len(calls) in (1, 3) else grad

    module.decoder.px_scale_decoder.weight.register_hook(hook)
    idx = torch.arange(100)
    config = TrainConfig(max_epochs=2, batch_size=32, progress_bar=False)
    history = {}
    with pytest.raises(TrainingError, match="2 of 3 steps"):
        train_module(module, td, idx[:96], idx[96:], config, history)
    assert history == {} and len(calls) == 3
    for p in module.parameters():
        assert torch.isfinite(p).all()


def test_training_ignores_and_frees_stale_gradients():
    """Gradients left on the parameters before training do not leak into the first step, and
    no gradient is kept after training (it would only hold memory)."""
    adata = _setup(100, 10)
    td = TensorData.from_adata(adata)
    idx = torch.arange(100)
    config = TrainConfig(max_epochs=2, batch_size=32, progress_bar=False, seed=3)
    states = []
    for stale in (False, True):
        torch.manual_seed(0)
        module = VAE(10, n_batch=2)
        if stale:
            for p in module.parameters():
                p.grad = torch.full_like(p, 1e3)
        train_module(module, td, idx[:90], idx[90:], config)
        assert all(p.grad is None for p in module.parameters())
        states.append(module.state_dict())
    for k, v in states[0].items():
        assert torch.equal(v, states[1][k]), k


def test_training_step_calls_no_pandas_or_scipy():
    adata = _setup(200, 20)
    td = TensorData.from_adata(adata)
    module = VAE(20, n_batch=2)
    opt = torch.optim.Adam(module.parameters())
    seen = set()

    def tracer(frame, event, arg):
        if event == "call":
            seen.add(str(frame.f_globals.get("__name__", "")).split(".")[0])
        elif event == "c_call":
            seen.add(str(getattr(arg, "__module__", None) or "").split(".")[0])

    sys.setprofile(tracer)
    try:
        for idx in torch.split(torch.randperm(200), 64):
            out = module(td[idx])
            opt.zero_grad()
            out.loss.backward()
            opt.step()
    finally:
        sys.setprofile(None)
    assert "torch" in seen and "cellvae" in seen
    # numpy may gather CSR rows on CPU; pandas, scipy and anndata never run in a step
    assert not seen & {"pandas", "scipy", "anndata"}, seen


# ---------------------------------------------------------------- batch correction
def _mixing(latent, batches, k=15):
    """Mean fraction of each cell's k neighbours from other batches, over its expected value."""
    nn_idx = NearestNeighbors(n_neighbors=k + 1).fit(latent).kneighbors(latent)[1][:, 1:]
    other = (batches[nn_idx] != batches[:, None]).mean()
    expected = 1 - sum((batches == b).mean() ** 2 for b in np.unique(batches))
    return other / expected


def test_latent_mixes_batches_better_than_pca():
    import scanpy as sc

    adata = cellvae.datasets.synthetic(600, 150, n_batches=2, n_labels=3, batch_effect=0.5)
    cellvae.SCVI.setup_anndata(adata, batch_key="batch")
    model = cellvae.SCVI(adata, n_latent=8).train(max_epochs=100, progress_bar=False)
    latent = model.get_latent_representation()
    norm = adata.copy()
    sc.pp.normalize_total(norm, target_sum=1e4)
    sc.pp.log1p(norm)
    sc.tl.pca(norm, n_comps=8, random_state=0)
    batches = adata.obs["batch"].to_numpy()
    scvi_mix, pca_mix = _mixing(latent, batches), _mixing(norm.obsm["X_pca"], batches)
    assert pca_mix < 0.2, "the synthetic batch effect should separate batches in PCA"
    assert scvi_mix > pca_mix + 0.3, (scvi_mix, pca_mix)
    # and cell types stay apart: neighbours mostly share the type
    types = adata.obs["cell_type"].to_numpy()
    nn_idx = NearestNeighbors(n_neighbors=16).fit(latent).kneighbors(latent)[1][:, 1:]
    assert (types[nn_idx] == types[:, None]).mean() > 0.8


# ---------------------------------------------------------------- getters
def test_getters_shapes(trained):
    adata, model = trained
    assert model.get_latent_representation(give_mean=False).shape == (300, 4)
    expr = model.get_normalized_expression()
    assert expr.shape == (300, 40)
    np.testing.assert_allclose(expr.sum(1), 1.0, rtol=1e-4)
    assert list(expr.index) == list(adata.obs_names)
    lat = model.get_normalized_expression(library_size="latent", return_numpy=True)
    libs = np.asarray(adata.X.sum(1)).ravel()
    np.testing.assert_allclose(lat.sum(1), libs, rtol=1e-4)
    sub = model.get_normalized_expression(gene_list=["gene3", "gene0"], indices=[5, 1])
    np.testing.assert_allclose(sub.to_numpy(), expr.iloc[[5, 1]][["gene3", "gene0"]], rtol=1e-5)
    samples = model.get_normalized_expression(n_samples=4, return_numpy=True)
    assert samples.shape == (300, 40) and np.isfinite(samples).all()
    assert model.posterior_predictive_sample(n_samples=2).shape == (300, 40, 2)
    rec = model.get_reconstruction_error()
    assert list(rec) == ["reconstruction_loss"] and rec["reconstruction_loss"] > 0
    torch.manual_seed(7)
    per_cell = model.get_reconstruction_error(return_mean=False)["reconstruction_loss"]
    torch.manual_seed(7)
    elbo_cells = model.get_elbo(return_mean=False)
    assert per_cell.shape == elbo_cells.shape == (300,)
    assert (-elbo_cells >= per_cell - 1e-3).all()  # the same draws of z: −ELBO = rec + KL ≥ rec
    torch.manual_seed(7)
    assert np.isclose(model.get_elbo(), elbo_cells.mean(), rtol=1e-5)
    mll_cells = model.get_marginal_ll(n_mc_samples=20, indices=range(10), return_mean=False)
    assert mll_cells.shape == (10,) and np.isfinite(mll_cells).all()
    assert model.get_elbo(indices=[], return_mean=False).shape == (0,)
    elbo, mll = model.get_elbo(), model.get_marginal_ll(n_mc_samples=50, indices=range(50))
    assert np.isfinite(elbo) and np.isfinite(mll)
    assert mll > model.get_elbo(indices=range(50)) - 1.0  # importance sampling is tighter


def test_normalized_expression_samples_without_the_mean(trained):
    adata, model = trained
    kw = dict(transform_batch=["batch0", "batch1"], library_size="latent", indices=range(50))
    kw["batch_size"] = 16  # the same chunks, so the same draws of z from the same seed
    torch.manual_seed(3)
    mean = model.get_normalized_expression(n_samples=5, **kw)
    torch.manual_seed(3)
    samples = model.get_normalized_expression(n_samples=5, return_mean=False, **kw)
    assert isinstance(samples, np.ndarray) and samples.shape == (5, 50, 40)
    np.testing.assert_allclose(samples.mean(0), mean.to_numpy(), rtol=1e-5)
    assert not np.allclose(samples[0], samples[1])  # each sample is its own draw of z
    one = model.get_normalized_expression(indices=range(50), return_mean=False)
    assert isinstance(one, pd.DataFrame) and one.shape == (50, 40)  # one sample: cells × genes
    with pytest.warns(UserWarning, match="return_numpy=False is overridden"):
        forced = model.get_normalized_expression(n_samples=2, return_mean=False, return_numpy=False)
    assert forced.shape == (2, 300, 40)
    with pytest.raises(TypeError, match="return_mean must be True or False"):
        model.get_normalized_expression(n_samples=2, return_mean="no")


@pytest.mark.parametrize("likelihood", ["zinb", "nb", "poisson"])
@pytest.mark.parametrize("dispersion", ["gene", "gene-batch", "gene-cell"])
@pytest.mark.parametrize("observed_library", [True, False])
def test_importance_weights_match_scipy_float64(likelihood, dispersion, observed_library):
    # marginal_ll decodes its samples as one flat minibatch of tiled cells (covariates too) and
    # sums the likelihood with log_prob_sum (the compiled kernel for the NB / ZINB): each log
    # weight must equal log p(x | z, l) + log p(z) + log p(l) - log q(z, l | x) in float64
    from scipy import stats

    adata = cellvae.datasets.synthetic(40, 15, n_batches=2, random_state=3)
    adata.obs["donor"] = pd.Categorical(["a", "b", "c", "d"] * 10)
    adata.obs["pct"] = np.linspace(0.0, 1.0, 40)
    cellvae.SCVI.setup_anndata(
        adata, batch_key="batch", categorical_covariate_keys=["donor"],
        continuous_covariate_keys=["pct"],
    )  # fmt: skip
    cells = TensorData.from_adata(adata)[torch.arange(40)]
    torch.manual_seed(0)
    module = VAE(
        15, n_batch=2, n_latent=4, n_continuous_cov=1, n_cats_per_cov=[4], dispersion=dispersion,
        gene_likelihood=likelihood, use_observed_lib_size=observed_library,
        library_log_means=[2.0, 3.0], library_log_vars=[0.5, 1.5],
    ).eval()  # fmt: skip
    if dispersion != "gene-cell":  # a per-cell dispersion comes from the decoder instead
        with torch.no_grad():
            module.px_r.add_(torch.randn_like(module.px_r))
    x = cells["x"].dense().double().numpy()
    n = 3
    for counts in (cells["x"], cells["x"].dense()):  # CSR minibatch and dense counts
        tensors = {**cells, "x": counts}
        with torch.no_grad():
            inf = module.inference(tensors)
            torch.manual_seed(1)
            got = module._log_importance_weights(tile_cells(tensors, n), inf, n).numpy()
            torch.manual_seed(1)  # the same draws of z (and of the library), in the same order
            z = inf["qz_m"] + inf["qz_v"].sqrt() * torch.randn(n, 40, 4)
            if observed_library:
                lib = inf["library"].expand(n, 40, 1)
            else:
                lib = inf["ql_m"] + inf["ql_v"].sqrt() * torch.randn(n, 40, 1)
            px = module.generative(z, lib, tensors)["px"]  # 3-D: the elementwise parameters
        f64 = lambda t: torch.broadcast_to(t, (n, 40, 15)).double().numpy()
        if likelihood == "poisson":
            log_px = stats.poisson.logpmf(x, f64(px.rate))
        else:
            mu, theta = f64(px.mu), f64(px.theta)
            log_px = stats.nbinom.logpmf(x, theta, theta / (theta + mu))
            if likelihood == "zinb":
                pi = f64(px.zi_logits)
                log_w0, log_w1 = -np.logaddexp(0, -pi), -np.logaddexp(0, pi)  # log σ(±π)
                zero = np.logaddexp(log_w0, log_w1 + log_px)
                log_px = np.where(x == 0, zero, log_w1 + log_px)
        z64, m64, s64 = (t.double().numpy() for t in (z, inf["qz_m"], inf["qz_v"].sqrt()))
        want = log_px.sum(-1) + stats.norm.logpdf(z64).sum(-1)
        want -= stats.norm.logpdf(z64, m64, s64).sum(-1)
        if not observed_library:
            b = cells["batch"].numpy()
            l64 = lib.double().numpy()[..., 0]
            prior_m, prior_s = np.array([2.0, 3.0])[b], np.sqrt(np.array([0.5, 1.5]))[b]
            want += stats.norm.logpdf(l64, prior_m, prior_s)
            ql_m, ql_s = inf["ql_m"].double().numpy()[:, 0], inf["ql_v"].sqrt().double().numpy()
            want -= stats.norm.logpdf(l64, ql_m, ql_s[:, 0])
        assert got.shape == (n, 40)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-3)


def test_marginal_ll_draws_its_samples_in_chunks_of_bounded_size(trained):
    adata, model = trained
    module = model.module
    tensors = TensorData.from_adata(adata).to(model.device)[torch.arange(30)]
    encoded, decoded = [], []
    inference, generative = module.inference, module.generative

    def counting_inference(t, n_samples=1):
        encoded.append(n_samples)
        return inference(t, n_samples=n_samples)

    def counting_generative(z, library, t, **kwargs):
        decoded.append(len(z) // 30)  # samples decoded together, as one flat minibatch
        return generative(z, library, t, **kwargs)

    module.eval()
    with torch.no_grad():
        torch.manual_seed(0)
        whole = module.marginal_ll(tensors, 400).cpu().numpy()
        module.inference, module.generative = counting_inference, counting_generative
        try:
            torch.manual_seed(1)
            chunked = module.marginal_ll(tensors, 400, max_entries=30 * 40 * 7).cpu().numpy()
        finally:
            del module.inference, module.generative
    assert encoded == [1]  # the encoder runs once: its posterior is the same for every sample
    assert decoded == [7] * 57 + [1]  # 400 samples, at most 7 of 30 cells × 40 genes at a time
    # two estimates from independent draws agree within Monte Carlo error, and beat the ELBO
    np.testing.assert_allclose(chunked, whole, atol=2.0)
    assert abs(chunked.mean() - whole.mean()) < 0.3
    with torch.no_grad():
        elbo = -torch.stack([module(tensors).elbo for _ in range(20)]).mean(0).cpu().numpy()
    assert whole.mean() > elbo.mean()


def test_getters_follow_in_place_changes_of_the_models_anndata():
    # the tensors of the model's own AnnData are cached; scanpy's in-place filters replace the
    # AnnData's matrices and names, and the getters must read the data as it is now
    import scanpy as sc

    adata = _setup(160, 20, n_batches=2)
    model = cellvae.SCVI(adata, n_latent=3).train(max_epochs=1, progress_bar=False)
    assert model.get_latent_representation().shape == (160, 3)  # fills the cache
    totals = np.asarray(adata.X.sum(1)).ravel()
    sc.pp.filter_cells(adata, min_counts=int(np.median(totals)))
    assert 0 < adata.n_obs < 160
    fresh = adata.copy()  # same cells, never cached
    np.testing.assert_array_equal(
        model.get_latent_representation(), model.get_latent_representation(fresh)
    )
    expr = model.get_normalized_expression(indices=[0, 1])
    assert list(expr.index) == list(adata.obs_names[:2])
    np.testing.assert_array_equal(
        expr.to_numpy(), model.get_normalized_expression(fresh, indices=[0, 1]).to_numpy()
    )
    # a replaced count matrix is read again
    adata.X = adata.X * 2
    doubled = model.get_normalized_expression(library_size="latent", return_numpy=True)
    np.testing.assert_allclose(doubled.sum(1), np.asarray(adata.X.sum(1)).ravel(), rtol=1e-4)
    # normalised in place: scanpy keeps the sparse matrix but replaces its arrays
    matrix = adata.X
    sc.pp.normalize_total(adata, target_sum=100.0)
    assert adata.X is matrix
    with pytest.warns(UserWarning, match="non-integer"):
        scaled = model.get_normalized_expression(library_size="latent", return_numpy=True)
    np.testing.assert_allclose(scaled.sum(1), 100.0, rtol=1e-4)
    # genes filtered in place: a clear error, not the old genes
    sc.pp.filter_genes(adata, min_counts=int(np.asarray(adata.X.sum(0)).min()) + 1)
    assert adata.n_vars < 20
    with pytest.raises(ValueError, match="genes differ"):
        model.get_latent_representation()


def test_getters_follow_reassigned_obs_columns_of_the_models_anndata():
    # a registered obs column reassigned (or edited in place) after the tensors were cached:
    # the getters must decode with the batches the cells have now
    adata = _setup(120, 15, n_batches=2)
    model = cellvae.SCVI(adata, n_latent=3).train(max_epochs=1, progress_bar=False)
    before = model.get_normalized_expression(return_numpy=True)  # fills the cache
    flipped = adata.obs["batch"].map({"batch0": "batch1", "batch1": "batch0"}).astype("category")
    adata.obs["batch"] = flipped
    fresh = adata.copy()  # the same values, never cached
    after = model.get_normalized_expression(return_numpy=True)
    np.testing.assert_array_equal(after, model.get_normalized_expression(fresh, return_numpy=True))
    assert not np.allclose(after, before)
    # edited in place (same column object): also read again
    adata.obs.loc[adata.obs_names[:5], "batch"] = "batch0"
    np.testing.assert_array_equal(
        model.get_normalized_expression(return_numpy=True),
        model.get_normalized_expression(adata.copy(), return_numpy=True),
    )
    # a batch the model never saw: the clear error of new data
    adata.obs["batch"] = adata.obs["batch"].cat.add_categories("new")
    adata.obs.loc[adata.obs_names[0], "batch"] = "new"
    with pytest.raises(ValueError, match="new"):
        model.get_latent_representation()


def test_indices_as_boolean_mask(trained):
    adata, model = trained
    mask = (adata.obs["batch"] == "batch1").to_numpy()
    want = model.get_latent_representation(indices=np.flatnonzero(mask))
    np.testing.assert_array_equal(model.get_latent_representation(indices=mask), want)
    expr = model.get_normalized_expression(indices=mask)
    assert list(expr.index) == list(adata.obs_names[mask])
    with pytest.raises(IndexError, match="one entry per cell"):
        model.get_latent_representation(indices=mask[:-1])
    with pytest.raises(TypeError, match="get_indexer"):
        model.get_latent_representation(indices=adata.obs_names[:3])
    assert model.get_latent_representation(indices=[]).shape == (0, 4)
    # negative positions count from the end, as in numpy; beyond either end: a clear error
    full = model.get_latent_representation()
    np.testing.assert_array_equal(model.get_latent_representation(indices=[-1, 0]), full[[-1, 0]])
    for bad in ([adata.n_obs], [-adata.n_obs - 1]):
        with pytest.raises(IndexError, match=rf"indices must be in \[-{adata.n_obs}, "):
            model.get_latent_representation(indices=bad)
    # no cells: empty outputs of the right shape, or a clear error for a mean
    assert model.posterior_predictive_sample(indices=[], n_samples=3).shape == (0, 40, 3)
    assert model.get_normalized_expression(indices=[], n_samples=2).shape == (0, 40)
    with pytest.raises(ValueError, match="selects no cells"):
        model.get_marginal_ll(indices=[], n_mc_samples=3)


def test_single_names_and_numpy_scalars_as_getter_options(trained):
    adata, model = trained
    expr = model.get_normalized_expression(return_numpy=False)
    one = model.get_normalized_expression(gene_list="gene3")  # one name, not its letters
    assert list(one.columns) == ["gene3"]
    np.testing.assert_allclose(one.to_numpy(), expr[["gene3"]], rtol=1e-5)
    as1 = model.get_normalized_expression(transform_batch="batch1", return_numpy=True)
    np.testing.assert_array_equal(
        model.get_normalized_expression(transform_batch=np.str_("batch1"), return_numpy=True), as1
    )
    # numeric batch labels, passed as the numpy scalars obs holds
    num = _setup(120, 20, n_batches=2)
    num.obs["plate"] = np.where(num.obs["batch"] == "batch0", 7, 12)
    cellvae.SCVI.setup_anndata(num, batch_key="plate")
    m = cellvae.SCVI(num, n_latent=2).train(max_epochs=1, progress_bar=False)
    value = num.obs["plate"].iloc[0]  # a numpy.int64
    got = m.get_normalized_expression(transform_batch=value, return_numpy=True)
    want = m.get_normalized_expression(transform_batch=str(value), return_numpy=True)
    np.testing.assert_array_equal(got, want)
    assert not np.array_equal(got, m.get_normalized_expression(transform_batch=[7, 12]).to_numpy())
    with pytest.raises(ValueError, match="not a batch of the model"):
        m.get_normalized_expression(transform_batch=np.int64(3))
    # a float column: categories '7.0' and '12.0', named by the numbers 7 and 12 too
    num.obs["plate"] = num.obs["plate"].astype(float)
    cellvae.SCVI.setup_anndata(num, batch_key="plate")
    m = cellvae.SCVI(num, n_latent=2).train(max_epochs=1, progress_bar=False)
    assert m.registry_.batch_categories == ("7.0", "12.0")
    np.testing.assert_array_equal(
        m.get_normalized_expression(transform_batch=7, return_numpy=True),
        m.get_normalized_expression(transform_batch="7.0", return_numpy=True),
    )
    with pytest.raises(ValueError, match="not a batch of the model"):
        m.get_normalized_expression(transform_batch=7.5)


def test_normalized_expression_equals_generative_px_scale(trained):
    # the getter writes the decoder's softmax straight into its output: compare with px_scale
    # of the module's own generative pass at the posterior mean, cell by cell
    adata, model = trained
    td = TensorData.from_adata(adata).to(model.device)
    idx = torch.tensor([7, 0, 123, 299, 42])
    batch = td[idx]
    module = model.module
    with torch.no_grad():
        inf = module.inference(batch)
        gen = module.generative(inf["qz_m"], inf["library"], batch)
    want = gen["px_scale"].cpu().numpy()
    got = model.get_normalized_expression(indices=idx.numpy(), return_numpy=True, batch_size=2)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-8)
    big = model.get_normalized_expression(indices=idx.numpy(), library_size=1e4, return_numpy=True)
    np.testing.assert_allclose(big, 1e4 * want, rtol=1e-5)


def test_transform_batch_gives_expression_of_that_batch(trained):
    adata, model = trained
    own = model.get_normalized_expression(return_numpy=True)
    as0 = model.get_normalized_expression(transform_batch="batch0", return_numpy=True)
    as1 = model.get_normalized_expression(transform_batch="batch1", return_numpy=True)
    b = adata.obs["batch"].to_numpy()
    # cells of batch0 decoded as batch0 are unchanged; batch1 cells change
    np.testing.assert_allclose(as0[b == "batch0"], own[b == "batch0"], rtol=1e-5)
    np.testing.assert_allclose(as1[b == "batch1"], own[b == "batch1"], rtol=1e-5)
    assert not np.allclose(as0[b == "batch1"], own[b == "batch1"])
    both = model.get_normalized_expression(transform_batch=["batch0", "batch1"], return_numpy=True)
    np.testing.assert_allclose(both, (as0 + as1) / 2, rtol=1e-5)


def test_transform_batch_direction_matches_data():
    adata = cellvae.datasets.synthetic(600, 60, n_batches=2, batch_effect=1.0, random_state=3)
    cellvae.SCVI.setup_anndata(adata, batch_key="batch")
    model = cellvae.SCVI(adata, n_latent=5).train(max_epochs=40, progress_bar=False)
    as0 = model.get_normalized_expression(transform_batch="batch0", return_numpy=True)
    as1 = model.get_normalized_expression(transform_batch="batch1", return_numpy=True)
    model_lfc = np.log(as1.mean(0)) - np.log(as0.mean(0))
    x = adata.X.toarray()
    x = x / x.sum(1, keepdims=True)
    b = adata.obs["batch"].to_numpy()
    data_lfc = np.log(x[b == "batch1"].mean(0) + 1e-6) - np.log(x[b == "batch0"].mean(0) + 1e-6)
    assert np.corrcoef(model_lfc, data_lfc)[0, 1] > 0.8


# ---------------------------------------------------------------- misuse
def test_getters_before_training_raise():
    adata = _setup(50, 10)
    model = cellvae.SCVI(adata)
    with pytest.raises(RuntimeError, match="call model.train"):
        model.get_latent_representation()
    with pytest.raises(RuntimeError, match="call model.train"):
        model.save("unused")


def test_model_without_setup_raises():
    adata = cellvae.datasets.synthetic(50, 10)
    with pytest.raises(ValueError, match="setup_anndata"):
        cellvae.SCVI(adata)


def test_new_data_unseen_batch_and_different_genes(trained):
    _, model = trained
    query = cellvae.datasets.synthetic(50, 40, n_batches=3, random_state=5)
    with pytest.raises(ValueError, match=r"batch2.*cannot encode.*load_query_data") as err:
        model.get_latent_representation(query)
    assert "extend_categories" not in str(err.value)  # an option that would not help here
    cellvae.pp.transfer_setup(query, model.registry_, extend_categories=True)
    with pytest.raises(ValueError, match=r"batch2.*cannot encode"):
        model.get_latent_representation(query)
    other = cellvae.datasets.synthetic(50, 41, random_state=5)
    with pytest.raises(ValueError, match="1 extra"):
        model.get_latent_representation(other)
    ok = cellvae.datasets.synthetic(50, 40, n_batches=2, random_state=5)
    ok.X.data[ok.X.indices == 3] = 0  # a gene without counts in the new cells: normal there,
    ok.X.eliminate_zeros()  # and filtering it would be no fix
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert model.get_latent_representation(ok).shape == (50, 4)
    assert "cellvae" not in ok.uns, "getters must not write into the user's AnnData"
    with pytest.raises(ValueError, match="transform_batch"):
        model.get_normalized_expression(transform_batch="nope")
    with pytest.raises(KeyError, match="Genes not in the model"):
        model.get_normalized_expression(gene_list=["nope"])


def test_integer_batch_column_read_back_as_floats_is_the_same_data():
    adata = cellvae.datasets.synthetic(120, 20, n_batches=2, random_state=0)
    adata.obs["run"] = adata.obs["batch"].cat.codes.astype(int)
    cellvae.SCVI.setup_anndata(adata, batch_key="run")
    model = cellvae.SCVI(adata, n_latent=3).train(max_epochs=1, progress_bar=False, seed=0)
    query = adata.copy()
    query.obs["run"] = query.obs["run"].astype(float)  # categories '0.0', '1.0'
    np.testing.assert_array_equal(
        model.get_latent_representation(query), model.get_latent_representation(adata)
    )
    np.testing.assert_array_equal(
        model.get_normalized_expression(query, transform_batch=1.0, return_numpy=True),
        model.get_normalized_expression(adata, transform_batch="1", return_numpy=True),
    )


def test_latent_distribution_and_library_size(trained):
    adata, model = trained
    mean, var = model.get_latent_representation(return_dist=True, indices=range(20))
    assert mean.shape == var.shape == (20, 4) and (var > 0).all()
    np.testing.assert_allclose(mean, model.get_latent_representation(indices=range(20)), 1e-6)
    torch.manual_seed(0)
    draws = np.stack([model.get_latent_representation(give_mean=False) for _ in range(300)])
    np.testing.assert_allclose(draws.var(0)[:20], var, rtol=0.3)  # q(z | x)'s own variance
    observed = model.get_latent_library_size()
    np.testing.assert_allclose(observed[:, 0], np.asarray(adata.X.sum(1)).ravel(), rtol=1e-5)
    assert model.get_latent_library_size(indices=[]).shape == (0, 1)

    latent = cellvae.SCVI(adata, n_latent=4, use_observed_lib_size=False)
    latent.train(max_epochs=3, progress_bar=False)
    with torch.no_grad():
        latent.module.eval()
        inf = latent.module.inference(
            TensorData.from_adata(adata).to(latent.device)[torch.arange(300)]
        )
    ql_m, ql_v = inf["ql_m"].cpu().numpy(), inf["ql_v"].cpu().numpy()
    # the log-normal posterior's mean exp(m + v/2); without give_mean, samples of it
    np.testing.assert_allclose(latent.get_latent_library_size(), np.exp(ql_m + ql_v / 2), 1e-5)
    torch.manual_seed(1)
    samples = np.stack([latent.get_latent_library_size(give_mean=False) for _ in range(400)])
    log_mean = np.log(samples).mean(0)  # of the normal log library: within 5 standard errors
    assert (np.abs(log_mean - ql_m) < 5 * np.sqrt(ql_v / 400)).all()


def test_posterior_predictive_sample_of_another_batch():
    adata = _setup(300, 40, n_batches=2)
    model = cellvae.SCVI(adata, n_latent=4, gene_likelihood="nb")  # no zero inflation
    model.train(max_epochs=5, progress_bar=False)
    for batch in ("batch0", "batch1"):
        torch.manual_seed(0)
        counts = model.posterior_predictive_sample(transform_batch=batch, n_samples=100)
        torch.manual_seed(0)
        rate = model.get_normalized_expression(
            transform_batch=batch, library_size="latent", n_samples=100, return_numpy=True
        )
        # per gene over all cells and samples: the counts' mean is the decoded rate
        np.testing.assert_allclose(counts.mean(2).sum(0), rate.sum(0), rtol=0.05)
    own = model.posterior_predictive_sample(n_samples=100).mean(2).sum(0)
    as0 = model.posterior_predictive_sample(transform_batch="batch0", n_samples=100)
    assert not np.allclose(own, as0.mean(2).sum(0), rtol=0.05)
    with pytest.raises(ValueError, match="one transform_batch"):
        model.posterior_predictive_sample(transform_batch=["batch0", "batch1"])


@pytest.mark.parametrize("likelihood", ["zinb", "nb", "poisson"])
def test_likelihood_parameters_are_the_decoders(likelihood):
    adata = _setup(120, 15, n_batches=2)
    model = cellvae.SCVI(adata, n_latent=3, gene_likelihood=likelihood, dispersion="gene")
    model.train(max_epochs=3, progress_bar=False)
    params = model.get_likelihood_parameters(indices=range(50))
    expected = {"zinb": ["mean", "dispersions", "dropout"], "nb": ["mean", "dispersions"]}
    assert list(params) == expected.get(likelihood, ["mean"])
    # the mean is the library times the normalised expression, by the getters' other path
    rate = model.get_normalized_expression(indices=range(50), library_size="latent")
    np.testing.assert_allclose(params["mean"], rate.to_numpy(), rtol=1e-5)
    if likelihood != "poisson":  # one θ per gene, for every cell
        theta = torch.exp(model.module.px_r).detach().cpu().numpy()
        np.testing.assert_allclose(params["dispersions"], np.tile(theta, (50, 1)), rtol=1e-6)
    if likelihood == "zinb":
        assert ((params["dropout"] > 0) & (params["dropout"] < 1)).all()
    torch.manual_seed(2)
    samples = model.get_likelihood_parameters(indices=range(50), n_samples=4, batch_size=20)
    torch.manual_seed(2)
    mean = model.get_likelihood_parameters(
        indices=range(50), n_samples=4, batch_size=20, give_mean=True
    )
    assert samples["mean"].shape == (4, 50, 15) and mean["mean"].shape == (50, 15)
    for k in params:
        np.testing.assert_allclose(samples[k].mean(0), mean[k], rtol=1e-5)
    assert model.get_likelihood_parameters(indices=[], n_samples=2)["mean"].shape == (2, 0, 15)


def test_training_refuses_cells_without_counts_however_they_came(trained, tmp_path):
    adata, model = trained
    query = _without_counts(adata, range(0, 300, 15))  # 20 cells without counts
    with pytest.warns(UserWarning, match="20 cells have zero total counts"):
        reg = cellvae.pp.transfer_setup(query, model)
    kept = query[np.asarray(query.X.sum(1)).ravel() > 0].copy()
    cellvae.pp.setup_anndata(kept, batch_key="batch", labels_key="cell_type")
    expected = type(reg).from_adata(kept)
    # the library prior is that of the cells with counts (an empty cell is no library of 1)
    np.testing.assert_allclose(reg.library_log_means, expected.library_log_means, rtol=1e-6)
    np.testing.assert_allclose(reg.library_log_vars, expected.library_log_vars, rtol=1e-6)
    with pytest.raises(ValueError, match="20 cells have zero total counts; training needs"):
        cellvae.SCVI(query, n_latent=4).train(max_epochs=1, progress_bar=False)
    model.save(tmp_path / "m")
    with pytest.warns(UserWarning, match="zero total counts"):
        loaded = cellvae.SCVI.load(tmp_path / "m", query)
    with pytest.raises(ValueError, match="training needs at least one count per cell"):
        loaded.train(max_epochs=1, progress_bar=False)


def test_a_trained_model_pickles():
    import pickle

    adata = _setup(60, 10)
    model = cellvae.SCVI(adata, n_latent=2).train(max_epochs=1, progress_bar=False)
    latent = model.get_latent_representation()  # fills the tensor cache (weak references)
    copy = pickle.loads(pickle.dumps(model))
    np.testing.assert_array_equal(copy.get_latent_representation(), latent)


def test_getters_read_an_in_memory_view(trained):
    adata, model = trained
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no implicit copy of the view, nothing written into it
        latent = model.get_latent_representation(adata[10:20])
        expr = model.get_normalized_expression(adata[adata.obs["batch"] == "batch1"])
    np.testing.assert_allclose(latent, model.get_latent_representation()[10:20], atol=1e-6)
    b1 = (adata.obs["batch"] == "batch1").to_numpy()
    full = model.get_normalized_expression()
    np.testing.assert_allclose(expr.to_numpy(), full.to_numpy()[b1], rtol=1e-5)
    assert list(expr.index) == list(adata.obs_names[b1])
    with pytest.raises(ValueError, match="view"):  # a setup is written into the data
        cellvae.pp.transfer_setup(adata[:10], model)


def test_cells_without_counts_in_new_data_warn_and_get_finite_results(trained):
    adata, model = trained
    # e.g. cells without counts in the model's highly variable genes
    new = _without_counts(adata[:30], (3, 7))
    with pytest.warns(UserWarning, match="2 cells have zero total counts"):
        latent = model.get_latent_representation(new)
    assert np.isfinite(latent).all()
    with pytest.warns(UserWarning, match="zero total counts"):
        expr = model.get_normalized_expression(new, library_size="latent", return_numpy=True)
    np.testing.assert_array_equal(expr[[3, 7]], 0.0)  # the observed library is 0
    with pytest.warns(UserWarning, match="zero total counts"):
        scaled = model.get_normalized_expression(new, return_numpy=True)
    np.testing.assert_allclose(scaled.sum(1), 1.0, rtol=1e-5)
    with pytest.warns(UserWarning, match="zero total counts"):
        assert np.isfinite(model.get_elbo(new))


def test_gene_label_dispersion_needs_known_labels_of_new_data():
    adata = _setup(120, 15)
    model = cellvae.SCVI(adata, dispersion="gene-label").train(max_epochs=1, progress_bar=False)
    query = adata.copy()
    del query.uns["cellvae"]
    np.testing.assert_array_equal(
        model.get_latent_representation(query), model.get_latent_representation()
    )
    query.obs["cell_type"] = query.obs["cell_type"].astype(str)
    query.obs.loc[query.obs_names[:3], "cell_type"] = "typeX"
    with pytest.raises(
        ValueError, match=r"labels it was trained on: obs\['cell_type'\] has \['typeX'\]"
    ):
        model.get_elbo(query)
    query.obs.loc[query.obs_names[:3], "cell_type"] = np.nan  # unannotated cells
    with pytest.raises(ValueError, match=r"needs the label of every cell.*without a label"):
        model.get_normalized_expression(query)
    del query.obs["cell_type"]
    with pytest.raises(ValueError, match=r"needs the label of every cell.*cell_type"):
        model.get_normalized_expression(query)


def test_unannotated_cells_in_new_data_for_a_model_without_label_parameters(trained):
    adata, model = trained  # set up with labels_key="cell_type"; gene dispersion
    query = adata.copy()
    del query.uns["cellvae"]
    query.obs["cell_type"] = query.obs["cell_type"].astype(object)
    query.obs.loc[query.obs_names[:50], "cell_type"] = np.nan
    np.testing.assert_array_equal(
        model.get_latent_representation(query), model.get_latent_representation()
    )


def test_getter_and_train_options_out_of_range_raise_clear_errors(trained):
    _, model = trained
    bad = [
        (dict(transform_batch=[]), "transform_batch is empty"),
        (dict(gene_list=[]), "gene_list is empty"),
        (dict(batch_size=0), "batch_size must be a positive integer"),
        (dict(batch_size=2.5), "batch_size must be a positive integer"),
        (dict(n_samples=2.5), "n_samples must be a positive integer"),
        (dict(library_size="Latent"), "library_size must be a positive number within"),
        (dict(library_size=-1), "library_size must be a positive number within"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message):
            model.get_normalized_expression(**kwargs)
    with pytest.raises(ValueError, match="n_mc_samples must be a positive integer"):
        model.get_marginal_ll(n_mc_samples=0)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        model.get_marginal_ll(n_mc_samples=2, batch_size=0)  # not read as "the default"
    with pytest.raises(ValueError, match="n_samples must be a positive integer"):
        model.posterior_predictive_sample(n_samples=0)
    with pytest.raises(ValueError, match="selects no cells"):
        model.get_elbo(indices=[])
    fresh = cellvae.SCVI(_setup(40, 8))
    with pytest.raises(TypeError, match="validation_size must be a number, got None"):
        fresh.train(max_epochs=1, validation_size=None, progress_bar=False)
    with pytest.raises(TypeError, match="early_stopping_patience must be an integer, got 1.5"):
        fresh.train(max_epochs=1, early_stopping_patience=1.5, progress_bar=False)
    with pytest.raises(ValueError, match="library_size must be a positive number within"):
        model.get_normalized_expression(library_size=float("inf"))
    with pytest.raises(TypeError, match=r"accelerator: device=.*train_size: validation_size="):
        fresh.train(max_epochs=1, accelerator="cpu", train_size=0.9)
    for device, message in [("tpu", "Unknown device 'tpu'"), ("meta", "Unknown device 'meta'")]:
        with pytest.raises(ValueError, match=message):  # meta would lose the weights
            fresh.train(max_epochs=1, device=device, progress_bar=False)
    if not torch.backends.mps.is_available():
        with pytest.raises(ValueError, match="'mps' was requested but it is not available"):
            fresh.train(max_epochs=1, device="mps", progress_bar=False)
    for value in (None, 0, "False"):  # not read by truthiness
        with pytest.raises(TypeError, match="return_mean must be True or False"):
            model.get_elbo(return_mean=value)
    for option, message in [
        ({"lr": "1e-3"}, "lr must be a number, got '1e-3'"),
        ({"seed": "3"}, "seed must be an integer"),
        ({"n_epochs_kl_warmup": 2.5}, "n_epochs_kl_warmup must be an integer"),
        ({"gradient_clip_val": True}, "gradient_clip_val must be a number"),
        ({"eval_batch_size": 2.5}, "eval_batch_size must be an integer"),
        ({"early_stopping_patience": True}, "early_stopping_patience must be an integer"),
    ]:
        with pytest.raises(TypeError, match=message):
            fresh.train(max_epochs=1, progress_bar=False, **option)
    with pytest.raises(ValueError, match=r"Dropout probability must be in \[0, 1\), got -0.1"):
        cellvae.SCVI(fresh.adata, dropout_rate=-0.1).train(max_epochs=1)  # was: no dropout
    # flags: a string "False" would read as true
    for build, message in [
        (
            lambda: cellvae.SCVI(fresh.adata, use_observed_lib_size="False").train(max_epochs=1),
            "use_observed_lib_size must be True or False",
        ),
        (
            lambda: cellvae.SCVI(fresh.adata, encode_covariates="False").train(max_epochs=1),
            "encode_covariates must be True or False",
        ),
        (
            lambda: fresh.train(max_epochs=1, early_stopping="False"),
            "early_stopping must be True or False",
        ),
        (lambda: fresh.train(max_epochs=1, progress_bar=1), "progress_bar must be True or False"),
        (
            lambda: model.get_latent_representation(give_mean="False"),
            "give_mean must be True or False",
        ),
        (lambda: model.get_latent_library_size(give_mean=None), "give_mean must be True or False"),
    ]:
        with pytest.raises(TypeError, match=message):
            build()
    for value in (0, "False"):  # None: arrays only where a DataFrame cannot hold the output
        with pytest.raises(TypeError, match="return_numpy must be True or False"):
            model.get_normalized_expression(return_numpy=value)
    with pytest.raises(ValueError, match="float32's range"):
        model.get_normalized_expression(library_size=1e40)  # would be inf in float32
    with pytest.raises(TypeError, match=r"train_size: validation_size.*go to training"):
        cellvae.tl.scvi(cellvae.datasets.synthetic(20, 5), train_size=0.9)
    with pytest.raises(AttributeError, match="fitted attributes end in '_': is_trained_"):
        model.is_trained  # noqa: B018
    with pytest.raises(AttributeError, match="no attribute 'nonsense'$"):
        model.nonsense  # noqa: B018
    with pytest.raises(TypeError, match="Expected an AnnData, got ndarray"):
        model.get_latent_representation(np.ones((3, 40)))
    with pytest.raises(TypeError, match="batch_key must be one name.*categorical_covariate_keys"):
        cellvae.SCVI.setup_anndata(cellvae.datasets.synthetic(20, 5), batch_key=["batch"])


@pytest.mark.parametrize("tool", ["scvi", "totalvi"])
def test_tl_keeps_the_setup_when_it_fails(tool, monkeypatch):
    # the tl functions register the data before the model checks its options and trains: an
    # error after that must leave the user's own setup (or none) in place
    adata = cellvae.datasets.synthetic(60, 12, n_batches=2, n_proteins=4)
    fn = getattr(cellvae.tl, tool)
    with pytest.raises(TypeError, match="n_hiden"):
        fn(adata, batch_key="batch", max_epochs=1, progress_bar=False, n_hiden=3)
    assert UNS_KEY not in adata.uns
    proteins = {"protein_expression_obsm_key": "protein_expression"} if tool == "totalvi" else {}
    cellvae.pp.setup_anndata(adata, labels_key="cell_type", **proteins)
    before, obsm_keys = dict(adata.uns[UNS_KEY]), set(adata.obsm)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cellvae.train, "train_module", interrupted)
    monkeypatch.setattr(cellvae.model._base, "train_module", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fn(adata, batch_key="batch", max_epochs=1, progress_bar=False)
    assert adata.uns[UNS_KEY] == before and set(adata.obsm) == obsm_keys


def test_tl_refuses_output_keys_that_overwrite_the_inputs():
    # before training, and with nothing written: the raw counts or proteins would be lost
    adata = cellvae.datasets.synthetic(40, 8, n_batches=2, n_proteins=3)
    adata.layers["counts"] = adata.X.copy()
    kw = {"max_epochs": 1, "progress_bar": False}
    cases = [
        (cellvae.tl.scvi, {"layer": "counts", "layer_added": "counts"}, "layer_added='counts'"),
        (cellvae.tl.totalvi, {"protein_key_added": "protein_expression"}, "protein_key_added="),
        (cellvae.tl.totalvi, {"key_added": "protein_expression"}, "key_added='protein_expr"),
        (cellvae.tl.totalvi, {"key_added": "out", "protein_key_added": "out"}, "which key_added"),
    ]
    for fn, options, message in cases:
        before = {k: v.copy() for k, v in adata.obsm.items()}, adata.layers["counts"].copy()
        with pytest.raises(ValueError, match=f"{message}.*choose another"):
            fn(adata, **options, **kw)
        assert UNS_KEY not in adata.uns and set(adata.obsm) == set(before[0])
        pd.testing.assert_frame_equal(
            adata.obsm["protein_expression"], before[0]["protein_expression"]
        )
        assert (adata.layers["counts"] != before[1]).nnz == 0


def test_nan_in_data_rejected():
    adata = cellvae.datasets.synthetic(50, 10)
    adata.X = adata.X.toarray()
    adata.X[3, 4] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        cellvae.SCVI.setup_anndata(adata)


# ---------------------------------------------------------------- save / load
def test_save_load_with_numpy_settings_and_unsaveable_settings(tmp_path):
    adata = _setup(80, 15)
    model = cellvae.SCVI(adata, n_latent=np.int64(3), dropout_rate=np.float32(0.2))
    model.train(max_epochs=1, progress_bar=False)
    model.save(tmp_path / "m")
    loaded = cellvae.SCVI.load(tmp_path / "m", adata)
    assert loaded.hparams["n_latent"] == 3 and type(loaded.hparams["n_latent"]) is int
    np.testing.assert_array_equal(
        loaded.get_latent_representation(), model.get_latent_representation()
    )
    model.hparams["note"] = object()  # not JSON: a clear error, and nothing written
    with pytest.raises(TypeError, match="Cannot save this SCVI"):
        model.save(tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_max_epochs_zero_or_fractional_is_rejected():
    adata = _setup(60, 10)
    model = cellvae.SCVI(adata)
    with pytest.raises(ValueError, match="max_epochs must be at least 1"):
        model.train(max_epochs=0, progress_bar=False)
    with pytest.raises(TypeError, match="max_epochs must be an integer"):
        model.train(max_epochs=2.5, progress_bar=False)
    with pytest.raises(TypeError, match="batch_size must be an integer"):
        model.train(max_epochs=1, batch_size=64.0, progress_bar=False)
    assert len(model.train(max_epochs=np.int64(1), progress_bar=False).history) == 1


def test_save_load_identical_latent(trained, tmp_path):
    adata, model = trained
    model.save(tmp_path / "m")
    with pytest.raises(FileExistsError):
        model.save(tmp_path / "m")
    loaded = cellvae.SCVI.load(tmp_path / "m", adata)
    np.testing.assert_array_equal(
        loaded.get_latent_representation(), model.get_latent_representation()
    )
    assert loaded.history.equals(model.history)
    assert loaded.hparams == model.hparams
    # without data, getters take adata explicitly
    bare = cellvae.SCVI.load(tmp_path / "m", device=model.device)  # bit-equal on the same device
    np.testing.assert_array_equal(
        bare.get_latent_representation(adata), model.get_latent_representation()
    )
    # overwrite keeps a single weights file
    model.save(tmp_path / "m", overwrite=True)
    assert len(list((tmp_path / "m").glob("weights-*.pt"))) == 1


def test_save_anndata_and_load_it_back(tmp_path):
    adata = _setup(80, 15)
    model = cellvae.SCVI(adata, n_latent=3).train(max_epochs=1, progress_bar=False)
    model.save(tmp_path / "m", save_anndata=True)
    loaded = cellvae.SCVI.load(tmp_path / "m")  # attaches the saved AnnData
    assert loaded.adata is not None and loaded.adata.n_obs == 80
    np.testing.assert_array_equal(
        loaded.get_latent_representation(), model.get_latent_representation()
    )
    model.save(tmp_path / "m", overwrite=True)  # without: the earlier data are not this save's
    assert not (tmp_path / "m" / "adata.h5ad").exists()
    assert cellvae.SCVI.load(tmp_path / "m").adata is None
    with pytest.raises(ValueError, match="save_anndata=True with no AnnData attached"):
        cellvae.SCVI.load(tmp_path / "m").save(tmp_path / "n", save_anndata=True)
    with pytest.raises(TypeError, match="save_anndata must be True or False"):
        model.save(tmp_path / "n", save_anndata="yes")


def test_load_rejects_corrupted_and_truncated(trained, tmp_path):
    adata, model = trained
    model.save(tmp_path / "m")
    weights = next((tmp_path / "m").glob("weights-*.pt"))
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupted or truncated"):
        cellvae.SCVI.load(tmp_path / "m", adata)
    (tmp_path / "m" / "model.json").write_text('{"model": "SCVI", ')
    with pytest.raises(ValueError, match="not valid JSON"):
        cellvae.SCVI.load(tmp_path / "m", adata)
    with pytest.raises(FileNotFoundError):
        cellvae.SCVI.load(tmp_path / "nothing")


def test_load_checks_genes(trained, tmp_path):
    adata, model = trained
    model.save(tmp_path / "m")
    other = cellvae.datasets.synthetic(30, 39)
    with pytest.raises(ValueError, match="genes differ"):
        cellvae.SCVI.load(tmp_path / "m", other)


def test_load_checks_the_attached_data_like_a_getters(trained, tmp_path):
    adata, model = trained  # set up with labels_key="cell_type"
    model.save(tmp_path / "m")
    # no labels column: optional for a model without parameters per label, as in the getters
    query = adata.copy()
    del query.obs["cell_type"], query.uns["cellvae"]
    loaded = cellvae.SCVI.load(tmp_path / "m", query)
    np.testing.assert_array_equal(
        loaded.get_latent_representation(), model.get_latent_representation(query)
    )
    assert query.uns["cellvae"]["batch_categories"] == list(model.registry_.batch_categories)
    # a subset that kept its parent's record in uns (equal to the model's): checked all the same
    subset = adata[adata.obs["batch"] == "batch1"].copy()
    del subset.obs["cell_type"]
    assert Registry.from_adata(subset) == model.registry_
    loaded = cellvae.SCVI.load(tmp_path / "m", subset)
    np.testing.assert_array_equal(
        loaded.get_latent_representation(), model.get_latent_representation(subset)
    )
    assert subset.uns["cellvae"]["n_obs"] == subset.n_obs
    # an unseen batch: the getters' advice, not an option load does not have
    new = cellvae.datasets.synthetic(50, 40, n_batches=3, random_state=5)
    with pytest.raises(ValueError, match="cannot encode") as err:
        cellvae.SCVI.load(tmp_path / "m", new)
    assert "extend_categories" not in str(err.value)
    # loaded without data: train() says how to attach it, also when given adata=
    bare = cellvae.SCVI.load(tmp_path / "m")
    with pytest.raises(ValueError, match=r"SCVI.load\(dir_path, adata\)"):
        bare.train(max_epochs=1)
    with pytest.raises(TypeError, match=r"\['adata'\].*own AnnData"):
        bare.train(max_epochs=1, adata=adata)


def test_network_sizes_checked_and_repr_shows_the_attached_data(trained, tmp_path):
    adata, model = trained
    for name, value in [("n_latent", 0), ("n_hidden", 2.5), ("n_layers", 0)]:
        with pytest.raises(ValueError, match=f"{name} must be a positive integer"):
            cellvae.SCVI(adata, **{name: value}).train(max_epochs=1, progress_bar=False)
    model.save(tmp_path / "m")
    query = adata[:100].copy()
    del query.uns["cellvae"]
    assert "100 cells × 40 genes" in repr(cellvae.SCVI.load(tmp_path / "m", query))
    assert "no data attached (40 genes)" in repr(cellvae.SCVI.load(tmp_path / "m"))
    assert "300 cells × 40 genes, trained" in repr(model)


def test_model_rejects_a_setup_made_for_its_parent_anndata():
    adata = _setup(150, 20, n_batches=3)
    sub = adata[adata.obs["batch"] == "batch0"].copy()  # keeps the parent's uns["cellvae"]
    with pytest.raises(ValueError, match=r"set up for 150 cells × 20 genes.*subset") as err:
        cellvae.SCVI(sub)
    assert "setup_anndata(adata, batch_key='batch', labels_key='cell_type')" in str(err.value)
    with pytest.raises(ValueError, match=r"150 × 12"):
        cellvae.SCVI(adata[:, :12].copy())  # e.g. highly variable genes chosen after setup
    cellvae.SCVI.setup_anndata(sub, batch_key="batch")
    assert cellvae.SCVI(sub).registry_.batch_categories == ("batch0",)


def test_interrupted_save_keeps_previous_model(trained, tmp_path, monkeypatch):
    adata, model = trained
    model.save(tmp_path / "m")
    before = cellvae.SCVI.load(tmp_path / "m", adata).get_latent_representation()

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("cellvae.model._base.json.dump", boom)
    with pytest.raises(KeyboardInterrupt):
        model.save(tmp_path / "m", overwrite=True)
    monkeypatch.undo()
    after = cellvae.SCVI.load(tmp_path / "m", adata).get_latent_representation()
    np.testing.assert_array_equal(before, after)


# ---------------------------------------------------------------- scanpy style
def test_tl_scvi_writes_results_and_survives_h5ad(tmp_path):
    adata = cellvae.datasets.synthetic(200, 30)
    obs_cols = list(adata.obs.columns)
    res = cellvae.tl.scvi(
        adata, batch_key="batch", max_epochs=2, layer_added="scvi_norm", progress_bar=False
    )
    assert res is None
    assert adata.obsm["X_scVI"].shape == (200, 10)
    assert adata.layers["scvi_norm"].shape == (200, 30)
    np.testing.assert_allclose(adata.layers["scvi_norm"].sum(1), 1e4, rtol=1e-3)
    assert list(adata.obs.columns) == obs_cols
    assert len(adata.uns["scvi"]["history"]["train_loss"]) == 2
    adata.write_h5ad(tmp_path / "a.h5ad")
    back = ad.read_h5ad(tmp_path / "a.h5ad")
    np.testing.assert_array_equal(back.obsm["X_scVI"], adata.obsm["X_scVI"])
    assert back.uns["scvi"]["params"]["n_latent"] == 10
    # the epochs asked for and those trained (fewer after early stopping) are both recorded
    assert back.uns["scvi"]["params"]["max_epochs"] == 2
    assert back.uns["scvi"]["params"]["n_epochs"] == 2


def test_tl_one_liners_register_size_factors_labels_and_covariates():
    adata = cellvae.datasets.synthetic(80, 12, n_proteins=3)
    adata.obs["sf"] = np.asarray(adata.X.sum(1)).ravel() / 50
    adata.obs["age"] = np.linspace(0, 1, 80)
    cellvae.tl.scvi(
        adata, batch_key="batch", size_factor_key="sf", max_epochs=1, progress_bar=False
    )
    assert adata.uns["cellvae"]["size_factor_key"] == "sf"
    cellvae.tl.totalvi(
        adata,
        batch_key="batch",
        labels_key="cell_type",
        continuous_covariate_keys=["age"],
        max_epochs=1,
        progress_bar=False,
    )
    record = adata.uns["cellvae"]
    assert record["labels_key"] == "cell_type" and list(record["continuous_covariate_keys"]) == [
        "age"
    ]
    assert adata.obsm["X_totalVI"].shape == (80, 20)


def test_tl_scvi_rejects_train_kwargs_that_it_takes_itself():
    adata = cellvae.datasets.synthetic(60, 10)
    with pytest.raises(
        TypeError, match=r"\['max_epochs', 'seed'\].*max_epochs=\.\.\., random_state"
    ):
        cellvae.tl.scvi(adata, train_kwargs={"max_epochs": 3, "seed": 1}, progress_bar=False)
    assert "cellvae" not in adata.uns  # rejected before the setup is written


def test_tl_scvi_copy_leaves_input_untouched():
    adata = cellvae.datasets.synthetic(100, 20)
    out = cellvae.tl.scvi(
        adata, batch_key="batch", max_epochs=1, key_added="X_mine", copy=True, progress_bar=False
    )
    assert "X_mine" not in adata.obsm and "cellvae" not in adata.uns
    assert out.obsm["X_mine"].shape == (100, 10)
    assert "X_mine" in out.uns
    with pytest.raises(ValueError, match="view"):
        cellvae.tl.scvi(adata[:50], batch_key="batch")


def test_rows_into_one_equals_concatenate():
    from cellvae.model._base import rows_into_one

    rng = np.random.default_rng(0)
    blocks = [rng.random((n, 3, 2)).astype(np.float32) for n in (4, 1, 7)]
    out = rows_into_one(iter(blocks), 12)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, np.concatenate(blocks))
    assert rows_into_one(iter([]), 0) is None
    with pytest.raises(RuntimeError, match="Expected 13 rows"):
        rows_into_one(iter(blocks), 13)


def test_getter_docstrings_have_their_shared_entries_filled_in():
    import inspect

    for cls in (cellvae.SCVI, cellvae.TOTALVI):
        for name, fn in inspect.getmembers(cls, callable):
            doc = fn.__doc__ or ""
            assert not any(k in doc for k in ("{adata}", "{indices}", "{batch_size}")), name
            if name.startswith("get_") or name == "posterior_predictive_sample":
                assert doc.count("\n        indices\n") == 1, name  # each getter documents it


# ---------------------------------------------------------------- the seventh audit (session 35)
def test_train_options_out_of_range_are_refused_before_any_change():
    model = cellvae.SCVI(_setup(60, 10))
    for option, message in [
        ({"eval_batch_size": 0}, "eval_batch_size must be at least 1, got 0"),
        ({"early_stopping_patience": 0}, "early_stopping_patience must be at least 1"),
        ({"seed": 2**64}, "seed must be a 64-bit integer"),
    ]:
        with pytest.raises(ValueError, match=message):
            model.train(max_epochs=1, progress_bar=False, **option)
    if not torch.cuda.is_available():  # an unavailable device: refused before the split
        with pytest.raises(ValueError, match="'cuda' was requested"):
            model.train(max_epochs=1, validation_size=0.5, device="cuda", progress_bar=False)
    for validation_size in (1.0, -0.1, 0.99):  # refused by the split: nothing built before it
        with pytest.raises(ValueError, match="validation_size|Too few cells"):
            model.train(max_epochs=1, validation_size=validation_size, progress_bar=False)
    assert model.module_ is None and not model.history_
    assert getattr(model, "validation_indices_", None) is None
    model.train(max_epochs=1, seed=-5, progress_bar=False)  # torch's seeds may be negative
    n_val = len(model.validation_indices_)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="'cuda' was requested"):
            model.train(max_epochs=1, validation_size=0.5, device="cuda", progress_bar=False)
    assert len(model.validation_indices_) == n_val and len(model.history) == 1


def test_unknown_train_option_names_the_closest_and_the_allowed():
    model = cellvae.SCVI(_setup(60, 10))
    with pytest.raises(TypeError, match=r"'early_stoping': did you mean 'early_stopping'\?.*"
                       r"allowed: \[.*'lr_min'"):  # fmt: skip
        model.train(early_stoping=True)
    with pytest.raises(TypeError, match="scvi-tools' n_steps_kl_warmup: n_epochs_kl_warmup"):
        model.train(n_steps_kl_warmup=100)


def test_early_stopping_without_validation_cells_warns():
    model = cellvae.SCVI(_setup(60, 10))
    with pytest.warns(UserWarning, match="No validation cells") as record:
        model.train(max_epochs=2, validation_size=0, early_stopping=True, progress_bar=False)
    assert record[0].filename == __file__  # the user's line
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.train(max_epochs=1, validation_size=0, progress_bar=False)  # nothing monitored


def test_a_non_finite_validation_elbo_warns_once(monkeypatch):
    import cellvae.train as training

    real = training.evaluate

    def broken(*args, **kwargs):  # as a model diverging on the held-out cells
        return {**real(*args, **kwargs), "elbo": float("nan")}

    monkeypatch.setattr(training, "evaluate", broken)
    model = cellvae.SCVI(_setup(60, 10))
    with pytest.warns(RuntimeWarning, match="Epoch 1: the validation ELBO is nan") as record:
        model.train(max_epochs=3, progress_bar=False)
    assert sum("validation ELBO" in str(w.message) for w in record) == 1
    assert model.history["validation_elbo"].isna().all() and len(model.history) == 3


def test_equal_depth_cells_get_a_finite_latent_library_prior():
    # cells downsampled to one depth: the log library's variance is 0 (1e-31 in rounding), and a
    # prior of that variance made the ELBO ~1e31
    rng = np.random.default_rng(0)
    counts = np.stack([rng.multinomial(200, np.ones(40) / 40) for _ in range(200)])
    adata = ad.AnnData(counts.astype(np.float32))
    cellvae.SCVI.setup_anndata(adata)
    assert adata.uns[UNS_KEY]["library_log_vars"] == [cellvae.pp.LIBRARY_VAR_FLOOR]
    model = cellvae.SCVI(adata, use_observed_lib_size=False)
    model.train(max_epochs=20, progress_bar=False)
    assert np.all(model.history["train_elbo"] < 1e4)  # was ~1.7e31 in every epoch
    assert np.isfinite(model.get_elbo()) and -model.get_elbo() < 1e5


def test_tl_scvi_layer_with_size_factors_is_expression_at_size_factor_one():
    adata = cellvae.datasets.synthetic(120, 20, n_batches=2)
    library = np.asarray(adata.X.sum(1)).ravel()
    adata.obs["sf"] = library / library.mean()
    cellvae.tl.scvi(
        adata, batch_key="batch", size_factor_key="sf", layer_added="expr", max_epochs=2,
        progress_bar=False,
    )  # fmt: skip
    reference = ad.AnnData(adata.X.copy(), obs=adata.obs[["batch", "sf"]].copy())
    cellvae.SCVI.setup_anndata(reference, batch_key="batch", size_factor_key="sf")
    model = cellvae.SCVI(reference).train(max_epochs=2, progress_bar=False)
    expected = model.get_normalized_expression(
        transform_batch=["batch0", "batch1"], library_size=1.0, return_numpy=True
    )
    np.testing.assert_allclose(adata.layers["expr"], expected, rtol=1e-5, atol=1e-7)
    assert np.median(adata.layers["expr"].sum(1)) < 10 * library.mean()  # not 1e4 times


def test_setup_anndata_of_the_models_documents_every_parameter():
    import inspect

    for fn in (cellvae.SCVI.setup_anndata, cellvae.TOTALVI.setup_anndata):
        doc = inspect.cleandoc(fn.__doc__)
        section = doc.split("Parameters\n----------\n")[1].split("\n\n")[0]
        documented = [line for line in section.splitlines() if not line.startswith(" ")]
        assert documented == list(inspect.signature(fn).parameters), fn
        assert "{setup_parameters}" not in fn.__doc__
        # the shared text is pp.setup_anndata's
        assert "Column of ``obs`` with the batch of each cell" in section


def test_model_flags_and_norm_places_are_checked_by_the_constructor():
    adata = _setup(60, 10)
    with pytest.raises(TypeError, match="encode_covariates must be True or False"):
        cellvae.SCVI(adata, encode_covariates="False")  # no train() needed to find out
    with pytest.raises(ValueError, match="use_batch_norm must be one of"):
        cellvae.SCVI(adata, use_batch_norm="encoders")
    with pytest.raises(TypeError, match="use_layer_norm must be 'encoder', 'decoder'"):
        cellvae.SCVI(adata, use_layer_norm=None)
    model = cellvae.SCVI(adata, use_batch_norm=False, use_layer_norm=True)  # booleans: none/both
    module = model._build_module()
    kinds = {type(m).__name__ for m in module.modules()}
    assert "LayerNorm" in kinds and "BatchNorm1d" not in kinds


def test_save_never_removes_a_users_adata_h5ad(trained, tmp_path):
    _, model = trained
    mine = cellvae.datasets.synthetic(23, 7, random_state=9)
    folder = tmp_path / "project"
    folder.mkdir()
    mine.write_h5ad(folder / "adata.h5ad")  # the user's own data, in the folder saved into
    model.save(folder)
    assert ad.read_h5ad(folder / "adata.h5ad").shape == (23, 7)  # it was deleted
    assert cellvae.SCVI.load(folder).adata is None  # and not taken for the model's
    with pytest.raises(FileExistsError, match="adata.h5ad exists and was not written by"):
        model.save(folder, overwrite=True, save_anndata=True)  # it was replaced
    model.save(folder, overwrite=True)
    assert ad.read_h5ad(folder / "adata.h5ad").shape == (23, 7)
    # a record written before the "anndata" entry: its adata.h5ad was the save's own
    saved = tmp_path / "old"
    model.save(saved, save_anndata=True)
    config = json.loads((saved / "model.json").read_text())
    del config["anndata"]
    (saved / "model.json").write_text(json.dumps(config))
    assert cellvae.SCVI.load(saved).adata is not None
    model.save(saved, overwrite=True)
    assert not (saved / "adata.h5ad").exists()


def test_load_reports_an_unreadable_adata_and_takes_any_cpu_device(trained, tmp_path):
    adata, model = trained
    model.save(tmp_path / "m", save_anndata=True)
    loaded = cellvae.SCVI.load(tmp_path / "m", device="cpu:0")  # torch.load refuses "cpu:0"
    np.testing.assert_array_equal(
        loaded.get_latent_representation(), model.get_latent_representation()
    )
    data = tmp_path / "m" / "adata.h5ad"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"Could not read .*adata.h5ad.*load\(dir_path, adata"):
        cellvae.SCVI.load(tmp_path / "m")
    assert cellvae.SCVI.load(tmp_path / "m", adata).adata is adata  # the way out it names


def test_save_and_load_expand_the_home_folder(trained, tmp_path, monkeypatch):
    _, model = trained
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)  # without the expansion, a folder "~" would be made here
    model.save("~/saved")
    assert (tmp_path / "saved" / "model.json").exists()
    assert cellvae.SCVI.load("~/saved").is_trained_


def test_missing_batches_of_new_data_are_told_to_be_dropped(trained):
    adata, model = trained
    new = adata.copy()
    new.obs["batch"] = new.obs["batch"].astype(object)
    new.obs.iloc[0, new.obs.columns.get_loc("batch")] = np.nan
    # filling them with 'nan' (the advice at setup) would make an unseen batch of them
    with pytest.raises(ValueError, match="The reference has no category for them: drop those"):
        model.get_latent_representation(new)


def test_a_failed_save_with_anndata_never_attaches_the_previous_data(
    trained, tmp_path, monkeypatch
):
    adata, model = trained
    model.save(tmp_path / "m", save_anndata=True)
    other = cellvae.SCVI(adata, n_latent=4).train(max_epochs=1, seed=1, progress_bar=False)

    def broken(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ad.AnnData, "write_h5ad", broken)
    with pytest.raises(OSError, match="disk full"):
        other.save(tmp_path / "m", overwrite=True, save_anndata=True)
    monkeypatch.undo()
    loaded = cellvae.SCVI.load(tmp_path / "m")  # the previous save, whole, with its own data
    np.testing.assert_array_equal(
        loaded.get_latent_representation(), model.get_latent_representation()
    )
    assert not list((tmp_path / "m").glob(".adata-*"))  # no temporary file left


# ---------------------------------------------------------------- the user's process (audit H)
def test_saved_files_follow_the_umask(trained, tmp_path):
    _, model = trained
    old = os.umask(0o022)
    try:
        model.save(tmp_path / "m", save_anndata=True)
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "m").iterdir()}
    assert set(modes.values()) == {0o644}, modes  # mkstemp's 0600 kept others out


def test_deterministic_getters_and_load_leave_the_global_generator(trained, tmp_path):
    adata, model = trained
    model.save(tmp_path / "m")
    torch.manual_seed(0)
    expected = torch.randn(3)
    torch.manual_seed(0)
    model.get_latent_representation()
    model.get_latent_library_size()
    model.get_normalized_expression()
    model.get_likelihood_parameters()
    cellvae.SCVI.load(tmp_path / "m", adata)
    assert torch.equal(torch.randn(3), expected)  # unused noise draws advanced it


def test_getters_in_a_train_mode_module_leave_its_statistics(trained):
    _, model = trained
    buffers = {k: v.clone() for k, v in model.module.state_dict().items()}
    expected = model.get_normalized_expression(return_numpy=True)
    model.module.train()
    try:
        got = model.get_normalized_expression(return_numpy=True)  # batch norm in eval mode
        assert model.module.training  # the user's mode back
    finally:
        model.module.eval()
    np.testing.assert_array_equal(got, expected)
    for k, v in model.module.state_dict().items():
        assert torch.equal(v, buffers[k]), k


def test_a_float64_default_dtype_does_not_reach_the_models():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        adata = cellvae.datasets.synthetic(100, 20, n_batches=2, n_proteins=4, random_state=2)
        cellvae.SCVI.setup_anndata(adata, batch_key="batch")
        scvi = cellvae.SCVI(adata, latent_distribution="ln").train(max_epochs=2, progress_bar=False)
        assert scvi.get_latent_representation().dtype == np.float32
        assert next(scvi.module.parameters()).dtype == torch.float32
        cellvae.TOTALVI.setup_anndata(
            adata, batch_key="batch", protein_expression_obsm_key="protein_expression"
        )
        # the kernels read float32: float64 noise and statistics were read as garbage (NaN)
        totalvi = cellvae.TOTALVI(adata, n_latent=3).train(max_epochs=2, progress_bar=False)
        assert np.isfinite(totalvi.history["train_loss"]).all()
    finally:
        torch.set_default_dtype(previous)


def test_train_inside_no_grad_and_inference_mode():
    adata = _setup(60, 10)
    with torch.no_grad():
        model = cellvae.SCVI(adata).train(max_epochs=2, progress_bar=False)
        assert not torch.is_grad_enabled()  # the user's mode, back after training
    assert len(model.history) == 2
    with torch.inference_mode(), pytest.raises(RuntimeError, match="outside that block"):
        cellvae.SCVI(adata).train(max_epochs=1, progress_bar=False)


@pytest.mark.parametrize("fail_at", ["write_h5ad", "json.dump"])
def test_a_failed_save_leaves_the_previous_save_whole_and_nothing_else(
    trained, tmp_path, monkeypatch, fail_at
):
    adata, model = trained
    model.save(tmp_path / "m", save_anndata=True)
    files = sorted(p.name for p in (tmp_path / "m").iterdir())
    other = cellvae.SCVI(adata, n_latent=4).train(max_epochs=1, seed=3, progress_bar=False)

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    if fail_at == "write_h5ad":
        monkeypatch.setattr(ad.AnnData, "write_h5ad", boom)
    else:
        monkeypatch.setattr("cellvae.model._base.json.dump", boom)
    with pytest.raises(OSError, match="No space left"):
        other.save(tmp_path / "m", overwrite=True, save_anndata=True)
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == files  # no temporary file,
    loaded = cellvae.SCVI.load(tmp_path / "m")  # no stray weights; the data still attached
    assert loaded.adata is not None
    np.testing.assert_array_equal(
        loaded.get_latent_representation(), model.get_latent_representation()
    )


def test_saving_never_changes_the_process_umask(trained, tmp_path, monkeypatch):
    _, model = trained
    seen = []
    real = os.umask
    monkeypatch.setattr(os, "umask", lambda mask: seen.append(mask) or real(mask))
    model.save(tmp_path / "m", save_anndata=True)
    assert not seen  # a moment of umask 0 made other threads' files world-writable


@pytest.mark.parametrize("kind", ["float32 csr", "float64 csr", "float64 dense", "float32 dense"])
def test_getters_follow_counts_transformed_in_place(kind):
    # sc.pp.log1p keeps the matrix and (for some types) its arrays: float32 counts were shared
    # and followed without a check, float64 ones copied and silently kept
    adata = cellvae.datasets.synthetic(120, 20, random_state=0)
    if "float64" in kind:
        adata.X = adata.X.astype(np.float64)
    if "dense" in kind:
        adata.X = adata.X.toarray()
    cellvae.SCVI.setup_anndata(adata)
    model = cellvae.SCVI(adata).train(1, progress_bar=False)
    x = adata.X.data if "csr" in kind else adata.X
    np.log1p(x, out=x)  # in place, as scanpy's log1p on these
    with pytest.warns(UserWarning, match="non-integer"):
        library = model.get_latent_library_size().ravel()
    np.testing.assert_allclose(library, np.asarray(adata.X.sum(1)).ravel(), rtol=1e-5)


def test_models_on_the_same_matrix_share_one_converted_copy():
    import gc
    import weakref

    adata = cellvae.datasets.synthetic(120, 20, random_state=0)
    adata.X = adata.X.toarray().astype(np.float64)  # converted to float32: a copy
    cellvae.SCVI.setup_anndata(adata)
    first, second = (cellvae.SCVI(adata).train(1, progress_bar=False) for _ in range(2))
    dense = first._data_cache[1].dense
    assert second._data_cache[1].dense is dense
    assert dense.dtype == torch.float32
    adata.X *= 2  # edited in place: a new copy for the next model
    third = cellvae.SCVI(adata)
    third._data()
    np.testing.assert_array_equal(third._data_cache[1].dense.numpy(), adata.X)
    np.testing.assert_array_equal(dense.numpy(), adata.X / 2)  # the others' copy untouched
    ref = weakref.ref(dense)
    del dense, first, second
    gc.collect()
    assert ref() is None  # the shared copy lives only while a model holds it


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_replaced_data_array_with_one_entry_changed_is_read(dtype):
    # the shared conversion was reused on a sampled digest that missed the changed entry
    adata = cellvae.datasets.synthetic(2000, 1000, random_state=0)
    adata.X = adata.X.astype(dtype)
    assert adata.X.nnz > 4 * 65536  # the digest samples every second entry or fewer
    cellvae.SCVI.setup_anndata(adata)
    model = cellvae.SCVI(adata)
    model._data()
    new = adata.X.data.copy()
    new[1] += 5  # off the sample's stride
    adata.X.data = new
    td, _ = model._data()
    np.testing.assert_array_equal(td.values.numpy(), new.astype(np.float32))


def test_a_new_model_does_not_share_a_copy_after_a_small_in_place_edit():
    adata = cellvae.datasets.synthetic(2000, 500, random_state=0)
    adata.X = adata.X.toarray().astype(np.float64)
    cellvae.SCVI.setup_anndata(adata)
    first = cellvae.SCVI(adata)
    first._data()
    adata.X[1] = 0  # one cell, off the sample's rows
    second = cellvae.SCVI(adata)
    td, _ = second._data()
    np.testing.assert_array_equal(td.dense.numpy(), adata.X.astype(np.float32))


def test_load_hint_about_an_earlier_format_only_where_the_module_changed(tmp_path):
    adata = cellvae.datasets.synthetic(100, 20, random_state=0)
    cellvae.SCVI.setup_anndata(adata)
    cellvae.SCVI(adata).train(1, progress_bar=False).save(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "model.json").read_text())
    config["format_version"] = 1
    (tmp_path / "m" / "model.json").write_text(json.dumps(config))
    cellvae.SCVI.load(tmp_path / "m", adata)  # SCVI's module is the same in format 1
    config["hparams"]["n_hidden"] = 64  # weights of another shape
    (tmp_path / "m" / "model.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="do not fit this model") as err:
        cellvae.SCVI.load(tmp_path / "m", adata)
    assert "earlier cellvae" not in str(err.value)


def test_int64_column_indices_are_copied_once_for_all_models():
    # the values stay the AnnData's own; the int32 copy of the column indices is shared
    adata = cellvae.datasets.synthetic(120, 20, random_state=0)
    adata.X.indices = adata.X.indices.astype(np.int64)
    cellvae.SCVI.setup_anndata(adata)
    first, second = cellvae.SCVI(adata), cellvae.SCVI(adata)
    a, _ = first._data()
    b, _ = second._data()
    assert a.indices.dtype == torch.int32 and b.indices is a.indices
    assert np.shares_memory(a.values.numpy(), adata.X.data)


@pytest.mark.parametrize("fmt", ["coo", "csc", "lil"])
def test_counts_of_other_sparse_formats_convert_to_csr(fmt):
    # anndata 0.10 still accepted these; the shared-conversion cache read CSR's arrays
    import scipy.sparse as sps

    m = sps.random(30, 12, density=0.3, format=fmt, random_state=0, dtype=np.float32)
    td = TensorData.__new__(TensorData)
    td._set_counts(m)
    got = sps.csr_matrix((td.values.numpy(), td.indices.numpy(), td.indptr.numpy()), m.shape)
    np.testing.assert_array_equal(got.toarray(), m.toarray())


@pytest.mark.parametrize("codes_shape", [(7,), (3, 5)])
def test_rows_of_is_indexing_with_its_gradient(codes_shape):
    # the per-batch / per-label parameters' rows by index_select: the values and the gradient of
    # advanced indexing, a transposed (non-contiguous) table included
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 4, codes_shape, generator=g)
    for table in (torch.randn(4, 6, generator=g), torch.randn(6, 4, generator=g).T):
        weights = torch.randn(*codes_shape, 6, generator=g)
        a = table.clone().requires_grad_()
        b = table.clone().requires_grad_()
        got, expected = rows_of(a, codes), b[codes]
        assert torch.equal(got, expected)
        (ga,) = torch.autograd.grad((got * weights).sum(), a)
        (gb,) = torch.autograd.grad((expected * weights).sum(), b)
        torch.testing.assert_close(ga, gb)
