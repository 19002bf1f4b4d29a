"""SCVI's hand-written training step (cellvae.module._vae_step) against forward + autograd."""

import pytest
import torch
from stepcheck import assert_declines, assert_same_training, both, count_steps, replace_forward

import cellvae
from cellvae import _kernels
from cellvae._sparse import CSRBatch
from cellvae.module import VAE
from cellvae.module._vae_step import fused_training_step

pytestmark = pytest.mark.skipif(not _kernels.available(), reason="needs the compiled kernels")

N_GENES = 30


def _minibatch(n_cells=48, n_cat_covs=0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rate = torch.rand(n_cells, N_GENES, generator=gen) * 4
    x = torch.poisson(rate, generator=gen) * (torch.rand(n_cells, N_GENES, generator=gen) < 0.4)
    x[:, 0] += 1  # no empty cell (the observed library is log of the counts' sum)
    tensors = {
        "x": CSRBatch.from_dense(x),
        "batch": torch.randint(3, (n_cells,), generator=gen),
        "labels": torch.randint(2, (n_cells,), generator=gen),
    }
    if n_cat_covs:
        tensors["cat_covs"] = torch.randint(4, (n_cells, n_cat_covs), generator=gen)
    return tensors


def _module(n_cat_covs=0, **options):
    torch.manual_seed(0)
    cats = [4] * n_cat_covs or None
    module = VAE(N_GENES, n_batch=3, n_labels=2, n_hidden=16, n_latent=5, n_cats_per_cov=cats,
                 **options)  # fmt: skip
    with torch.no_grad():  # away from the initial values, so that every term matters
        for p in module.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return module.train()


def _both(module, tensors, kl_weight=0.3, seed=1):
    return both(fused_training_step, module, tensors, kl_weight, seed)


COVERED = [
    dict(),
    dict(gene_likelihood="nb"),
    dict(dispersion="gene-batch"),
    dict(dispersion="gene-batch", gene_likelihood="nb"),
    dict(dispersion="gene-label"),
    dict(n_layers=2),
    dict(n_layers=2, encode_covariates=True, n_cat_covs=2),
    dict(n_layers=3, deeply_inject_covariates=False, n_cat_covs=1),
    dict(dropout_rate=0.0, log_variational=False),
]


def _name(options):
    return ",".join(f"{k}={v}" for k, v in options.items()) or "default"


@pytest.mark.parametrize("options", COVERED, ids=_name)
def test_step_gives_forward_and_backward_loss_gradients_and_statistics(options):
    options = dict(options)
    n_cat_covs = options.pop("n_cat_covs", 0)
    module = _module(n_cat_covs, **options)
    tensors = _minibatch(n_cat_covs=n_cat_covs)
    (ref, out_ref), (fused, out) = _both(module, tensors)
    for name in ("loss", "reconstruction", "kl_local"):
        torch.testing.assert_close(getattr(out, name), getattr(out_ref, name).detach())
        assert not getattr(out, name).requires_grad
    names = [n for n, _ in ref.named_parameters()]
    for name, p_ref, p in zip(names, ref.parameters(), fused.parameters(), strict=True):
        assert p.grad is not None, name
        scale = float(p_ref.grad.abs().max()) + 1e-3
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-5, atol=1e-6 * scale, msg=name)
    for b_ref, b in zip(ref.buffers(), fused.buffers(), strict=True):  # running statistics
        torch.testing.assert_close(b, b_ref, rtol=0, atol=0)


def test_step_adds_to_existing_gradients():
    module = _module()
    tensors = _minibatch()
    (ref, _), (fused, _) = _both(module, tensors)
    before = {n: p.grad.clone() for n, p in fused.named_parameters()}
    torch.manual_seed(1)
    fused_training_step(fused, tensors, 0.3)
    for n, p in fused.named_parameters():
        torch.testing.assert_close(p.grad, 2 * before[n], msg=n)


def test_dispersion_below_the_floor_gets_no_gradient():
    module = _module(dispersion="gene-batch")
    with torch.no_grad():
        module.px_r[1, :4] = -30.0  # exp(-30) < 1e-8: the likelihood floors theta there
    (ref, _), (fused, _) = _both(module, _minibatch())
    assert (fused.px_r.grad[1, :4] == 0).all() and (fused.px_r.grad[1, 4:] != 0).any()
    torch.testing.assert_close(fused.px_r.grad, ref.px_r.grad)


def _frozen(module):
    module.decoder.px_scale_decoder.bias.requires_grad_(False)


def _one_bn_in_eval(module):
    module.decoder.px_decoder.post[0][0].eval()


def _gradient_hook(module):
    module.decoder.px_scale_decoder.weight.register_hook(lambda grad: grad * 0)


def _forward_hook(module):
    module.z_encoder.register_forward_hook(lambda *args: None)


class _OwnLoss(VAE):
    def loss(self, tensors, inf, gen, kl_weight=1.0):
        return super().loss(tensors, inf, gen, 2 * kl_weight)


NOT_COVERED = {
    "poisson": (dict(gene_likelihood="poisson"), None),
    "normal": (dict(gene_likelihood="normal"), None),
    "gene-cell": (dict(dispersion="gene-cell"), None),
    "ln latent": (dict(latent_distribution="ln"), None),
    "latent library": (
        dict(use_observed_lib_size=False, library_log_means=[1.0] * 3, library_log_vars=[1.0] * 3),
        None,
    ),
    "layer norm": (dict(use_layer_norm="both"), None),
    "no decoder batch norm": (dict(use_batch_norm="encoder"), None),
    "frozen parameter": (dict(), _frozen),
    "a batch norm in eval": (dict(), _one_bn_in_eval),
    "eval mode": (dict(), lambda m: m.eval()),
    "float64": (dict(), lambda m: m.double()),
    "gradient hook": (dict(), _gradient_hook),
    "forward hook": (dict(), _forward_hook),
    "forward replaced": (dict(), replace_forward),
    "subclass with its own loss": (dict(), None),
}


@pytest.mark.parametrize("case", NOT_COVERED, ids=str)
def test_step_declines_other_models_and_changes_nothing(case):
    options, change = NOT_COVERED[case]
    module = _module(**options)
    if case == "subclass with its own loss":
        module = _OwnLoss(N_GENES, n_batch=3, n_labels=2, n_hidden=16, n_latent=5).train()
    if change is not None:
        change(module)
    tensors = _minibatch()
    if case == "float64":
        tensors["x"] = tensors["x"].with_values(tensors["x"].val.double())
    assert_declines(fused_training_step, module, tensors)


def test_step_declines_dense_counts_continuous_covariates_and_single_cells():
    module = _module()
    tensors = _minibatch()
    dense = dict(tensors, x=tensors["x"].dense())
    covs = dict(tensors, cont_covs=torch.randn(48, 2))
    one = _minibatch(n_cells=1)
    for t in (dense, covs, one):
        assert fused_training_step(module, t, 1.0) is None
    assert fused_training_step(module, tensors, 1.0) is not None


def test_training_takes_the_hand_written_step_and_reaches_the_same_model(monkeypatch):
    adata = cellvae.datasets.synthetic(400, N_GENES, n_batches=3)
    cellvae.SCVI.setup_anndata(adata, batch_key="batch")
    calls = count_steps(monkeypatch, VAE)
    options = dict(max_epochs=3, batch_size=64, progress_bar=False, seed=0, precision="32-true")
    fused = cellvae.SCVI(adata).train(**options)
    assert calls == {"step": 3 * 6, "forward": 0}  # 360 training cells: 6 steps an epoch
    monkeypatch.setattr(VAE, "training_step", lambda self, tensors, kl_weight=1.0: None)
    autograd = cellvae.SCVI(adata).train(**options)
    assert calls["forward"] == 3 * 6
    assert_same_training(fused, autograd)


def test_step_follows_parameters_replaced_by_load_state_dict_assign():
    """``load_state_dict(assign=True)`` swaps the parameter objects: the step reads the new ones."""
    module, tensors = _module(), _minibatch()
    assert fused_training_step(module, tensors, 1.0) is not None  # the module's plan is made
    module.zero_grad()
    state = {k: v.clone() for k, v in module.state_dict().items()}
    module.load_state_dict({k: v.double() for k, v in state.items()}, assign=True)
    assert fused_training_step(module, tensors, 1.0) is None  # float64 now
    module.load_state_dict(state, assign=True)
    assert all(p.grad is None for p in module.parameters())
    (ref, _), (fused, _) = _both(module, tensors)
    for (name, p_ref), p in zip(ref.named_parameters(), fused.parameters(), strict=True):
        torch.testing.assert_close(p.grad, p_ref.grad, msg=name)
    module.zero_grad()
    torch.manual_seed(1)
    fused_training_step(module, tensors, 0.3)  # the plan made before the swaps
    for (name, p_ref), p in zip(ref.named_parameters(), module.parameters(), strict=True):
        torch.testing.assert_close(p.grad, p_ref.grad, msg=name)
