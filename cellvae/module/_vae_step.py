"""SCVI's training step with its backward pass written out: one call per layer, no autograd.

:meth:`VAE.forward <cellvae.module.VAE.forward>` followed by ``loss.backward()`` runs about 150
torch operators and 40 autograd nodes a step, each costing 3–10 µs of dispatch on a CPU, while
the second core waits: with the compiled kernels doing the elementwise work, a step of the
default model at 128 cells × 2,000 genes took ~10% less time without them, and a tiny
network's step (its fixed cost) 5.1 → 1.8 ms (benchmarks/README.md, session 39). Here the same
forward pass, loss
and gradients are ~30 calls: per hidden layer a product and one compiled batch norm → ReLU →
dropout (:func:`cellvae._kernels.bn_relu_drop_forward`) forward and back, the latent heads,
sample and KL in one call each way (:func:`cellvae._kernels.normal_sample_forward`), the decoder's
softmax and the NB / ZINB likelihood with its gradients in one call
(:func:`cellvae._kernels.softmax_nb_zinb_log_prob_sum`), and the weight products of the
backward pass.

It draws the same random numbers in the same order as the module (each encoder layer's dropout
seed, then the latent noise), updates the batch norms' running statistics the same way, and
computes the same values with the same kernels; only sums of two products (a hidden layer's
gradient from the two gene heads) may round differently. :func:`fused_training_step` returns
None where it does not cover the model or the minibatch, and the caller then runs the module
and autograd: continuous covariates, a latent or size-factor library, the Poisson or normal
likelihood, a per-cell dispersion, the logistic-normal latent, layer norm or no batch norm,
frozen parameters, hooks or a replaced ``forward``, anything not float32 on the CPU or a dense
minibatch. The tests hold it to ``forward`` and ``backward`` over those options.
"""

from __future__ import annotations

import weakref

import torch

from .. import _kernels
from .._sparse import row_sums
from ._backprop import (
    EPS,
    Dispersion,
    Layer,
    NormalHeads,
    hand_out,
    head_grads,
    same_model,
    stack_backward,
    stack_forward,
    stack_fuses,
    trainable,
)
from ._base import LossOutput, covariate_codes


def _plan(module) -> tuple[torch.nn.Module, ...] | None:
    """The module's submodules, or None where its options or layers are not covered.

    What does not change between steps, worked out once per module: walking the module tree
    takes ~50 µs, more than 100 µs on a slow VM. (Its parameters are read from the submodules
    at each step: ``load_state_dict(assign=True)`` replaces them.)
    """
    if module not in _plans:
        from .vae import VAE as _VAE  # (vae.py imports this module)

        enc, dec = module.z_encoder, module.decoder
        cls = type(module)
        covered = (
            same_model(cls, _VAE, ("forward", "inference", "generative", "loss"))
            and module.gene_likelihood in ("nb", "zinb")
            and module.dispersion in ("gene", "gene-batch", "gene-label")
            and module.latent_distribution == "normal"
            and module.use_observed_lib_size
            and not module.use_size_factor_key
            and module.n_continuous_cov == 0
            and enc.var_activation is torch.exp
            and enc.mean_encoder.bias is not None
            and enc.var_encoder.bias is not None
            and dec.scale_activation == "softmax"
            and stack_fuses(enc.encoder)
            and stack_fuses(dec.px_decoder)
        )
        _plans[module] = tuple(module.modules()) if covered else None
    return _plans[module]


_plans: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def supports(module, tensors: dict) -> bool:
    """Whether :func:`fused_training_step` covers this module and minibatch."""
    modules = _plan(module)
    return (
        modules is not None and "cont_covs" not in tensors and trainable(modules, tensors.get("x"))
    )


@torch.no_grad()
def fused_training_step(module, tensors: dict, kl_weight: float = 1.0) -> LossOutput | None:
    """``module(tensors, kl_weight)`` and its ``loss.backward()``, or None where not covered.

    ``module`` is a :class:`~cellvae.module.VAE` in training mode. The gradients are added to
    each parameter's ``.grad`` (set where it is None), as ``backward`` does; the returned
    :class:`LossOutput` holds values without autograd history.
    """
    if not supports(module, tensors):
        return None
    x = tensors["x"]
    n_cells = x.shape[0]
    enc, dec = module.z_encoder, module.decoder
    cats = covariate_codes(tensors)

    # ---- inference: q(z | x), its sample and KL; the observed library
    x_in = x.with_values(torch.log1p(x.val)) if module.log_variational else x
    enc_saved: list[Layer] = []
    q = stack_forward(enc.encoder, x_in, cats if module.encode_covariates else [], enc_saved)
    latent = NormalHeads(enc.mean_encoder, enc.var_encoder, q, enc.var_eps)
    z, kl = latent.sample()
    library = torch.exp(torch.log(row_sums(x))).view(-1)  # as inference and generative make it

    # ---- generative: the decoder's logits and dispersions, and the likelihood with gradients
    dec_saved: list[Layer] = []
    h = stack_forward(dec.px_decoder, z, cats, dec_saved)
    logits = torch.addmm(dec.px_scale_decoder.bias, h, dec.px_scale_decoder.weight.t())
    drop_head = dec.px_dropout_decoder if module.gene_likelihood == "zinb" else None
    pi = None
    if drop_head is not None:
        pi = torch.addmm(drop_head.bias, h, drop_head.weight.t())
    theta = Dispersion(module.px_r, module.dispersion, tensors)
    row_grad = -1.0 / n_cells  # the loss is the mean over cells of minus the row sums
    log_px, d_logits, d_pi, d_theta, _ = _kernels.softmax_nb_zinb_log_prob_sum(
        logits, library, theta.rows, pi, x.val, x.row, x.col, EPS, True, row_grad=row_grad
    )
    reconstruction = log_px.neg_()
    loss = torch.mean(reconstruction + kl_weight * kl)

    counts = [layer.bn.num_batches_tracked for layer in enc_saved + dec_saved]
    torch._foreach_add_(counts, 1)  # as each batch norm's forward pass counts

    # ---- backward
    grads: dict[torch.Tensor, torch.Tensor] = {}
    theta.backward(d_theta, grads)
    head_grads(d_logits, h, dec.px_scale_decoder, grads)
    d_h = torch.mm(d_logits, dec.px_scale_decoder.weight)
    if drop_head is not None:
        head_grads(d_pi, h, drop_head, grads)
        d_h.addmm_(d_pi, drop_head.weight)
    d_z = stack_backward(dec_saved, d_h, grads, need_input=True)
    d_kl = torch.full_like(kl, 1.0 / n_cells).mul_(kl_weight)
    stack_backward(enc_saved, latent.backward(d_z, d_kl, grads), grads, need_input=False)

    hand_out(grads)  # to the live parameters (load_state_dict(assign=True) swaps them)
    return LossOutput(loss=loss, reconstruction=reconstruction, kl_local=kl)
