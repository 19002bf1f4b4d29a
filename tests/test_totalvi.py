import itertools

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from test_scvi import assert_same_loss_grads_mean

import cellvae
from cellvae._data import TensorData
from cellvae._sparse import CSRBatch, as_dense
from cellvae.distributions import NegativeBinomialMixture
from cellvae.model.totalvi import protein_background_prior
from cellvae.module import TOTALVAE
from cellvae.nn import DecoderTOTALVI, EncoderTOTALVI

SMALL = {"n_hidden": 32, "n_latent": 4}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The test machine is shared: with two intra-op threads every small op waits for a
    # descheduled OpenMP worker (10+ ms per op under load); one thread is ~10x faster here.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _eccite(n_genes=400):
    adata = cellvae.datasets.eccite_pbmc()
    totals = np.asarray(adata.X.sum(0)).ravel()
    keep = set(np.argsort(-totals)[:n_genes].tolist())
    keep |= {adata.var_names.get_loc("MS4A1"), adata.var_names.get_loc("CD79A")}
    adata = adata[:, sorted(keep)].copy()
    cellvae.TOTALVI.setup_anndata(adata, protein_expression_obsm_key="protein_expression")
    return adata


@pytest.fixture(scope="module")
def eccite():
    adata = _eccite()
    # the latent library (not the default) so its getters are exercised too
    model = cellvae.TOTALVI(adata, n_hidden=64, n_latent=10, use_observed_lib_size=False)
    model.train(max_epochs=80, batch_size=128, early_stopping=False, progress_bar=False)
    return adata, model


def _synthetic_missing(n_obs=300):
    adata = cellvae.datasets.synthetic(n_obs, 40, n_batches=2, n_proteins=6, random_state=1)
    prot = adata.obsm["protein_expression"]
    in_b1 = (adata.obs["batch"] == "batch1").to_numpy()
    prot.loc[in_b1, ["prot1", "prot4"]] = 0.0  # batch1 did not measure prot1 and prot4
    cellvae.TOTALVI.setup_anndata(
        adata, batch_key="batch", protein_expression_obsm_key="protein_expression"
    )
    return adata


@pytest.fixture(scope="module")
def missing():
    adata = _synthetic_missing()
    model = cellvae.TOTALVI(adata, adversarial_classifier=True, **SMALL)
    model.train(max_epochs=30, batch_size=64, early_stopping=False, progress_bar=False)
    return adata, model


def _tensors(adata, device="cpu"):
    td = TensorData.from_adata(adata).to(device)
    return td[torch.arange(td.n_obs)]


# ---------------------------------------------------------------- layers
@pytest.mark.parametrize("distribution", ["ln", "normal"])
def test_encoder_totalvi_six_tuple(distribution):
    enc = EncoderTOTALVI(25, 6, n_cat_list=[3], n_hidden=16, distribution=distribution)
    out = enc(torch.rand(9, 25) * 3, torch.randint(3, (9,)))
    assert len(out) == 6
    qz_m, qz_v, ql_m, ql_v, latent, untran = out
    assert qz_m.shape == qz_v.shape == latent["z"].shape == untran["z"].shape == (9, 6)
    assert ql_m.shape == ql_v.shape == latent["l"].shape == untran["l"].shape == (9, 1)
    assert (qz_v > 0).all() and (ql_v > 0).all() and (latent["l"] > 0).all()
    torch.testing.assert_close(latent["l"], torch.exp(untran["l"].clamp(max=15)))
    if distribution == "ln":
        torch.testing.assert_close(latent["z"], torch.softmax(untran["z"], -1))
    else:
        assert torch.equal(latent["z"], untran["z"])
    untran_z, z = enc.reparameterize_transformation(qz_m, qz_v)
    assert untran_z.shape == z.shape == (9, 6)


def test_encoder_without_a_latent_library_skips_that_stack_and_loads_old_weights():
    """With the observed library (the model's default) the library stack is neither built nor
    run; the z outputs equal those of an encoder that has one, given the same weights and noise,
    and weights saved with the stack (as before it could be left out) load."""
    torch.manual_seed(0)
    full = EncoderTOTALVI(25, 6, n_cat_list=[3], n_hidden=16, dropout_rate=0.0)
    lean = EncoderTOTALVI(
        25, 6, n_cat_list=[3], n_hidden=16, dropout_rate=0.0, latent_library=False
    )
    assert not any(k.startswith("l_") for k in lean.state_dict())
    lean.load_state_dict(full.state_dict())  # the stack's weights are dropped
    x, b = torch.rand(9, 25) * 3, torch.randint(3, (9,))
    torch.manual_seed(1)
    qz_m, qz_v, ql_m, ql_v, latent, untran = lean(x, b)
    torch.manual_seed(1)
    ref = full(x, b)
    assert ql_m is None and ql_v is None and latent["l"] is None and untran["l"] is None
    for ours, theirs in ((qz_m, ref[0]), (qz_v, ref[1]), (latent["z"], ref[4]["z"])):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="Missing key"):  # the reverse is still an error
        full.load_state_dict(lean.state_dict())
    module = cellvae.TOTALVI(_synthetic_missing(), use_observed_lib_size=True)._build_module()
    state = module.state_dict()
    assert not any(".l_encoder." in k for k in state)
    old = EncoderTOTALVI(40 + 6, 20, n_cat_list=[2], n_hidden=256).state_dict()
    state.update({f"encoder.{k}": v for k, v in old.items() if k.startswith("l_")})
    module.load_state_dict(state)  # a whole model saved with the stack


def test_decoder_totalvi_contract():
    dec = DecoderTOTALVI(5, 30, 4, n_cat_list=[2], n_hidden=16)
    dec.eval()
    z, lib, b = torch.randn(6, 5), torch.full((6, 1), 500.0), torch.tensor([0, 1] * 3)
    px, py, log_back = dec(z, lib, b, sample_background=False)
    torch.testing.assert_close(px["scale"].sum(-1), torch.ones(6))
    torch.testing.assert_close(px["rate"], 500.0 * px["scale"])
    assert px["dropout"].shape == (6, 30)
    # without sampling: the log-normal mean of the background, what its samples average to
    torch.testing.assert_close(log_back, py["back_alpha"] + py["back_beta"] ** 2 / 2)
    torch.testing.assert_close(py["rate_back"], torch.exp(log_back))
    torch.manual_seed(0)
    draws = torch.stack([dec(z, lib, b)[1]["rate_back"] for _ in range(4000)])
    # within 5 standard errors of the sample mean (a log-normal with a wide background spread
    # has a heavy tail: a fixed 10% tolerance failed for some initialisations)
    stderr = draws.std(0) / len(draws) ** 0.5
    assert ((draws.mean(0) - py["rate_back"]).abs() < 5 * stderr).all()
    assert (py["fore_scale"] >= 1).all() and (py["back_beta"] > 0).all()
    torch.testing.assert_close(py["rate_fore"], py["rate_back"] * py["fore_scale"])
    assert py["mixing"].shape == (6, 4)
    _, _, sampled = dec(z, lib, b)
    assert not torch.equal(sampled, log_back)
    assert dec(z, lib, b, compute_dropout=False)[0]["dropout"] is None
    # without zero inflation the layer is not built, and asking for its output is an error
    nb = DecoderTOTALVI(5, 30, 4, n_cat_list=[2], n_hidden=16, zero_inflation=False)
    assert nb.px_dropout_decoder is None
    assert nb(z, lib, b, compute_dropout=False)[0]["dropout"] is None
    with pytest.raises(ValueError, match="zero_inflation=True"):
        nb(z, lib, b)


def test_decoder_totalvi_heads_equal_linear_layers_on_h_z_and_one_hot_covariates():
    # scvi-tools' heads are linear layers on [h, z, one-hot batch, one-hot covariate]; the
    # zero-inflation head reads the mixing stack's h; the background scale is a softplus
    n_cats = [3, 1, 4]  # the one-category covariate gets no columns, as in the stacks
    dec = DecoderTOTALVI(5, 30, 4, n_cat_list=n_cats, n_hidden=16).eval()
    z = torch.randn(12, 5)
    cats = [torch.arange(12) % 3, torch.zeros(12, dtype=torch.long), torch.arange(12) // 3]
    with torch.no_grad():
        px, py, _ = dec(z, torch.full((12, 1), 100.0), *cats, sample_background=False)
        h = {
            name: torch.cat([getattr(dec, name)(z, *cats), z], -1)
            for name in ("px_decoder", "py_back_decoder", "py_fore_decoder", "py_mixing_decoder")
        }
    one_hot = torch.cat(
        [torch.nn.functional.one_hot(cats[0], 3), torch.nn.functional.one_hot(cats[2], 4)], 1
    )

    def reference(layer, key, x):
        embs = dec.head_covariates[key].embeddings
        weight = torch.cat([layer.weight.double(), *(e.weight.double().T for e in embs)], 1)
        return torch.cat([x.double(), one_hot.double()], 1) @ weight.T + layer.bias.double()

    expected = {
        "scale": torch.softmax(reference(dec.px_scale_decoder, "px_scale", h["px_decoder"]), -1),
        "dropout": reference(dec.px_dropout_decoder, "px_dropout", h["py_mixing_decoder"]),
        "back_alpha": reference(dec.py_back_alpha, "back_alpha", h["py_back_decoder"]),
        "back_beta": torch.nn.functional.softplus(
            reference(dec.py_back_beta, "back_beta", h["py_back_decoder"])
        ),
        "fore_scale": 1
        + torch.relu(reference(dec.py_fore_scale, "fore_scale", h["py_fore_decoder"])),
        "mixing": reference(dec.py_mixing, "mixing", h["py_mixing_decoder"]),
    }
    got = {**px, **py}
    for key, value in expected.items():
        torch.testing.assert_close(got[key].double(), value, rtol=1e-5, atol=1e-6, msg=key)
    assert len(dec.head_covariates["mixing"].embeddings) == 2  # batch and the 4-category one


@pytest.mark.parametrize("scale", [1e-3, 0.4, 3.0, 150.0])
def test_background_scale_starts_at_its_prior(scale):
    # σ = softplus(bias): the bias starts at softplus's inverse of the prior's scale (finite
    # for large scales too, where log(e^s - 1) overflows float32)
    module = TOTALVAE(
        30,
        4,
        n_batch=1,
        n_hidden=16,
        use_observed_lib_size=True,
        protein_background_prior_mean=np.zeros((4, 1)),
        protein_background_prior_scale=np.full((4, 1), scale),
    )
    sigma = torch.nn.functional.softplus(module.decoder.py_back_beta.bias.double())
    torch.testing.assert_close(
        sigma, torch.full((4,), scale, dtype=torch.float64), rtol=1e-4, atol=0
    )


def test_decoder_totalvi_background_rate_stays_finite():
    # an outlier cell drove back_beta to ~400 in training: exp of its log-normal sample or mean
    # overflowed float32 to inf, and the protein likelihood became NaN; the rate stops at e^60
    dec = DecoderTOTALVI(5, 30, 4, n_cat_list=[2], n_hidden=16).eval()
    z, lib, b = torch.randn(6, 5), torch.full((6, 1), 500.0), torch.tensor([0, 1] * 3)
    with torch.no_grad():
        dec.py_back_beta.bias[:2] = 400.0  # σ ≈ 400 for the first two proteins
    for sample in (False, True):
        _, py, log_back = dec(z, lib, b, sample_background=sample)
        big = log_back > 60
        assert big[:, :2].any() and not big[:, 2:].any()
        assert torch.isfinite(py["rate_back"]).all() and torch.isfinite(py["rate_fore"]).all()
        torch.testing.assert_close(py["rate_back"][big], torch.full_like(log_back[big], 60).exp())
        torch.testing.assert_close(py["rate_back"][~big], log_back[~big].exp())


@pytest.mark.parametrize("likelihood", ["nb", "zinb"])
def test_totalvae_builds_the_zero_inflation_layer_only_for_zinb(likelihood):
    module = TOTALVAE(
        30, 4, n_batch=2, n_hidden=16, gene_likelihood=likelihood, use_observed_lib_size=True
    )
    assert (module.decoder.px_dropout_decoder is not None) == (likelihood == "zinb")
    tensors = {
        "x": torch.poisson(torch.full((6, 30), 2.0)),
        "protein": torch.poisson(torch.full((6, 4), 20.0)),
        "batch": torch.tensor([0, 1] * 3),
    }
    out = module(tensors)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None for p in module.decoder.px_decoder.parameters())


# ---------------------------------------------------------------- module
def test_protein_loss_is_masked_mixture_log_prob_and_not_warmed_up():
    adata = _synthetic_missing(80)
    reg = cellvae._registry.Registry.from_adata(adata)
    mask = torch.as_tensor(reg.protein_batch_mask)
    assert mask.shape == (2, 6)
    torch.manual_seed(0)
    module = TOTALVAE(
        40,
        6,
        n_batch=2,
        n_hidden=16,
        n_latent=3,
        library_log_means=reg.library_log_means,
        library_log_vars=reg.library_log_vars,
        protein_batch_mask=reg.protein_batch_mask,
    )
    t = _tensors(adata)
    inf = module.inference(t)
    gen = module.generative(inf["z"], inf["library"], t)
    py_ = gen["py_"]
    mixture = NegativeBinomialMixture(
        py_["rate_back"], py_["rate_fore"], torch.exp(module.py_r), py_["mixing"]
    )
    expected = -(mixture.log_prob(t["protein"]) * mask[t["batch"]]).sum(-1)
    out = module.loss(t, inf, gen, kl_weight=0.3)
    torch.testing.assert_close(out.extra["reconstruction_protein"], expected)
    rec_genes = out.reconstruction - expected
    torch.testing.assert_close(rec_genes, -gen["px"].log_prob(as_dense(t["x"])).sum(-1))
    kl_l = cellvae.module.kl_normal(
        inf["ql_m"],
        inf["ql_v"],
        module.library_log_means[t["batch"]].unsqueeze(-1),
        module.library_log_vars[t["batch"]].unsqueeze(-1),
    )
    kl_z = cellvae.module.kl_normal(inf["qz_m"], inf["qz_v"])
    torch.testing.assert_close(out.kl_local, kl_z + out.extra["kl_background"] + kl_l)
    # protein reconstruction enters the loss with weight 1 whatever the warm-up
    loss = (out.reconstruction + 0.3 * (kl_z + out.extra["kl_background"]) + kl_l).mean()
    torch.testing.assert_close(out.loss, loss)
    # unmeasured entries do not matter: changing them changes neither term
    t2 = dict(t)
    t2["protein"] = t["protein"].clone()
    t2["protein"][:, [1, 4]] += (t["batch"] == 1).float().unsqueeze(-1) * 50
    out2 = module.loss(t2, inf, gen, kl_weight=0.3)
    b1 = t["batch"] == 1
    torch.testing.assert_close(
        out2.extra["reconstruction_protein"][b1], out.extra["reconstruction_protein"][b1]
    )


@pytest.mark.parametrize(
    "options",
    [
        {"gene_dispersion": "gene-batch", "protein_dispersion": "protein-label"},
        {"gene_dispersion": "gene-label", "protein_dispersion": "protein-batch"},
        {"gene_dispersion": "gene", "protein_dispersion": "protein"},
    ],
)
def test_dispersions_of_each_cell_are_its_categorys_rows(options):
    """θ of genes and proteins: exp of the cell's batch or label row (or the one row)."""
    adata = _synthetic_missing(40)
    t = _tensors(adata)
    t["labels"] = torch.arange(40) % 3
    torch.manual_seed(0)
    module = TOTALVAE(
        40, 6, n_batch=2, n_labels=3, n_hidden=16, n_latent=3, **options,
        library_log_means=[5.0, 5.0], library_log_vars=[0.5, 0.5],
    )  # fmt: skip
    with torch.no_grad():
        module.px_r.normal_()
        module.py_r.normal_()
    inf = module.inference(t, n_samples=2)
    other = 1 - t["batch"]  # the batch override: decoded as if from the other batch
    for z, batch in itertools.product((inf["z"][0], inf["z"]), (None, other)):
        lib = inf["library"][0] if z.dim() == 2 else inf["library"]
        gen = module.generative(z, lib, t, batch=batch)
        codes = {"batch": (t["batch"] if batch is None else batch).numpy()}
        codes["label"] = t["labels"].numpy()
        for got, param, kind in (
            (gen["px"].theta, module.px_r, options["gene_dispersion"]),
            (gen["py"].theta1, module.py_r, options["protein_dispersion"]),
        ):
            table = np.exp(param.detach().double().numpy())
            want = table[codes[kind.split("-")[1]]] if "-" in kind else table
            got = got.detach().double().numpy()
            np.testing.assert_allclose(got, np.broadcast_to(want, got.shape), rtol=1e-6)


@pytest.mark.parametrize(
    "options",
    [
        {"gene_likelihood": "zinb", "latent_distribution": "ln", "gene_dispersion": "gene-batch"},
        {"protein_dispersion": "protein-batch", "use_observed_lib_size": True},
        {"protein_dispersion": "protein-label", "gene_dispersion": "gene-label"},
        {"adversarial_classifier": True, "n_cats_per_cov": [3], "n_continuous_cov": 1},
    ],
)
def test_module_options_forward_backward(options):
    adata = _synthetic_missing(40)
    t = _tensors(adata)
    if "n_continuous_cov" in options:
        t["cat_covs"] = torch.randint(3, (40, 1))
        t["cont_covs"] = torch.rand(40, 1)
    module = TOTALVAE(
        40, 6, n_batch=2, n_labels=3, n_hidden=16, n_latent=3, **options,
        library_log_means=[5.0, 5.0], library_log_vars=[0.5, 0.5],
    )  # fmt: skip
    out = module(t, kl_weight=0.5)
    assert out.reconstruction.shape == out.kl_local.shape == (40,)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    inf = module.inference(t, n_samples=3)
    gen = module.generative(inf["z"], inf["library"], t)
    assert gen["py"].log_prob(t["protein"]).shape == (3, 40, 6)
    assert gen["px"].log_prob(as_dense(t["x"])).shape == (3, 40, 40)


@pytest.mark.parametrize("likelihood", ["nb", "zinb"])
@pytest.mark.parametrize("observed", [False, True])
def test_lazy_gene_mean_gives_the_same_loss_and_gradients(likelihood, observed):
    # training builds px from the gene logits (softmax inside the likelihood kernel); the eager
    # scale / rate of the getters must give the same loss and gradients, the library's included
    adata = _synthetic_missing(40)
    t = _tensors(adata)
    torch.manual_seed(0)
    module = TOTALVAE(
        40, 6, n_batch=2, n_hidden=16, n_latent=3, gene_likelihood=likelihood,
        use_observed_lib_size=observed, library_log_means=[5.0, 5.0],
        library_log_vars=[0.5, 0.5],
    ).eval()  # fmt: skip
    inf = module.inference(t)
    params = list(module.parameters())
    results = []
    for lazy in (False, True):
        gen = module.generative(
            inf["z"], inf["library"], t, sample_background=False, lazy_mean=lazy
        )
        assert (gen["px_"]["rate"] is None) == lazy
        loss = module.loss(t, inf, gen).loss
        grads = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)
        results.append((loss, grads, gen["px"].mu))
    assert_same_loss_grads_mean(*results)


def test_sparse_counts_give_the_dense_encoding_and_gradients():
    """A CSR batch (counts kept sparse next to the dense proteins) = the densified batch."""
    adata = _synthetic_missing(50)
    t_sparse = _tensors(adata)
    t_sparse["cont_covs"] = torch.rand(50, 2)
    assert isinstance(t_sparse["x"], CSRBatch)
    t_dense = {**t_sparse, "x": as_dense(t_sparse["x"])}
    torch.manual_seed(0)
    module = TOTALVAE(
        40, 6, n_batch=2, n_hidden=16, n_latent=3, n_continuous_cov=2,
        library_log_means=[5.0, 5.0], library_log_vars=[0.5, 0.5],
    )  # fmt: skip
    module.eval()  # no dropout; batch norm with running statistics
    first = module.encoder.encoder.linears[0].weight
    results = []
    for t in (t_sparse, t_dense):
        torch.manual_seed(1)  # the same latent samples
        out = module(t, kl_weight=1.0)
        results.append((out.loss, torch.autograd.grad(out.loss, first)[0]))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])


def test_adversarial_terms_train_classifier_and_encoder_separately():
    adata = _synthetic_missing(60)
    t = _tensors(adata)
    torch.manual_seed(0)
    module = TOTALVAE(
        40, 6, n_batch=2, n_hidden=16, n_latent=3, adversarial_classifier=True,
        library_log_means=[5.0, 5.0], library_log_vars=[0.5, 0.5],
    )  # fmt: skip
    z = torch.randn(60, 3, requires_grad=True)
    ce, fool = module._adversarial(z, t["batch"])
    clf_params = list(module.classifier.parameters())
    grads = torch.autograd.grad(fool.mean(), [z, *clf_params], allow_unused=True)
    assert grads[0].abs().sum() > 0 and all(g is None for g in grads[1:])
    grads = torch.autograd.grad(ce.mean(), [z, *clf_params], allow_unused=True)
    assert grads[0] is None and all(g.abs().sum() > 0 for g in grads[1:])
    assert "adversarial_ce" in module(t).extra


def test_background_prior_is_the_lower_mode_per_batch_and_fills_missing():
    rng = np.random.default_rng(0)
    n = 600
    batch = np.repeat([0, 1], n // 2)
    background = np.array([[4.0, 10.0, 2.0], [8.0, 20.0, 2.0]])[batch]
    positive = rng.random((n, 3)) < 0.4
    y = rng.poisson(np.where(positive, background * 30, background)).astype(np.float32)
    y[batch == 1, 2] = 0  # protein 2 not measured in batch 1
    mask = np.array([[True, True, True], [True, True, False]])
    mean, scale = protein_background_prior(y, batch, mask)
    assert mean.shape == scale.shape == (3, 2)
    expected = np.log1p(np.array([[4.0, 8.0], [10.0, 20.0], [2.0, 2.0]]))
    np.testing.assert_allclose(mean[:2], expected[:2], atol=0.25)
    assert mean[2, 1] == mean[2, 0]  # filled from the batch that measured it
    assert (scale > 0).all() and (scale < 1).all()


# ---------------------------------------------------------------- training on real data
def test_eccite_training_lowers_validation_elbo(eccite):
    adata, model = eccite
    val = model.history["validation_elbo"].to_numpy()
    assert np.isfinite(val).all()
    assert val[-1] < val[0] - 500
    hist = model.history
    assert {"validation_reconstruction_protein", "validation_kl_background"} <= set(hist)
    # the protein terms of training too, each a part of the total it belongs to
    assert list(hist.columns[:6]) == [
        "train_loss",
        "train_elbo",
        "train_reconstruction",
        "train_kl_local",
        "train_reconstruction_protein",
        "train_kl_background",
    ]
    assert (0 < hist["train_reconstruction_protein"]).all()
    assert (hist["train_reconstruction_protein"] < hist["train_reconstruction"]).all()
    assert (0 <= hist["train_kl_background"]).all()
    assert (hist["train_kl_background"] <= hist["train_kl_local"] + 1e-4).all()
    elbo = model.get_elbo()
    assert np.isfinite(elbo) and elbo < 0
    rec = model.get_reconstruction_error()
    assert list(rec) == ["reconst_loss_gene", "reconst_loss_protein"]  # scvi-tools' keys
    assert rec["reconst_loss_gene"] > 0 and rec["reconst_loss_protein"] > 0
    torch.manual_seed(3)
    cells = model.get_reconstruction_error(return_mean=False, indices=range(100))
    torch.manual_seed(3)
    neg_elbo = -model.get_elbo(return_mean=False, indices=range(100))
    total = cells["reconst_loss_gene"] + cells["reconst_loss_protein"]
    assert (neg_elbo >= total - 1e-3).all()  # the same draws: −ELBO = both terms + KL
    with torch.no_grad():  # the protein term is the module's, per cell
        model.module.eval()
        torch.manual_seed(3)
        out = model.module(TensorData.from_adata(adata).to(model.device)[torch.arange(100)])
    np.testing.assert_allclose(
        cells["reconst_loss_protein"], out.extra["reconstruction_protein"].cpu().numpy(), rtol=1e-5
    )


def test_eccite_cd19_foreground_higher_in_b_marker_cells(eccite):
    adata, model = eccite
    fg = model.get_protein_foreground_probability(protein_list=["CD19"])
    assert list(fg.columns) == ["CD19"] and list(fg.index) == list(adata.obs_names)
    markers = np.asarray(adata[:, ["MS4A1", "CD79A"]].X.sum(1)).ravel()
    positive, negative = markers >= 3, markers == 0  # ≥ 3 B-cell marker UMIs vs none
    assert positive.sum() >= 15
    # The ranking, not a mean's size: over 24 training runs (seeds 0-13 with torch's dropout,
    # 0-9 with cellvae's) the AUC was 0.90-0.98 and the mean foreground 0.16-0.82 in
    # marker-positive vs 0.02-0.06 in marker-negative cells (an absolute margin on the means
    # failed for some seeds); a constant or inverted foreground gives an AUC of 0.5 or below.
    fg_pos, fg_neg = fg["CD19"][positive], fg["CD19"][negative]
    assert _auc(fg_pos, fg_neg) > 0.85 and fg_pos.mean() > 4 * fg_neg.mean()
    # denoised CD19 follows (same runs: AUC 0.90-0.98, ratio of means 3.8-23)
    _, prot = model.get_normalized_expression(protein_list=["CD19"], gene_list=["MS4A1"])
    prot_pos, prot_neg = prot["CD19"][positive], prot["CD19"][negative]
    assert _auc(prot_pos, prot_neg) > 0.85 and prot_pos.mean() > 2.5 * prot_neg.mean()


def _auc(pos, neg) -> float:
    """Probability that a marker-positive cell scores above a marker-negative one."""
    from scipy.stats import mannwhitneyu

    return mannwhitneyu(pos, neg).statistic / (len(pos) * len(neg))


def test_eccite_getter_options(eccite):
    adata, model = eccite
    rna, prot = model.get_normalized_expression()
    assert rna.shape == (500, adata.n_vars) and prot.shape == (500, 49)
    np.testing.assert_allclose(rna.sum(1), 1.0, rtol=1e-4)
    _, with_bg = model.get_normalized_expression(include_protein_background=True)
    assert (with_bg.to_numpy() >= prot.to_numpy() - 1e-4).all()
    _, scaled = model.get_normalized_expression(scale_protein=True, return_numpy=True)
    np.testing.assert_allclose(scaled.sum(1), 1.0, rtol=1e-4)
    lat, _ = model.get_normalized_expression(library_size="latent", return_numpy=True)
    with torch.no_grad():
        inf = model.module.inference(_tensors(adata, model.device))
    ql_m, ql_v = (inf[k].squeeze(-1).cpu().numpy() for k in ("ql_m", "ql_v"))
    # the log-normal mean exp(m + v/2), as get_latent_library_size reports it (clamped at e^15)
    want = np.exp(np.minimum(ql_m + ql_v / 2, 15.0))
    np.testing.assert_allclose(lat.sum(1), want, rtol=1e-3)
    np.testing.assert_allclose(lat.sum(1), model.get_latent_library_size().ravel(), rtol=1e-3)
    np.testing.assert_allclose(model.get_latent_library_size()[:, 0], np.exp(ql_m + ql_v / 2), 1e-4)
    lat, sampled = model.get_normalized_expression(
        library_size="latent", n_samples=3, sample_protein_mixing=True, return_numpy=True
    )
    assert np.isfinite(lat).all() and np.isfinite(sampled).all()
    sub_rna, sub_prot = model.get_normalized_expression(
        indices=[4, 2], gene_list=["CD79A"], protein_list=["CD8", "CD4"]
    )
    np.testing.assert_allclose(sub_prot.to_numpy(), prot.iloc[[4, 2]][["CD8", "CD4"]], rtol=1e-5)
    np.testing.assert_allclose(sub_rna.to_numpy(), rna.iloc[[4, 2]][["CD79A"]], rtol=1e-5)
    one_rna, one_prot = model.get_normalized_expression(gene_list="CD79A", protein_list="CD8")
    assert list(one_rna.columns) == ["CD79A"] and list(one_prot.columns) == ["CD8"]
    np.testing.assert_allclose(one_prot.to_numpy(), prot[["CD8"]], rtol=1e-5)
    with pytest.raises(KeyError, match="Proteins not in the model"):
        model.get_protein_foreground_probability(protein_list=["CD999"])
    assert model.get_latent_representation(give_mean=False).shape == (500, 10)


def test_save_load_identical_latent(eccite, tmp_path):
    adata, model = eccite
    model.save(tmp_path / "m")
    loaded = cellvae.TOTALVI.load(tmp_path / "m", adata)
    np.testing.assert_array_equal(
        loaded.get_latent_representation(), model.get_latent_representation()
    )
    _, p1 = model.get_normalized_expression(return_numpy=True)
    _, p2 = loaded.get_normalized_expression(return_numpy=True)
    np.testing.assert_array_equal(p1, p2)
    assert loaded.hparams == model.hparams
    bare = cellvae.TOTALVI.load(tmp_path / "m", device=model.device)
    np.testing.assert_array_equal(
        bare.get_latent_representation(adata), model.get_latent_representation()
    )
    with pytest.raises(ValueError, match="holds a 'TOTALVI' model"):
        cellvae.SCVI.load(tmp_path / "m", adata)


def test_load_rejects_reordered_proteins(eccite, tmp_path):
    adata, model = eccite
    model.save(tmp_path / "m")
    query = adata.copy()
    prot = query.obsm["protein_expression"]
    query.obsm["protein_expression"] = prot[list(prot.columns[::-1])]
    cellvae.TOTALVI.setup_anndata(query, protein_expression_obsm_key="protein_expression")
    with pytest.raises(ValueError, match="different order"):
        model.get_latent_representation(query)
    with pytest.raises(ValueError, match="different order"):  # was: used in the wrong order
        cellvae.TOTALVI.load(tmp_path / "m", query)


# ---------------------------------------------------------------- missing proteins
def test_missing_proteins_masked_and_decoded_from_other_batch(missing):
    adata, model = missing
    mask = np.asarray(model.registry_.protein_batch_mask)
    expected = np.ones((2, 6), bool)
    expected[1, [1, 4]] = False
    np.testing.assert_array_equal(mask, expected)
    np.testing.assert_array_equal(model.module.protein_batch_mask.cpu().numpy(), expected)
    rna_totals = np.asarray(adata.X.sum(1)).ravel()  # the observed library, on count scale
    np.testing.assert_allclose(model.get_latent_library_size()[:, 0], rna_totals, rtol=1e-5)
    assert np.isfinite(model.history["train_loss"]).all()
    assert np.isfinite(model.history["validation_elbo"]).all()
    assert "validation_adversarial_ce" in model.history

    b1 = (adata.obs["batch"] == "batch1").to_numpy()
    _, own = model.get_normalized_expression(return_numpy=True)
    _, as0 = model.get_normalized_expression(transform_batch="batch0", return_numpy=True)
    _, as1 = model.get_normalized_expression(transform_batch="batch1", return_numpy=True)
    assert np.isfinite(as0).all()
    np.testing.assert_allclose(as0[~b1], own[~b1], rtol=1e-5)  # batch0 cells: unchanged
    assert not np.allclose(as0[b1][:, [1, 4]], own[b1][:, [1, 4]])
    # batch1 cells decoded as batch0 show prot1 / prot4 at batch0's level, not at zero
    _, total0 = model.get_normalized_expression(
        transform_batch="batch0", include_protein_background=True, return_numpy=True
    )
    observed0 = adata.obsm["protein_expression"].to_numpy()[~b1][:, [1, 4]].mean(0)
    ratio = total0[b1][:, [1, 4]].mean(0) / observed0
    assert np.all((ratio > 0.5) & (ratio < 1.5)), ratio
    # over both batches: missing proteins come only from batch0, the others are averaged
    _, both = model.get_normalized_expression(
        transform_batch=["batch0", "batch1"], return_numpy=True
    )
    np.testing.assert_allclose(both[:, [1, 4]], as0[:, [1, 4]], rtol=1e-5)
    rest = [0, 2, 3, 5]
    np.testing.assert_allclose(both[:, rest], (as0[:, rest] + as1[:, rest]) / 2, rtol=1e-4)
    fg = model.get_protein_foreground_probability(
        transform_batch=["batch0", "batch1"], return_numpy=True
    )
    fg0 = model.get_protein_foreground_probability(transform_batch="batch0", return_numpy=True)
    np.testing.assert_allclose(fg[:, [1, 4]], fg0[:, [1, 4]], rtol=1e-5)
    # every sample kept: their mean is the averaged output, with the same masking
    kw = dict(transform_batch=["batch0", "batch1"], n_samples=4, indices=range(40), batch_size=16)
    torch.manual_seed(5)
    rna_mean, prot_mean = model.get_normalized_expression(return_numpy=True, **kw)
    torch.manual_seed(5)
    rna_s, prot_s = model.get_normalized_expression(return_mean=False, **kw)
    # cells × features × samples, as scvi-tools' TOTALVI (SCVI: samples first)
    assert rna_s.shape == (40, 40, 4) and prot_s.shape == (40, 6, 4)
    np.testing.assert_allclose(rna_s.mean(-1), rna_mean, rtol=1e-4)
    np.testing.assert_allclose(prot_s.mean(-1), prot_mean, rtol=1e-4)
    torch.manual_seed(5)
    fg_mean = model.get_protein_foreground_probability(return_numpy=True, **kw)
    torch.manual_seed(5)
    fg_s = model.get_protein_foreground_probability(return_mean=False, protein_list="prot4", **kw)
    assert fg_s.shape == (40, 1, 4)
    np.testing.assert_allclose(fg_s.mean(-1), fg_mean[:, [4]], rtol=1e-4)
    # the background mean, by the other getters: σ(mixing) · rate_back is what
    # include_protein_background adds, and σ(mixing) is 1 − the foreground probability
    _, fore = model.get_normalized_expression(transform_batch="batch0", return_numpy=True)
    _, total = model.get_normalized_expression(
        transform_batch="batch0", include_protein_background=True, return_numpy=True
    )
    fg0 = model.get_protein_foreground_probability(transform_batch="batch0", return_numpy=True)
    background = model.get_protein_background_mean(transform_batch="batch0")
    assert list(background.columns) == [f"prot{i}" for i in range(6)]
    np.testing.assert_allclose(background.to_numpy(), (total - fore) / (1 - fg0), rtol=1e-4)
    torch.manual_seed(5)
    bg_s = model.get_protein_background_mean(return_mean=False, **kw)
    torch.manual_seed(5)
    bg_mean = model.get_protein_background_mean(return_numpy=True, **kw)
    assert bg_s.shape == (40, 6, 4)
    np.testing.assert_allclose(bg_s.mean(-1), bg_mean, rtol=1e-4)
    # proteins scaled to sum to 1 still do after the masked average over batches
    _, scaled = model.get_normalized_expression(
        transform_batch=["batch0", "batch1"], scale_protein=True, return_numpy=True
    )
    np.testing.assert_allclose(scaled.sum(1), 1.0, rtol=1e-5)
    _, scaled0 = model.get_normalized_expression(
        transform_batch="batch0", scale_protein=True, return_numpy=True
    )
    np.testing.assert_allclose(scaled0, as0 / as0.sum(1, keepdims=True), rtol=1e-5)


# ---------------------------------------------------------------- misuse
@pytest.mark.parametrize(
    "option", [{"gene_dispersion": "gene-label"}, {"protein_dispersion": "protein-label"}]
)
def test_per_label_dispersion_needs_known_labels_of_new_data(option):
    adata = cellvae.datasets.synthetic(120, 20, n_proteins=4)
    cellvae.TOTALVI.setup_anndata(
        adata, labels_key="cell_type", protein_expression_obsm_key="protein_expression"
    )
    model = cellvae.TOTALVI(adata, **option, **SMALL).train(max_epochs=1, progress_bar=False)
    name = next(iter(option))
    query = cellvae.datasets.synthetic(60, 20, n_labels=5, n_proteins=4, random_state=2)
    with pytest.raises(ValueError, match=rf"{name}=.*obs\['cell_type'\] has \['type3', 'type4'\]"):
        model.get_normalized_expression(query)
    del query.obs["cell_type"]
    with pytest.raises(ValueError, match="needs the label of every cell"):
        model.get_protein_foreground_probability(query)


def test_changed_proteins_of_the_models_own_anndata_are_checked():
    adata = cellvae.datasets.synthetic(80, 15, n_proteins=4)
    cellvae.TOTALVI.setup_anndata(adata, protein_expression_obsm_key="protein_expression")
    model = cellvae.TOTALVI(adata, **SMALL).train(max_epochs=1, progress_bar=False)
    before = model.get_latent_representation()
    prot = adata.obsm["protein_expression"]
    adata.obsm["protein_expression"] = prot[prot.columns[::-1]]
    with pytest.raises(ValueError, match="same names in a different order"):
        model.get_latent_representation()
    adata.obsm["protein_expression"] = prot.copy()  # a new object with the model's proteins
    np.testing.assert_array_equal(model.get_latent_representation(), before)


def test_bad_inputs_give_clear_errors():
    adata = cellvae.datasets.synthetic(60, 20, n_proteins=3)
    cellvae.SCVI.setup_anndata(adata, batch_key="batch")
    with pytest.raises(ValueError, match="registered without them"):
        cellvae.TOTALVI(adata)
    with pytest.raises(ValueError, match="protein_expression_obsm_key"):
        cellvae.TOTALVI.setup_anndata(adata, protein_expression_obsm_key=None)
    neg = adata.copy()
    neg.obsm["protein_expression"].iloc[3, 1] = -2.0
    with pytest.raises(ValueError, match="negative protein counts"):
        cellvae.TOTALVI.setup_anndata(neg, protein_expression_obsm_key="protein_expression")
    with pytest.raises(ValueError, match="incorrect shape"):  # anndata guards the rows
        adata.obsm["protein_expression"] = np.ones((59, 3))
    with pytest.raises(KeyError, match="not in adata.obsm"):
        cellvae.TOTALVI.setup_anndata(adata, protein_expression_obsm_key="adt")
    cellvae.TOTALVI.setup_anndata(adata, protein_expression_obsm_key="protein_expression")
    with pytest.raises(ValueError, match="protein_dispersion must be one of"):
        cellvae.TOTALVI(adata, protein_dispersion="protein-cell")
    with pytest.raises(ValueError, match=r"use_batch_norm must be one of .*, got 'False'"):
        cellvae.TOTALVI(adata, use_batch_norm="False")  # a string "False" is no False
    with pytest.raises(TypeError, match="Unknown TOTALVI options"):
        cellvae.TOTALVI(adata, n_hiden=3)
    assert cellvae.TOTALVI._train_defaults == {
        "lr": 4e-3,
        "batch_size": 256,
        "early_stopping": True,
        "reduce_lr_on_plateau": True,
    }


def test_setup_mudata_rejects_unknown_modalities_keys():
    # checked before mudata is needed: scvi-tools' form would otherwise be silently ignored
    scvi_tools_form = {"rna_layer": "rna", "protein_layer": "protein", "batch_key": "rna"}
    with pytest.raises(KeyError, match=r"Unknown modalities keys \['batch_key', 'protein_layer'"):
        cellvae.TOTALVI.setup_mudata(object(), modalities=scvi_tools_form)


def test_setup_mudata_aligns_cells_and_rejects_missing_rows():
    mudata = pytest.importorskip("mudata")
    adata = cellvae.datasets.synthetic(50, 20, n_proteins=3)
    prot = adata.obsm.pop("protein_expression")
    shuffled = prot.iloc[np.random.default_rng(0).permutation(50)]
    mdata = mudata.MuData({"rna": adata, "adt": ad.AnnData(shuffled)})
    rna = cellvae.TOTALVI.setup_mudata(mdata, batch_key="batch", modalities={"protein": "adt"})
    pd.testing.assert_frame_equal(rna.obsm["protein_expression"], prot, check_dtype=False)
    assert "protein_expression" not in mdata.mod["rna"].obsm  # the MuData is left alone
    assert cellvae.TOTALVI(rna).registry_.n_proteins == 3
    short = mudata.MuData({"rna": adata, "protein": ad.AnnData(prot.iloc[:45])})
    with pytest.raises(ValueError, match="5 cells of the 'rna' modality have no row"):
        cellvae.TOTALVI.setup_mudata(short)
    with pytest.raises(KeyError, match="modality 'protein' is not in the MuData"):
        cellvae.TOTALVI.setup_mudata(mdata)
    with pytest.raises(TypeError, match=r"got a MuData.*TOTALVI.setup_mudata\(mdata"):
        cellvae.TOTALVI(mdata)


# ---------------------------------------------------------------- scanpy style
def test_tl_totalvi_writes_results_and_survives_h5ad(tmp_path):
    adata = _synthetic_missing(120)
    del adata.uns["cellvae"]
    res = cellvae.tl.totalvi(
        adata, batch_key="batch", max_epochs=2, progress_bar=False, n_latent=5, n_hidden=32
    )
    assert res is None
    assert adata.obsm["X_totalVI"].shape == (120, 5)
    denoised = adata.obsm["protein_denoised"]
    assert isinstance(denoised, pd.DataFrame) and denoised.shape == (120, 6)
    assert list(denoised.columns) == [f"prot{i}" for i in range(6)]
    assert np.isfinite(denoised.to_numpy()).all()
    assert len(adata.uns["totalvi"]["history"]["train_loss"]) == 2
    assert adata.uns["totalvi"]["params"]["n_latent"] == 5
    adata.write_h5ad(tmp_path / "a.h5ad")
    back = ad.read_h5ad(tmp_path / "a.h5ad")
    np.testing.assert_array_equal(back.obsm["X_totalVI"], adata.obsm["X_totalVI"])
    np.testing.assert_array_equal(back.obsm["protein_denoised"], denoised.to_numpy())
    out = cellvae.tl.totalvi(
        adata, max_epochs=1, progress_bar=False, key_added="X_t", copy=True, **SMALL
    )
    assert "X_t" in out.obsm and "X_t" in out.uns and "X_t" not in adata.obsm
    # proteins as an array, named by an uns key: the denoised proteins keep the names
    arr = adata.copy()
    arr.obsm["protein_expression"] = adata.obsm["protein_expression"].to_numpy()
    arr.uns["adt_names"] = [f"p{i}" for i in range(6)]
    cellvae.tl.totalvi(arr, max_epochs=1, progress_bar=False, protein_names_uns_key="adt_names")
    assert list(arr.obsm["protein_denoised"].columns) == arr.uns["adt_names"]


@pytest.mark.parametrize(
    "norm", [{"use_batch_norm": False}, {"use_layer_norm": True}, {"use_batch_norm": False,
                                                                  "use_layer_norm": True}]
)  # fmt: skip
def test_totalvi_trains_without_batch_norm_or_with_layer_norm(norm):
    # the decoder's four stacks run side by side only as batch norm -> ReLU (-> dropout); other
    # post-blocks (no batch norm, layer norm) run stack by stack, in training and in getters
    adata = cellvae.datasets.synthetic(120, 20, n_batches=2, n_proteins=4, random_state=3)
    cellvae.TOTALVI.setup_anndata(
        adata, batch_key="batch", protein_expression_obsm_key="protein_expression"
    )
    model = cellvae.TOTALVI(adata, n_hidden=16, n_latent=4, **norm)
    model.train(max_epochs=2, progress_bar=False)
    assert np.isfinite(model.history["train_loss"]).all()
    stacks = model.module.decoder
    norms = [type(m) for m in stacks.modules()]
    assert (torch.nn.BatchNorm1d in norms) == norm.get("use_batch_norm", True)
    assert (torch.nn.LayerNorm in norms) == norm.get("use_layer_norm", False)
    rna, protein = model.get_normalized_expression(return_numpy=True)
    assert np.isfinite(rna).all() and np.isfinite(protein).all()


@pytest.mark.parametrize("place", ["encoder", "decoder", "both", "none"])
def test_totalvi_takes_scvi_tools_norm_places(place):
    # scvi-tools' TOTALVAE takes use_batch_norm / use_layer_norm as "encoder", "decoder", "both"
    # or "none"; cellvae took only True / False and raised at train()
    adata = cellvae.datasets.synthetic(120, 20, n_batches=2, n_proteins=4, random_state=3)
    cellvae.TOTALVI.setup_anndata(
        adata, batch_key="batch", protein_expression_obsm_key="protein_expression"
    )
    model = cellvae.TOTALVI(adata, n_hidden=16, n_latent=4, use_layer_norm=place)
    model.train(max_epochs=1, progress_bar=False)
    for part, normalised in (("encoder", ("encoder", "both")), ("decoder", ("decoder", "both"))):
        kinds = {type(m) for m in getattr(model.module, part).modules()}
        assert (torch.nn.LayerNorm in kinds) == (place in normalised)
        assert torch.nn.BatchNorm1d in kinds  # the default, "both"
    with pytest.raises(ValueError, match="use_batch_norm must be one of"):
        cellvae.TOTALVI(adata, use_batch_norm="decoders")  # the constructor checks it


def test_new_protein_array_of_another_width_names_the_reference_proteins():
    adata = cellvae.datasets.synthetic(80, 15, n_proteins=6, random_state=1)
    cellvae.TOTALVI.setup_anndata(adata, protein_expression_obsm_key="protein_expression")
    model = cellvae.TOTALVI(adata, n_latent=3).train(max_epochs=1, progress_bar=False)
    new = adata.copy()
    del new.uns["cellvae"]
    new.obsm["protein_expression"] = adata.obsm["protein_expression"].to_numpy()[:, :5]
    names = list(adata.obsm["protein_expression"].columns)
    with pytest.raises(ValueError, match=rf"5 protein columns; the reference has 6 \({names[0]}"):
        model.get_latent_representation(new)  # was: 5 "extra" proteins protein_0, ... named


def test_adversarial_classifier_is_on_by_default_exactly_when_a_panel_lacks_proteins():
    # scvi-tools' rule: with a protein that some batch did not measure, the classifier helps the
    # batches mix; cellvae left it off by default
    missing = cellvae.TOTALVI(_synthetic_missing(), **SMALL)
    assert missing._module_kwargs()["adversarial_classifier"] is True
    full = cellvae.datasets.synthetic(120, 20, n_batches=2, n_proteins=4, random_state=3)
    cellvae.TOTALVI.setup_anndata(
        full, batch_key="batch", protein_expression_obsm_key="protein_expression"
    )
    assert cellvae.TOTALVI(full, **SMALL)._module_kwargs()["adversarial_classifier"] is False
    off = cellvae.TOTALVI(_synthetic_missing(), adversarial_classifier=False, **SMALL)
    assert off._module_kwargs()["adversarial_classifier"] is False  # as given
    with pytest.raises(TypeError, match="adversarial_classifier must be True or False"):
        cellvae.TOTALVI(full, adversarial_classifier="yes")


def test_normalised_proteins_warn_at_setup():
    adata = cellvae.datasets.synthetic(80, 15, n_proteins=4, random_state=1)
    adata.obsm["protein_expression"] = np.log1p(adata.obsm["protein_expression"])
    with pytest.warns(UserWarning, match="non-integer protein values.*raw ADT counts") as record:
        cellvae.TOTALVI.setup_anndata(adata, protein_expression_obsm_key="protein_expression")
    assert record[0].filename == __file__


def test_foreground_plot_refuses_a_model_that_is_no_totalvi():
    adata = cellvae.datasets.synthetic(60, 10, n_proteins=3, random_state=1)
    cellvae.SCVI.setup_anndata(adata)
    scvi = cellvae.SCVI(adata).train(max_epochs=1, progress_bar=False)
    with pytest.raises(TypeError, match="model must be a trained cellvae.TOTALVI, got SCVI"):
        cellvae.pl.foreground_probability(adata, proteins="prot0", model=scvi, show=False)


def test_denoised_plot_names_array_proteins_after_the_setup_was_replaced():
    pytest.importorskip("matplotlib")
    adata = cellvae.datasets.synthetic(60, 10, n_proteins=3, random_state=1)
    frame = adata.obsm.pop("protein_expression")
    adata.obsm["prot"] = frame.to_numpy()
    adata.uns["pnames"] = np.array(frame.columns)
    cellvae.tl.totalvi(
        adata, protein_expression_obsm_key="prot", protein_names_uns_key="pnames",
        max_epochs=1, progress_bar=False, n_latent=3,
    )  # fmt: skip
    cellvae.tl.scvi(adata, max_epochs=1, progress_bar=False, n_latent=3)  # a new setup
    axes = cellvae.pl.protein_denoised(adata, proteins=str(frame.columns[0]), show=False)
    assert axes is not None


def test_tl_totalvi_records_the_adversarial_classifier_as_trained():
    adata = _synthetic_missing(120)  # a batch lacks proteins: on by default
    cellvae.tl.totalvi(
        adata, batch_key="batch", max_epochs=1, progress_bar=False, n_latent=3, n_hidden=16
    )
    assert adata.uns["totalvi"]["params"]["adversarial_classifier"] is True  # was left out


def test_deterministic_getters_leave_the_global_generator(missing):
    _, model = missing
    torch.manual_seed(0)
    expected = torch.randn(3)
    torch.manual_seed(0)
    model.get_normalized_expression()
    model.get_protein_foreground_probability()
    model.get_protein_background_mean()
    assert torch.equal(torch.randn(3), expected)  # unused noise draws advanced it
    model.get_normalized_expression(n_samples=2)  # samples: these draw on the stream
    assert not torch.equal(torch.randn(3), expected)


def test_loading_a_model_saved_by_an_earlier_module_format_says_so(missing, tmp_path):
    # format 1 (before session 36): the background scale head was py_back_log_beta and the
    # heads had no covariate vectors
    import hashlib
    import json

    adata, model = missing
    model.save(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "model.json").read_text())
    assert config["format_version"] == 2
    weights = tmp_path / "m" / config["weights"]
    state = torch.load(weights, weights_only=True)
    state = {
        k.replace("py_back_beta", "py_back_log_beta"): v
        for k, v in state.items()
        if "head_covariates" not in k
    }
    torch.save(state, weights)
    config["format_version"] = 1
    config["sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    (tmp_path / "m" / "model.json").write_text(json.dumps(config))
    with pytest.raises(
        ValueError, match="saved in format 1 .*TOTALVI module differs: train the model again"
    ):
        cellvae.TOTALVI.load(tmp_path / "m", adata)


def test_sampled_protein_mixing_draws_anew_at_each_call(missing):
    _, model = missing
    first = model.get_normalized_expression(sample_protein_mixing=True)[1]
    second = model.get_normalized_expression(sample_protein_mixing=True)[1]
    assert not np.array_equal(first, second)  # a random draw, not the same one every call


def test_nullable_integer_proteins_do_not_rebuild_the_tensors_at_each_call():
    adata = cellvae.datasets.synthetic(200, 30, n_batches=2, n_proteins=5, random_state=0)
    adata.obsm["protein_expression"] = adata.obsm["protein_expression"].round().astype("Int64")
    cellvae.TOTALVI.setup_anndata(
        adata, batch_key="batch", protein_expression_obsm_key="protein_expression"
    )
    model = cellvae.TOTALVI(adata, **SMALL)
    first, _ = model._data()
    second, _ = model._data()
    assert second is first  # the digest of an object-typed frame changed at every call


def test_getters_on_non_numeric_proteins_give_the_setup_message():
    adata = cellvae.datasets.synthetic(100, 20, n_proteins=4, random_state=0)
    cellvae.TOTALVI.setup_anndata(adata, protein_expression_obsm_key="protein_expression")
    model = cellvae.TOTALVI(adata, **SMALL).train(1, progress_bar=False)
    proteins = adata.obsm["protein_expression"].copy()
    proteins["prot0"] = "x"
    adata.obsm["protein_expression"] = proteins
    with pytest.raises(ValueError, match="non-numeric protein columns"):
        model.get_latent_representation()
