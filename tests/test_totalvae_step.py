"""totalVI's hand-written training step (cellvae.module._totalvae_step) against autograd."""

import numpy as np
import pytest
import torch
from stepcheck import assert_declines, assert_same_training, both, count_steps, replace_forward

import cellvae
from cellvae import _kernels
from cellvae._sparse import CSRBatch
from cellvae.module import TOTALVAE
from cellvae.module._totalvae_step import fused_training_step

pytestmark = pytest.mark.skipif(not _kernels.available(), reason="needs the compiled kernels")

N_GENES, N_PROTEINS, N_BATCH = 30, 6, 3


def _minibatch(n_cells=48, n_cat_covs=0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rate = torch.rand(n_cells, N_GENES, generator=gen) * 4
    x = torch.poisson(rate, generator=gen) * (torch.rand(n_cells, N_GENES, generator=gen) < 0.4)
    x[:, 0] += 1  # no empty cell
    y = torch.poisson(torch.rand(n_cells, N_PROTEINS, generator=gen) * 60, generator=gen)
    tensors = {
        "x": CSRBatch.from_dense(x),
        "protein": y,
        "batch": torch.randint(N_BATCH, (n_cells,), generator=gen),
        "labels": torch.randint(2, (n_cells,), generator=gen),
    }
    if n_cat_covs:
        tensors["cat_covs"] = torch.randint(4, (n_cells, n_cat_covs), generator=gen)
    return tensors


def _module(n_cat_covs=0, **options):
    torch.manual_seed(0)
    options = {"use_observed_lib_size": True, "dropout_rate_decoder": 0.2, **options}
    module = TOTALVAE(
        N_GENES, N_PROTEINS, n_batch=N_BATCH, n_labels=2, n_hidden=16, n_latent=5,
        n_cats_per_cov=[4] * n_cat_covs or None,
        protein_background_prior_mean=torch.rand(N_PROTEINS, N_BATCH) + 2,
        protein_background_prior_scale=torch.rand(N_PROTEINS, N_BATCH) + 0.5,
        **options,
    )  # fmt: skip
    with torch.no_grad():  # away from the initial values, so that every term matters
        for p in module.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return module.train()


def _both(module, tensors, kl_weight=0.3, seed=1):
    return both(fused_training_step, module, tensors, kl_weight, seed)


COVERED = [
    dict(),
    dict(gene_likelihood="zinb"),
    dict(dropout_rate_decoder=0.0, dropout_rate_encoder=0.0),
    dict(gene_dispersion="gene-batch", protein_dispersion="protein-batch"),
    dict(gene_dispersion="gene-label", protein_dispersion="protein-label", gene_likelihood="zinb"),
    dict(n_layers_decoder=2),
    dict(n_layers_encoder=1, n_cat_covs=2),
    dict(n_layers_encoder=3, n_layers_decoder=2, n_cat_covs=1, gene_likelihood="zinb"),
    dict(protein_batch_mask=[[True] * N_PROTEINS, [True, False] * 3, [False, True] * 3]),
]


def _name(options):
    return ",".join(f"{k}={v}" for k, v in options.items())[:60] or "default"


def _assert_same_step(ref, out_ref, fused, out):
    for name in ("loss", "reconstruction", "kl_local"):
        torch.testing.assert_close(getattr(out, name), getattr(out_ref, name).detach())
        assert not getattr(out, name).requires_grad
    for name in ("reconstruction_protein", "kl_background"):
        torch.testing.assert_close(out.extra[name], out_ref.extra[name].detach())
    names = [n for n, _ in ref.named_parameters()]
    for name, p_ref, p in zip(names, ref.parameters(), fused.parameters(), strict=True):
        assert p.grad is not None, name
        assert p.grad.is_contiguous(), name
        # (a linear bias before batch norm has a gradient of 0 up to rounding: ~1e-7)
        atol = 1e-5 * float(p_ref.grad.abs().max()) + 1e-6
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-4, atol=atol, msg=name)
    for (name, b_ref), b in zip(ref.named_buffers(), fused.buffers(), strict=True):
        torch.testing.assert_close(b, b_ref, rtol=0, atol=0, msg=name)  # running statistics


@pytest.mark.parametrize("options", COVERED, ids=_name)
def test_step_gives_forward_and_backward_loss_gradients_and_statistics(options):
    options = dict(options)
    n_cat_covs = options.pop("n_cat_covs", 0)
    module = _module(n_cat_covs, **options)
    tensors = _minibatch(n_cat_covs=n_cat_covs)
    (ref, out_ref), (fused, out) = _both(module, tensors)
    _assert_same_step(ref, out_ref, fused, out)


def test_step_matches_where_the_background_rate_is_clamped_and_the_foreground_floored():
    """The clamped log background (> 60) and ReLU's zeros pass no gradient, as in autograd."""
    module = _module()
    with torch.no_grad():
        module.decoder.py_back_alpha.bias[:2] = 80.0  # e^80: clamped at e^60
        module.decoder.py_fore_scale.bias[2:4] = -50.0  # ReLU at 0: the foreground scale is 1
    (ref, out_ref), (fused, out) = _both(module, _minibatch())
    _assert_same_step(ref, out_ref, fused, out)
    assert (fused.decoder.py_fore_scale.bias.grad[2:4] == 0).all()
    assert (fused.decoder.py_fore_scale.bias.grad[4:] != 0).any()


def test_step_adds_to_existing_gradients():
    module = _module()
    tensors = _minibatch()
    (_, _), (fused, _) = _both(module, tensors)
    before = {n: p.grad.clone() for n, p in fused.named_parameters()}
    torch.manual_seed(1)
    fused_training_step(fused, tensors, 0.3)
    for n, p in fused.named_parameters():
        torch.testing.assert_close(p.grad, 2 * before[n], msg=n)


def test_dispersions_below_the_floor_get_no_gradient():
    module = _module(gene_dispersion="gene-batch", protein_dispersion="protein-batch")
    with torch.no_grad():
        module.px_r[1, :4] = -30.0  # exp(-30) < 1e-8: the likelihoods floor theta there
        module.py_r[1, :2] = -30.0
    (ref, _), (fused, _) = _both(module, _minibatch())
    for name in ("px_r", "py_r"):
        grad, grad_ref = getattr(fused, name).grad, getattr(ref, name).grad
        torch.testing.assert_close(grad, grad_ref)
    assert (fused.px_r.grad[1, :4] == 0).all() and (fused.px_r.grad[1, 4:] != 0).any()
    assert (fused.py_r.grad[1, :2] == 0).all() and (fused.py_r.grad[1, 2:] != 0).any()


def _frozen(module):
    module.decoder.py_mixing.bias.requires_grad_(False)


def _one_bn_in_eval(module):
    module.decoder.py_fore_decoder.post[0][0].eval()


def _gradient_hook(module):
    module.decoder.py_back_alpha.weight.register_hook(lambda grad: grad * 0)


def _forward_hook(module):
    module.decoder.register_forward_hook(lambda *args: None)


class _OwnProteinTerms(TOTALVAE):
    def protein_terms(self, gen, y, b):
        rec, kl = super().protein_terms(gen, y, b)
        return 2 * rec, kl


LIBRARY = dict(
    use_observed_lib_size=False, library_log_means=[1.0] * N_BATCH, library_log_vars=[1.0] * N_BATCH
)
NOT_COVERED = {
    "latent library": (LIBRARY, None),
    "ln latent": (dict(latent_distribution="ln"), None),
    "adversarial classifier": (dict(adversarial_classifier=True), None),
    "layer norm": (dict(use_layer_norm="both"), None),
    "no decoder batch norm": (dict(use_batch_norm="encoder"), None),
    "frozen parameter": (dict(), _frozen),
    "a batch norm in eval": (dict(), _one_bn_in_eval),
    "eval mode": (dict(), lambda m: m.eval()),
    "float64": (dict(), lambda m: m.double()),
    "gradient hook": (dict(), _gradient_hook),
    "forward hook": (dict(), _forward_hook),
    "forward replaced": (dict(), replace_forward),
    "subclass with its own protein terms": (dict(), None),
}


@pytest.mark.parametrize("case", NOT_COVERED, ids=str)
def test_step_declines_other_models_and_changes_nothing(case):
    options, change = NOT_COVERED[case]
    module = _module(**options)
    if case.startswith("subclass"):
        module = _OwnProteinTerms(N_GENES, N_PROTEINS, n_batch=N_BATCH, n_hidden=16, n_latent=5,
                                  use_observed_lib_size=True).train()  # fmt: skip
    if change is not None:
        change(module)
    tensors = _minibatch()
    if case == "float64":
        tensors["x"] = tensors["x"].with_values(tensors["x"].val.double())
        tensors["protein"] = tensors["protein"].double()
    assert_declines(fused_training_step, module, tensors)


def test_step_declines_dense_counts_continuous_covariates_and_single_cells():
    module = _module()
    tensors = _minibatch()
    dense = dict(tensors, x=tensors["x"].dense())
    covs = dict(tensors, cont_covs=torch.randn(48, 2))
    one = _minibatch(n_cells=1)
    proteins_missing = {k: v for k, v in tensors.items() if k != "protein"}
    for t in (dense, covs, one, proteins_missing):
        assert fused_training_step(module, t, 1.0) is None
    assert fused_training_step(module, tensors, 1.0) is not None


def test_step_follows_parameters_replaced_by_load_state_dict_assign():
    module, tensors = _module(), _minibatch()
    assert fused_training_step(module, tensors, 1.0) is not None  # the module's plan is made
    module.zero_grad()
    state = {k: v.clone() for k, v in module.state_dict().items()}
    module.load_state_dict(state, assign=True)
    (ref, out_ref), (fused, out) = _both(module, tensors)
    module.zero_grad()
    torch.manual_seed(1)
    fused_training_step(module, tensors, 0.3)  # the plan made before the swap
    for (name, p_ref), p in zip(ref.named_parameters(), module.parameters(), strict=True):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-4, atol=1e-6, msg=name)


def _cite(n_obs=300, seed=0):
    rng = np.random.default_rng(seed)
    adata = cellvae.datasets.synthetic(n_obs, N_GENES, n_batches=2)
    adata.obsm["protein"] = rng.poisson(30, size=(n_obs, N_PROTEINS)).astype(np.float32)
    return adata


def test_training_takes_the_hand_written_step_and_reaches_the_same_model(monkeypatch):
    adata = _cite()
    cellvae.TOTALVI.setup_anndata(adata, protein_expression_obsm_key="protein", batch_key="batch")
    calls = count_steps(monkeypatch, TOTALVAE)
    options = dict(max_epochs=3, batch_size=64, progress_bar=False, seed=0, precision="32-true")
    hparams = dict(use_observed_lib_size=True, n_hidden=16, n_latent=5)
    fused = cellvae.TOTALVI(adata, **hparams).train(**options)
    assert calls == {"step": 3 * 5, "forward": 0}  # 270 training cells: 5 steps an epoch
    monkeypatch.setattr(TOTALVAE, "training_step", lambda self, tensors, kl_weight=1.0: None)
    autograd = cellvae.TOTALVI(adata, **hparams).train(**options)
    assert calls["forward"] == 3 * 5
    assert_same_training(fused, autograd)
