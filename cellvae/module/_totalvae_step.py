"""totalVI's training step with its backward pass written out: no autograd.

:meth:`TOTALVAE.forward <cellvae.module.TOTALVAE.forward>` followed by ``loss.backward()`` runs
about 1,100 torch operators and autograd nodes a step (torch's profiler, 256 cells): the
encoder, four decoder stacks and six output heads, each head with its covariate vectors, the
protein background's sample and activations, and their gradients. A step of a tiny network,
whose arithmetic is negligible, took 13 ms of the default network's 38 (the fixed cost of
dispatch and autograd; benchmarks/README.md, session 40). Here the same forward pass, loss
and gradients are written as calls of the compiled kernels (the sparse first layer, each hidden
layer's batch norm → ReLU → dropout, the latent heads and sample, the genes' softmax and NB /
ZINB likelihood, the protein terms; see :mod:`._vae_step` for SCVI's) and the products and few
elementwise operators between them, forward and back.

It draws the same random numbers in the same order as the module (each encoder layer's dropout
seed, the latent noise, the decoder's dropout seed, the background's noise), updates the batch
norms' running statistics the same way and computes the same values with the same kernels;
only sums of gradients from several places (``z``'s, a hidden layer's) may round differently.
:func:`fused_training_step` returns None where it does not cover the model or the minibatch,
and the caller then runs the module and autograd: the latent library or size factors,
continuous covariates, the logistic-normal latent, the adversarial classifier, layer norm or no
batch norm, frozen parameters, hooks or a replaced ``forward``, anything not float32 on the CPU
or a dense minibatch. The tests hold it to ``forward`` and ``backward`` over those options.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from .. import _kernels
from .._sparse import HStack, row_sums
from ..nn import join_layers
from ._backprop import (
    EPS,
    Dispersion,
    Layer,
    NormalHeads,
    codes_of,
    hand_out,
    head_grads,
    same_model,
    split_back,
    stack_backward,
    stack_forward,
    stack_fuses,
    trainable,
)
from ._base import LossOutput, covariate_codes

_LOG_BACK_MAX = 60.0  # the decoder's clamp of the log background rate


def _plan(module) -> tuple[torch.nn.Module, ...] | None:
    """The module's submodules, or None where its options or layers are not covered.

    Worked out once per module (walking the module tree takes ~50 µs); the parameters are read
    from the submodules at each step (``load_state_dict(assign=True)`` replaces them).
    """
    if module not in _plans:
        from .totalvae import TOTALVAE as _TOTALVAE  # (totalvae.py imports this module)

        enc, dec = module.encoder, module.decoder
        heads = (enc.z_mean_encoder, enc.z_var_encoder, *_heads(dec).values())
        names = ("forward", "inference", "generative", "loss", "protein_terms")
        covered = (
            same_model(type(module), _TOTALVAE, names)
            and module.classifier is None
            and module.latent_distribution == "normal"
            and module.use_observed_lib_size
            and not module.use_size_factor_key
            and module.n_continuous_cov == 0
            and dec.scale_activation == "softmax"
            and all(h.bias is not None for h in heads)
            and stack_fuses(enc.encoder)
            and all(stack_fuses(s) for s in _stacks(dec))
        )
        _plans[module] = tuple(module.modules()) if covered else None
    return _plans[module]


_plans: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _stacks(dec) -> list:
    return [dec.px_decoder, dec.py_back_decoder, dec.py_fore_decoder, dec.py_mixing_decoder]


def _heads(dec) -> dict:
    """The decoder's output layers by the name of their covariate vectors."""
    heads = {"px_scale": dec.px_scale_decoder, "px_dropout": dec.px_dropout_decoder}
    heads |= {"back_alpha": dec.py_back_alpha, "back_beta": dec.py_back_beta}
    heads |= {"fore_scale": dec.py_fore_scale, "mixing": dec.py_mixing}
    return {k: v for k, v in heads.items() if v is not None}


def supports(module, tensors: dict) -> bool:
    """Whether :func:`fused_training_step` covers this module and minibatch."""
    modules = _plan(module)
    y = tensors.get("protein")
    x = tensors.get("x")
    return (
        modules is not None
        and "cont_covs" not in tensors
        and isinstance(y, torch.Tensor)
        and y.dim() == 2
        and y.shape[0] == getattr(x, "shape", (None,))[0]
        and y.shape[1] == module.n_input_proteins
        and trainable(modules, x, y)
    )


class _Head:
    """A decoder head ``layer(input)`` plus its covariate vectors: forward and gradients."""

    __slots__ = ("layer", "input", "vectors")

    def __init__(self, layer, inp: torch.Tensor, vectors, codes: list):
        self.layer, self.input = layer, inp
        self.vectors = [
            (emb.weight, codes[i]) for emb, i in zip(vectors.embeddings, vectors.cat_keep)
        ]

    def forward(self) -> torch.Tensor:
        out = torch.addmm(self.layer.bias, self.input, self.layer.weight.t())
        for table, c in self.vectors:  # as CovariateVectors adds them
            out = out + table.index_select(0, c)
        return out

    def backward(self, d: torch.Tensor, grads: dict) -> torch.Tensor:
        """The layer's and vectors' gradients into ``grads``; returns the input's gradient."""
        head_grads(d, self.input, self.layer, grads)
        for table, c in self.vectors:
            grads[table] = torch.zeros_like(table).index_add_(0, c, d)
        return torch.mm(d, self.layer.weight)


@torch.no_grad()
def fused_training_step(module, tensors: dict, kl_weight: float = 1.0) -> LossOutput | None:
    """``module(tensors, kl_weight)`` and its ``loss.backward()``, or None where not covered.

    ``module`` is a :class:`~cellvae.module.TOTALVAE` in training mode. The gradients are added
    to each parameter's ``.grad`` (set where it is None), as ``backward`` does; the returned
    :class:`LossOutput` holds values without autograd history.
    """
    if not supports(module, tensors):
        return None
    x, y = tensors["x"], tensors["protein"]
    n_cells = x.shape[0]
    enc, dec = module.encoder, module.decoder
    cats = covariate_codes(tensors)
    codes = [codes_of(c) for c in cats]
    batch = codes[0]

    # ---- inference: q(z | x, y), its sample and KL; the observed library
    data = HStack(x.with_values(torch.log1p(x.val)), torch.log1p(y))
    enc_saved: list[Layer] = []
    q = stack_forward(enc.encoder, data, cats, enc_saved)
    latent = NormalHeads(enc.z_mean_encoder, enc.z_var_encoder, q, enc.var_eps)
    z, kl_z = latent.sample()
    library = row_sums(x).view(-1)

    # ---- generative: the four stacks (one joined layer where each has one, as parallel_stacks)
    stacks = _stacks(dec)
    joined, pairs = None, []
    if all(len(s.linears) == 1 for s in stacks):
        joined, pairs = join_layers(stacks)
        dec_saved = [[]]
        hs = stack_forward(joined, z, cats, dec_saved[0]).split(
            [s.post[0][0].num_features for s in stacks], 1
        )
    else:
        dec_saved = [[] for _ in stacks]
        hs = [stack_forward(s, z, cats, saved) for s, saved in zip(stacks, dec_saved)]
    h, h_back, h_fore, h_mix = hs
    hz_back, hz_fore = torch.cat([h_back, z], 1), torch.cat([h_fore, z], 1)
    hz_mix = torch.cat([h_mix, z], 1)
    layers, vectors = _heads(dec), dec.head_covariates
    heads = {
        "px_scale": _Head(layers["px_scale"], torch.cat([h, z], 1), vectors["px_scale"], codes),
        "back_alpha": _Head(layers["back_alpha"], hz_back, vectors["back_alpha"], codes),
        "back_beta": _Head(layers["back_beta"], hz_back, vectors["back_beta"], codes),
        "fore_scale": _Head(layers["fore_scale"], hz_fore, vectors["fore_scale"], codes),
        "mixing": _Head(layers["mixing"], hz_mix, vectors["mixing"], codes),
    }
    if module.gene_likelihood == "zinb":
        heads["px_dropout"] = _Head(layers["px_dropout"], hz_mix, vectors["px_dropout"], codes)
    logits = heads["px_scale"].forward()
    pi = heads["px_dropout"].forward() if "px_dropout" in heads else None
    alpha = heads["back_alpha"].forward()
    pre_beta = heads["back_beta"].forward()
    beta = F.softplus(pre_beta) + 1e-8
    back_noise = torch.randn_like(alpha)
    log_back = alpha + beta * back_noise
    rate_back = torch.exp(log_back.clamp(max=_LOG_BACK_MAX))
    pre_fore = heads["fore_scale"].forward()
    fore = F.relu(pre_fore) + 1.0 + 1e-8
    mixing = heads["mixing"].forward()
    rate_fore = rate_back * fore

    # ---- the likelihoods and KL terms, with the gradients of their row sums
    theta_x = Dispersion(module.px_r, module.gene_dispersion, tensors)
    row_grad = -1.0 / n_cells  # the loss is the mean over cells of minus the row sums
    log_px, d_logits, d_pi, d_theta_x, _ = _kernels.softmax_nb_zinb_log_prob_sum(
        logits, library, theta_x.rows, pi, x.val, x.row, x.col, EPS, True,
        row_grad=row_grad,
    )  # fmt: skip
    rec_genes = log_px.neg_()
    theta_y = Dispersion(module.py_r, module.protein_dispersion, tensors)
    mask = module.protein_batch_mask
    rec_proteins, kl_back, *unit = _kernels.protein_terms(
        rate_back, rate_fore, theta_y.rows, mixing, y.contiguous(), alpha, beta, batch,
        mask, module.prior_mean, module.prior_log_scale, EPS, True,
    )  # fmt: skip
    loss = torch.mean(rec_genes + rec_proteins + kl_weight * (kl_z + kl_back))

    bns = [m for m in _plan(module) if isinstance(m, torch.nn.BatchNorm1d)]
    torch._foreach_add_([m.num_batches_tracked for m in bns], 1)  # as each forward pass counts

    # ---- backward: the protein terms, the background's sample and the heads' activations
    grads: dict[torch.Tensor, torch.Tensor] = {}
    d_rec = torch.full_like(rec_proteins, 1.0 / n_cells)
    d_kl = torch.full_like(kl_back, 1.0 / n_cells).mul_(kl_weight)
    per_entry = theta_y.rows.dim() == 2
    d_back, d_fore_rate, d_mixing, d_alpha, d_beta, d_theta_y, d_pm, d_pls = (
        _kernels.protein_terms_backward(d_rec, d_kl, batch, mask.shape[0], unit, per_entry)
    )
    grads[module.prior_mean], grads[module.prior_log_scale] = d_pm, d_pls
    d_back.add_(d_fore_rate * fore)  # rate_fore = rate_back · fore
    d_fore = d_fore_rate.mul_(rate_back)
    # exp's derivative, none where the log rate was clamped
    d_log = d_back.mul_(rate_back).masked_fill_(log_back > _LOG_BACK_MAX, 0.0)
    d_alpha.add_(d_log)
    d_beta.add_(d_log.mul_(back_noise))
    d_pre_beta = torch.ops.aten.softplus_backward(d_beta, pre_beta, 1.0, 20.0)
    d_pre_fore = d_fore.masked_fill_(pre_fore <= 0, 0.0)  # ReLU's: none where it gave 0
    theta_x.backward(d_theta_x, grads)
    theta_y.backward(d_theta_y, grads)

    # ---- the heads and stacks of the decoder
    d_hz = heads["px_scale"].backward(d_logits, grads)
    d_hz_back = heads["back_alpha"].backward(d_alpha, grads)
    d_hz_back += heads["back_beta"].backward(d_pre_beta, grads)
    d_hz_fore = heads["fore_scale"].backward(d_pre_fore, grads)
    d_hz_mix = heads["mixing"].backward(d_mixing, grads)
    if pi is not None:
        d_hz_mix += heads["px_dropout"].backward(d_pi, grads)
    width = h.shape[1]
    d_z = d_hz[:, width:] + d_hz_back[:, width:] + d_hz_fore[:, width:] + d_hz_mix[:, width:]
    d_hs = [d[:, :width] for d in (d_hz, d_hz_back, d_hz_fore, d_hz_mix)]
    if joined is not None:
        d_z += stack_backward(dec_saved[0], torch.cat(d_hs, 1), grads, need_input=True)
    else:
        for saved, d in zip(dec_saved, d_hs):
            d_z += stack_backward(saved, d.contiguous(), grads, need_input=True)

    # ---- the encoder
    d_kl_z = torch.full_like(kl_z, 1.0 / n_cells).mul_(kl_weight)
    stack_backward(enc_saved, latent.backward(d_z, d_kl_z, grads), grads, need_input=False)

    split_back(pairs, grads)  # the joined stacks' statistics and gradients to each stack's
    hand_out(grads)
    return LossOutput(
        loss=loss,
        reconstruction=rec_genes + rec_proteins,
        kl_local=kl_z + kl_back,
        extra={"reconstruction_protein": rec_proteins, "kl_background": kl_back},
    )
