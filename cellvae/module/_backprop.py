"""The pieces of the hand-written training steps (:mod:`._vae_step`, :mod:`._totalvae_step`).

A hidden stack of :class:`~cellvae.nn.FCLayers` forward and back with the compiled kernels
(also the one wider layer of :func:`cellvae.nn.join_layers`), the latent heads, a linear head's
gradients, the dispersions, the checks that a module and minibatch are covered
(training mode, trainable float32 parameters, no hooks) and the gradients handed to the
parameters as ``backward()`` hands them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import _kernels
from .._sparse import CSRBatch, HStack, _weight_grad
from ..nn import FCLayers, bn_fusable, dropout_masks, restore_statistics
from ._base import rows_of


def codes_of(c: torch.Tensor) -> torch.Tensor:
    """Category codes as a contiguous int64 vector (what the kernels and ``index_*`` read)."""
    c = c.reshape(-1)
    return c if c.dtype == torch.int64 and c.is_contiguous() else c.long().contiguous()


def stack_fuses(stack: FCLayers) -> bool:
    """Whether every layer of ``stack`` is linear (with a bias) → batch norm → ReLU (→ dropout)."""
    if not stack._fusable:
        return False
    return all(
        bn_fusable(post[0]) and lin.bias is not None for lin, post in zip(stack.linears, stack.post)
    )


def trainable(modules: Sequence[torch.nn.Module], x, *tensors: torch.Tensor) -> bool:
    """Whether a hand-written step may stand for ``modules``' forward and backward on ``x``.

    Every module in training mode (batch norm and dropout as in training), ``x`` a CSR
    minibatch of more than one row, every parameter trainable, contiguous and float32 on the
    CPU with ``x``'s values and ``tensors`` (:func:`cellvae._kernels.takes`), and no code of the
    user's in forward or backward (:func:`hooked`).
    """
    params = [p for m in modules for p in m._parameters.values() if p is not None]
    return (
        all(m.training for m in modules)
        and isinstance(x, CSRBatch)
        and x.shape[0] > 1
        and all(p.requires_grad and p.is_contiguous() for p in params)
        and _kernels.takes(x.val, *tensors, *params)
        and not hooked(modules[0], params, modules)
    )


def hooked(module, params, modules) -> bool:
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


def same_model(cls: type, base: type, names: Sequence[str]) -> bool:
    """Whether ``cls`` keeps ``base``'s methods ``names``.

    A subclass that changes the model's code runs its own forward pass and autograd.
    """
    return all(getattr(cls, name) is getattr(base, name) for name in names)


class Layer:
    """What one hidden layer's backward pass needs from its forward pass."""

    __slots__ = ("x", "y", "out", "mean", "invstd", "scale", "covariates", "linear", "bn")


def stack_forward(stack, x, cats: Sequence[torch.Tensor], saved: list) -> torch.Tensor:
    """The stack's output; each layer's :class:`Layer` appended to ``saved``.

    ``stack`` is an :class:`~cellvae.nn.FCLayers` (or :func:`cellvae.nn.join_layers`' stand-in) and
    ``x`` the input of its first layer: a dense matrix, the CSR minibatch whose values are
    already transformed (log1p), or an :class:`~cellvae._sparse.HStack` of it and dense columns.
    ``cats`` are all the covariates' codes (the stack keeps its own).
    """
    kept = [codes_of(cats[i]) for i in stack.cat_keep if i < len(cats)]
    for linear, post in zip(stack.linears, stack.post):
        y = _product(x, linear.weight, linear.bias)
        bn = post[0]
        seed, threshold, scale = dropout_masks(post[2] if len(post) > 2 else None)
        covariates = [(e.weight, c) for e, c in zip(linear.embeddings, kept)]
        out, mean, invstd = _kernels.bn_relu_drop_forward(
            y, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.momentum, bn.eps,
            None, threshold, scale, covariates, seed=seed,
        )  # fmt: skip
        layer = Layer()
        layer.x, layer.y, layer.out, layer.mean, layer.invstd = x, y, out, mean, invstd
        layer.scale, layer.covariates, layer.linear, layer.bn = scale, covariates, linear, bn
        saved.append(layer)
        x = out
    return x


def _product(x, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``x weight + bias`` for an input-major weight, as :func:`cellvae._sparse.sparse_linear`."""
    if isinstance(x, torch.Tensor):
        return torch.addmm(bias, x, weight)
    sparse, dense = (x.sparse, x.dense) if isinstance(x, HStack) else (x, None)
    n_cols = sparse.shape[1]
    y = _kernels.csr_dense(sparse.offsets, sparse.col, sparse.val, weight[:n_cols], bias)
    return y if dense is None else y.addmm_(dense, weight[n_cols:])


def stack_backward(saved: list, d_out: torch.Tensor, grads: dict, need_input: bool):
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
        if isinstance(x, torch.Tensor):
            grads[lin.weight] = torch.mm(x.t(), dy)
        else:
            sparse, dense = (x.sparse, x.dense) if isinstance(x, HStack) else (x, None)
            grads[lin.weight] = _weight_grad(
                dy, sparse.row, sparse.col, sparse.val, sparse.shape[1], dense
            )
        grads[lin.bias] = dy.sum(0)
        d = torch.mm(dy, lin.weight.t()) if i > 0 or need_input else None
    return d


def head_grads(d: torch.Tensor, h: torch.Tensor, layer, grads: dict) -> None:
    """An ``nn.Linear`` head's weight and bias gradients from its output's gradient ``d``."""
    grads[layer.weight] = torch.mm(d.t(), h)
    grads[layer.bias] = d.sum(0)


class NormalHeads:
    """An encoder's mean and variance heads, its sample and KL, forward and back.

    As :func:`cellvae.nn.normal_heads` (which draws the noise the same way): both heads one
    product, the sample and the KL one compiled call
    (:func:`cellvae._kernels.normal_sample_forward`).
    """

    def __init__(self, mean, var, q: torch.Tensor, var_eps: float):
        self.mean, self.var, self.q, self.var_eps = mean, var, q, var_eps
        self.noise = torch.randn(q.shape[0], mean.out_features, dtype=q.dtype)
        self.weight = torch.cat([mean.weight, var.weight])
        self.mu = torch.addmm(torch.cat([mean.bias, var.bias]), q, self.weight.t())

    def sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z, kl)``: the sample and KL(q ‖ N(0, I)) per row."""
        _, _, z, kl = _kernels.normal_sample_forward(self.mu, self.noise, self.var_eps)
        return z, kl

    def backward(self, d_z: torch.Tensor, d_kl: torch.Tensor, grads: dict) -> torch.Tensor:
        """The heads' gradients into ``grads``; returns the gradient by ``q``."""
        grad = [None, None, d_z, d_kl]
        d_mu = _kernels.normal_sample_backward(self.mu, self.noise, self.var_eps, grad)
        n = self.mean.out_features
        d_w, d_b = torch.mm(d_mu.t(), self.q), d_mu.sum(0)
        grads[self.mean.weight], grads[self.var.weight] = d_w[:n], d_w[n:]
        grads[self.mean.bias], grads[self.var.bias] = d_b[:n], d_b[n:]
        return torch.mm(d_mu, self.weight)


def split_back(pairs: list, grads: dict) -> None:
    """After a step on :func:`cellvae.nn.join_layers`' stand-in: each part's share.

    The joined running statistics are copied back into each batch norm's; a joined parameter's
    gradient in ``grads`` is replaced by its parts' (contiguous, as autograd hands them out).
    """
    restore_statistics(pairs)
    for joined, parts in pairs:
        if joined in grads:
            widths = [p.shape[-1] for p in parts]
            for p, g in zip(parts, grads.pop(joined).split(widths, dim=-1)):
                grads[p] = g.contiguous()


EPS = 1e-8  # the NB / ZINB / mixture distributions' floor of theta (their eps)


class Dispersion:
    """An inverse dispersion ``exp(param)``: each cell's rows, floored, and their gradient back.

    ``param`` is per feature, or per category and feature (``option`` ending in ``"-batch"``:
    the cells' batches; else their labels).
    """

    def __init__(self, param: torch.Tensor, option: str, tensors: dict):
        self.param, self.theta, self.codes = param, torch.exp(param), None
        if param.dim() == 2:
            self.codes = codes_of(tensors["batch" if option.endswith("-batch") else "labels"])
        rows = self.theta if self.codes is None else rows_of(self.theta, self.codes)
        self.rows = rows.clamp_min(EPS)

    def backward(self, d_rows: torch.Tensor, grads: dict) -> None:
        """``param``'s gradient into ``grads`` from that of the rows (per feature: summed)."""
        d = d_rows
        if self.codes is not None:  # each category's rows summed
            d = torch.zeros_like(self.theta).index_add_(0, self.codes, d_rows)
        # exp's derivative, and none below the floor
        grads[self.param] = d.mul_(self.theta).masked_fill_(self.theta < EPS, 0.0)


def hand_out(grads: dict) -> None:
    """Add each gradient to its parameter's ``.grad`` (set where None), as ``backward`` does."""
    for p, g in grads.items():
        if p.grad is None:
            p.grad = g
        else:
            p.grad += g
