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
from collections.abc import Sequence

import torch

from .. import _kernels
from .._sparse import CSRBatch, row_sums
from ..nn import FCLayers, bn_fusable, dropout_masks
from ._base import LossOutput, covariate_codes

_EPS = 1e-8  # the NB / ZINB distributions' floor of theta (their eps)


def _codes(c: torch.Tensor) -> torch.Tensor:
    c = c.reshape(-1)
    return c if c.dtype == torch.int64 and c.is_contiguous() else c.long().contiguous()


def _stack_fuses(stack: FCLayers) -> bool:
    """Whether every layer of ``stack`` is linear (with a bias) → batch norm → ReLU (→ dropout)."""
    if not stack._fusable:
        return False
    return all(
        bn_fusable(post[0]) and lin.bias is not None for lin, post in zip(stack.linears, stack.post)
    )


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
            all(  # a subclass that changes the model: its own code runs
                getattr(cls, name) is getattr(_VAE, name)
                for name in ("forward", "inference", "generative", "loss")
            )
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
            and _stack_fuses(enc.encoder)
            and _stack_fuses(dec.px_decoder)
        )
        _plans[module] = tuple(module.modules()) if covered else None
    return _plans[module]


_plans: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def supports(module, tensors: dict) -> bool:
    """Whether :func:`fused_training_step` covers this module and minibatch."""
    x = tensors.get("x")
    modules = _plan(module)
    if modules is None:
        return False
    params = [p for m in modules for p in m._parameters.values() if p is not None]
    return (
        all(m.training for m in modules)  # batch norm and dropout as in training
        and isinstance(x, CSRBatch)
        and x.shape[0] > 1
        and "cont_covs" not in tensors
        and all(p.requires_grad and p.is_contiguous() for p in params)
        and _kernels.takes(x.val, *params)
        and not _hooked(module, params, modules)
    )


def _hooked(module, params, modules) -> bool:
    """Whether code of the user's sits in forward or backward: a replaced ``forward``, hooks.

    Gradient hooks on parameters (which mask or scale gradients), module hooks and torch's
    global module hooks run only in the module's own forward pass and autograd.
    """
    if "forward" in module.__dict__ or any(_global_hooks()):
        return True
    return any(p._backward_hooks or p._post_accumulate_grad_hooks for p in params) or any(
        m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
        for m in modules
    )


def _global_hooks() -> tuple:
    hooks = torch.nn.modules.module
    return (
        hooks._global_forward_hooks,
        hooks._global_forward_pre_hooks,
        hooks._global_backward_hooks,
        hooks._global_backward_pre_hooks,
    )


class _Layer:
    """What one hidden layer's backward pass needs from its forward pass."""

    __slots__ = ("x", "y", "out", "mean", "invstd", "scale", "covariates", "linear", "bn")


def _stack_forward(stack: FCLayers, x, cats: Sequence[torch.Tensor], saved: list) -> torch.Tensor:
    """The stack's output; each layer's :class:`_Layer` appended to ``saved``.

    ``x`` is the input of the first layer: a dense matrix, or the CSR minibatch whose values
    are already transformed (log1p).
    """
    kept = [_codes(cats[i]) for i in stack.cat_keep if i < len(cats)]
    for linear, post in zip(stack.linears, stack.post):
        if isinstance(x, CSRBatch):
            y = _kernels.csr_dense(x.offsets, x.col, x.val, linear.weight, linear.bias)
        else:
            y = torch.addmm(linear.bias, x, linear.weight)
        bn = post[0]
        seed, threshold, scale = dropout_masks(post[2] if len(post) > 2 else None)
        covariates = [(e.weight, c) for e, c in zip(linear.embeddings, kept)]
        out, mean, invstd = _kernels.bn_relu_drop_forward(
            y, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.momentum, bn.eps,
            None, threshold, scale, covariates, seed=seed,
        )  # fmt: skip
        layer = _Layer()
        layer.x, layer.y, layer.out, layer.mean, layer.invstd = x, y, out, mean, invstd
        layer.scale, layer.covariates, layer.linear, layer.bn = scale, covariates, linear, bn
        saved.append(layer)
        x = out
    return x


def _stack_backward(saved: list, d_out: torch.Tensor, grads: dict, need_input: bool):
    """Gradients of the layers in ``saved`` (into ``grads``, by parameter) from ``d_out``.

    Returns the gradient by the stack's input (a dense one) when ``need_input``, else None.
    """
    d = d_out
    for i in range(len(saved) - 1, -1, -1):
        layer = saved[i]
        lin, bn = layer.linear, layer.bn
        dy, dgamma, dbeta, *dtables = _kernels.bn_relu_drop_backward(
            layer.y, layer.out, bn.weight, layer.mean, layer.invstd, layer.scale, d,
            layer.covariates,
        )  # fmt: skip
        grads[bn.weight], grads[bn.bias] = dgamma, dbeta
        for emb, dt in zip(lin.embeddings, dtables):
            grads[emb.weight] = dt
        x = layer.x
        if isinstance(x, CSRBatch):
            grads[lin.weight] = _kernels.csr_t_dense(x.row, x.col, x.val, dy, x.shape[1])
        else:
            grads[lin.weight] = torch.mm(x.t(), dy)
        grads[lin.bias] = dy.sum(0)
        d = torch.mm(dy, lin.weight.t()) if i > 0 or need_input else None
    return d


def _head_grads(d: torch.Tensor, h: torch.Tensor, layer, grads: dict) -> None:
    """An ``nn.Linear`` head's weight and bias gradients from its output's gradient ``d``."""
    grads[layer.weight] = torch.mm(d.t(), h)
    grads[layer.bias] = d.sum(0)


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
    enc_saved: list[_Layer] = []
    q = _stack_forward(enc.encoder, x_in, cats if module.encode_covariates else [], enc_saved)
    n_lat = enc.mean_encoder.out_features
    noise = torch.randn(n_cells, n_lat, dtype=q.dtype)  # as normal_heads draws it
    w_heads = torch.cat([enc.mean_encoder.weight, enc.var_encoder.weight])
    b_heads = torch.cat([enc.mean_encoder.bias, enc.var_encoder.bias])
    mu = torch.addmm(b_heads, q, w_heads.t())
    _, _, z, kl = _kernels.normal_sample_forward(mu, noise, enc.var_eps)
    library = torch.exp(torch.log(row_sums(x))).view(-1)  # as inference and generative make it

    # ---- generative: the decoder's logits and dispersions, and the likelihood with gradients
    dec_saved: list[_Layer] = []
    h = _stack_forward(dec.px_decoder, z, cats, dec_saved)
    logits = torch.addmm(dec.px_scale_decoder.bias, h, dec.px_scale_decoder.weight.t())
    drop_head = dec.px_dropout_decoder if module.gene_likelihood == "zinb" else None
    pi = None
    if drop_head is not None:
        pi = torch.addmm(drop_head.bias, h, drop_head.weight.t())
    theta = torch.exp(module.px_r)  # per gene, or per category and gene
    codes = None
    if module.dispersion != "gene":  # each cell's row of its category
        key = "batch" if module.dispersion == "gene-batch" else "labels"
        codes = _codes(tensors[key])
    theta_used = (theta if codes is None else theta.index_select(0, codes)).clamp_min(_EPS)
    row_grad = -1.0 / n_cells  # the loss is the mean over cells of minus the row sums
    log_px, d_logits, d_pi, d_theta, _ = _kernels.softmax_nb_zinb_log_prob_sum(
        logits, library, theta_used, pi, x.val, x.row, x.col, _EPS, True, row_grad=row_grad
    )
    reconstruction = log_px.neg_()
    loss = torch.mean(reconstruction + kl_weight * kl)

    counts = [layer.bn.num_batches_tracked for layer in enc_saved + dec_saved]
    torch._foreach_add_(counts, 1)  # as each batch norm's forward pass counts

    # ---- backward
    grads: dict[torch.Tensor, torch.Tensor] = {}
    if codes is not None:  # each category's rows summed
        d_theta = torch.zeros_like(theta).index_add_(0, codes, d_theta)
    # exp's derivative, and none below the floor
    grads[module.px_r] = d_theta.mul_(theta).masked_fill_(theta < _EPS, 0.0)
    _head_grads(d_logits, h, dec.px_scale_decoder, grads)
    d_h = torch.mm(d_logits, dec.px_scale_decoder.weight)
    if drop_head is not None:
        _head_grads(d_pi, h, drop_head, grads)
        d_h.addmm_(d_pi, drop_head.weight)
    d_z = _stack_backward(dec_saved, d_h, grads, need_input=True)
    d_kl = torch.full_like(kl, 1.0 / n_cells).mul_(kl_weight)
    d_mu = _kernels.normal_sample_backward(mu, noise, enc.var_eps, [None, None, d_z, d_kl])
    d_w = torch.mm(d_mu.t(), q)
    d_b = d_mu.sum(0)
    grads[enc.mean_encoder.weight], grads[enc.var_encoder.weight] = d_w[:n_lat], d_w[n_lat:]
    grads[enc.mean_encoder.bias], grads[enc.var_encoder.bias] = d_b[:n_lat], d_b[n_lat:]
    _stack_backward(enc_saved, torch.mm(d_mu, w_heads), grads, need_input=False)

    for p, g in grads.items():  # the live parameters (load_state_dict(assign=True) swaps them)
        if p.grad is None:
            p.grad = g
        else:
            p.grad += g
    return LossOutput(loss=loss, reconstruction=reconstruction, kl_local=kl)
