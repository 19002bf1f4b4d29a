"""Likelihoods for count and continuous data: NB, ZINB, Poisson, Normal and the NB mixture.

Pure torch. Every count distribution has an elementwise :meth:`log_prob` and a fast
:meth:`log_prob_sum` that sums over the last (gene) dimension and evaluates the ``lgamma`` terms
only at the nonzero entries of a sparse batch (they vanish at ``x = 0``).

Numerical conventions
---------------------
* ``θ (log θ − log(θ + μ))`` is computed as ``−θ log1p(μ / θ)``, which keeps full precision when
  ``θ ≫ μ`` (the naive difference of logs loses about ``log10(θ / μ)`` digits and, multiplied by
  ``θ``, can be off by O(1) in float32); likewise ``x (log μ − log(θ + μ)) = −x log1p(θ / μ)``.
* ``eps`` is a floor, not an offset: ``θ`` and ``μ`` (inside ``log μ``) are clamped to at least
  ``eps``. Valid parameters above ``eps`` are therefore used exactly, while ``μ = 0`` (an
  underflowed rate) gives a finite log-likelihood instead of ``-inf``/NaN.
* ``log(1 − σ(π))`` is computed as ``−softplus(π)`` (equal to ``−π − softplus(−π)``, without the
  cancellation for very negative ``π``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.distributions import Distribution, constraints

from . import _kernels
from ._sparse import CSRBatch, as_dense

__all__ = [
    "NegativeBinomial",
    "NegativeBinomialMixture",
    "Normal",
    "Poisson",
    "ZeroInflatedNegativeBinomial",
    "log_mixture_nb",
    "log_nb_positive",
    "log_zinb_positive",
]

_Nonzero = tuple[torch.Tensor, torch.Tensor]
_TINY = 1e-30  # below this p(0), the ZINB zero branch switches to its softplus form


# --------------------------------------------------------------------------------------------------
# elementwise log-likelihoods
# --------------------------------------------------------------------------------------------------
def _wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float64 where the device has it (MPS has not).

    For the terms that cancel at large counts: at 1e5 counts and more, ``lgamma(x + θ)``,
    ``lgamma(x + 1)`` and ``x log μ`` are above 1e6, where float32's spacing is ~0.1, and their
    differences (``(θ − 1) log x``, ...) lost up to 0.2 per count in float32. The compiled
    kernels compute these terms in float64 too.
    """
    return t if t.device.type == "mps" else t.double()


def _lgamma_terms(
    x: torch.Tensor, theta: torch.Tensor, lgamma_theta: torch.Tensor | None = None
) -> torch.Tensor:
    """``lgamma(x + θ) − lgamma(θ) − lgamma(x + 1)`` by :func:`_wide`, in the inputs' dtype.

    The sums too: ``x + θ`` in float32 is rounded to 0.125 at 1e6. ``lgamma_theta``: ``lgamma(θ)``
    when the caller has it (the nonzeros' terms, ``x > 0``); otherwise it is computed here, so
    that the terms cancel exactly at ``x = 0``.
    """
    x_w, theta_w = _wide(x), _wide(theta)
    lg_theta = torch.lgamma(theta_w) if lgamma_theta is None else lgamma_theta
    terms = torch.lgamma(x_w + theta_w) - torch.lgamma(x_w + 1) - lg_theta
    return terms.to(torch.promote_types(x.dtype, theta.dtype))


def _wide_lgamma(t: torch.Tensor) -> torch.Tensor:
    """``lgamma`` computed by :func:`_wide` (and left so): for :func:`_lgamma_terms`."""
    return torch.lgamma(_wide(t))


def _poisson_rest(x: torch.Tensor, rate: torch.Tensor, eps: float) -> torch.Tensor:
    """``x log(rate) − lgamma(x + 1)``, computed by :func:`_wide` and left in that dtype."""
    x_w = _wide(x)
    return x_w * torch.log(_wide(rate).clamp_min(eps)) - torch.lgamma(x_w + 1)


def _nb_core(
    x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(θ log(1 + μ/θ), log NB(x) + θ log(1 + μ/θ))`` with ``θ`` already floored at ``eps``.

    The second term, ``−x log(1 + θ/μ) + lgamma(x+θ) − lgamma(θ) − lgamma(x+1)``, is zero at
    ``x = 0``.
    """
    theta_term = theta * torch.log1p(mu / theta)  # −log NB(0) = θ log((θ + μ) / θ)
    rest = (
        _lgamma_terms(x, theta) - x * torch.log1p(theta / mu.clamp_min(eps))  # x log(μ / (θ + μ))
    )
    return theta_term, rest


def log_nb_positive(
    x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, eps: float = 1e-8
) -> torch.Tensor:
    """Elementwise log-likelihood of a negative binomial with mean ``mu`` and dispersion ``theta``.

    ``log NB(x) = θ (log θ − log(θ+μ)) + x (log μ − log(θ+μ))
    + lgamma(x+θ) − lgamma(θ) − lgamma(x+1)``.

    Parameters
    ----------
    x
        Observed counts (float tensor, broadcastable with the parameters).
    mu
        Mean, ``>= 0``.
    theta
        Inverse dispersion, ``> 0``.
    eps
        Floor applied to ``theta`` and to ``mu`` inside ``log mu``.

    Returns
    -------
    torch.Tensor
        ``log p(x)`` with the broadcast shape of the inputs.

    Examples
    --------
    >>> import torch
    >>> x = torch.tensor([0.0, 3.0])
    >>> log_nb_positive(x, mu=torch.tensor([2.0, 2.0]), theta=torch.tensor([1.0, 1.0])).shape
    torch.Size([2])
    """
    theta = theta.clamp_min(eps)
    theta_term, rest = _nb_core(x, mu, theta, eps)
    return rest - theta_term


def log_zinb_positive(
    x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, pi: torch.Tensor, eps: float = 1e-8
) -> torch.Tensor:
    """Elementwise log-likelihood of a zero-inflated negative binomial.

    With ``pi`` the logit of the dropout probability ``σ(π)``:
    ``log p(0) = softplus(−π − θ log(1 + μ/θ)) − softplus(−π)`` and
    ``log p(x) = −softplus(π) + log NB(x)`` for ``x > 0``.

    Parameters
    ----------
    x
        Observed counts.
    mu
        NB mean, ``>= 0``.
    theta
        NB inverse dispersion, ``> 0``.
    pi
        Logit of the dropout (extra zero) probability.
    eps
        Floor applied to ``theta`` and to ``mu`` inside ``log mu``.

    Returns
    -------
    torch.Tensor
        ``log p(x)`` with the broadcast shape of the inputs. Both branches are finite everywhere, so
        gradients through the unused branch of the ``torch.where`` are zero, never NaN.

    Examples
    --------
    >>> import torch
    >>> x, mu, theta = torch.zeros(3), torch.full((3,), 2.0), torch.ones(3)
    >>> zinb, nb = log_zinb_positive(x, mu, theta, torch.zeros(3)), log_nb_positive(x, mu, theta)
    >>> bool((zinb > nb).all())
    True
    """
    theta = theta.clamp_min(eps)
    theta_term, rest = _nb_core(x, mu, theta, eps)
    log_p0 = F.softplus(-pi - theta_term) - F.softplus(-pi)
    log_px = rest - theta_term - F.softplus(pi)
    return torch.where(x > 0, log_px, log_p0)


def log_mixture_nb(
    x: torch.Tensor,
    mu1: torch.Tensor,
    mu2: torch.Tensor,
    theta1: torch.Tensor,
    theta2: torch.Tensor | None,
    pi: torch.Tensor,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Elementwise log-likelihood of a two-component NB mixture (totalVI proteins).

    ``log p(y) = logsumexp(log NB(y; μ1, θ1), log NB(y; μ2, θ2) − π) − softplus(−π)`` with ``π`` the
    logit of the probability of component 1 (background). With ``theta2=None`` both components share
    ``theta1`` and the ``lgamma`` terms are computed once.

    Parameters
    ----------
    x
        Observed counts.
    mu1
        Mean of component 1 (background).
    mu2
        Mean of component 2 (foreground).
    theta1
        Inverse dispersion of component 1 (of both components if ``theta2`` is None).
    theta2
        Inverse dispersion of component 2, or None to share ``theta1``.
    pi
        Logit of the probability of component 1.
    eps
        Floor applied to the ``theta`` and to the ``mu`` inside their logarithms.

    Returns
    -------
    torch.Tensor
        ``log p(x)`` with the broadcast shape of the inputs.

    Examples
    --------
    >>> import torch
    >>> y = torch.tensor([[5.0, 80.0]])
    >>> log_mixture_nb(y, torch.full((1, 2), 5.0), torch.full((1, 2), 80.0), torch.ones(2), None,
    ...                torch.zeros(1, 2)).shape
    torch.Size([1, 2])
    """
    theta1 = theta1.clamp_min(eps)
    if theta2 is None:
        shared = _lgamma_terms(x, theta1)
        a1 = -theta1 * torch.log1p(mu1 / theta1) - x * torch.log1p(theta1 / mu1.clamp_min(eps))
        a2 = -theta1 * torch.log1p(mu2 / theta1) - x * torch.log1p(theta1 / mu2.clamp_min(eps))
        return shared + torch.logaddexp(a1, a2 - pi) - F.softplus(-pi)
    log_nb1 = log_nb_positive(x, mu1, theta1, eps)
    log_nb2 = log_nb_positive(x, mu2, theta2, eps)
    return torch.logaddexp(log_nb1, log_nb2 - pi) - F.softplus(-pi)


# --------------------------------------------------------------------------------------------------
# sparse row sums
#
# log_prob_sum evaluates the x = 0 value of every entry densely (a division, a log1p and, for the
# ZINB, two softplus per entry) and the lgamma terms only at the nonzeros. The NB and ZINB versions
# are autograd Functions whose gradients are written by hand: when autograd will need them, the
# forward pass computes them for a unit row gradient from its own temporaries, in place, and keeps
# only those; the backward pass scales them by the incoming row gradients. (A separate backward
# recomputed half of the forward and held twice as many cells x genes tensors: the SCVI training
# step took 15.1 ms, now 13.9 ms, medians of 10 interleaved runs on 100k x 2,000, batch 128.)
# For float32 CPU tensors (θ per gene, or per entry: per batch and gene, or per cell),
# _FusedLogProbSum computes the same in the compiled kernels of cellvae/_kernels.c (where they
# were built); these functions are the reference the tests hold the kernels to, and the code for
# GPUs and float64.
# --------------------------------------------------------------------------------------------------
def _nonzeros(x, nz: _Nonzero | None):
    """Nonzero entries of ``x`` (a dense tensor or a CSR batch).

    Returns ``(row, col, lin, x_nz, shape)``: positions, flat positions ``row * G + col`` (None
    for a CSR batch: :func:`_flat` makes them where needed, and the compiled kernels take
    ``row`` and ``col``), values and the ``(cells, genes)`` shape of ``x``.
    """
    if isinstance(x, CSRBatch):
        return x.row, x.col, None, x.val, x.shape
    if x.dim() != 2:
        raise ValueError(
            f"log_prob_sum expects a 2-D (cells x genes) tensor, got shape {tuple(x.shape)}."
        )
    if nz is None:
        row, col = torch.nonzero(x, as_tuple=True)
    else:
        row = nz[0].to(device=x.device, dtype=torch.long)
        col = nz[1].to(device=x.device, dtype=torch.long)
    lin = row * x.shape[1] + col
    return row, col, lin, x.reshape(-1).index_select(0, lin), tuple(x.shape)


def _flat(row: torch.Tensor, col: torch.Tensor, lin: torch.Tensor | None, shape) -> torch.Tensor:
    """The flat positions ``row * G + col`` (``lin`` itself when already made)."""
    return row * shape[1] + col if lin is None else lin


def _per_gene(p: torch.Tensor, n_genes: int) -> bool:
    """Whether ``p`` holds one value per gene (shape ``(G,)`` or ``(1, G)``)."""
    return p.dim() >= 1 and p.shape[-1] == n_genes and p.numel() == n_genes


def _param_view(p: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """``p`` as ``(G,)`` when per gene, otherwise as a contiguous tensor of ``shape``.

    Contiguous (a no-op for the usual ``(B, G)`` decoder outputs) so that flat positions
    ``row * G + col`` address the same entries in every tensor of the backward pass.
    """
    if _per_gene(p, shape[-1]):
        return p.reshape(shape[-1])
    return p.expand(shape).contiguous()


def _at(p: torch.Tensor, col: torch.Tensor, lin: torch.Tensor) -> torch.Tensor:
    """Values of a ``(G,)`` or ``(B, G)`` tensor at the nonzeros."""
    return p.index_select(0, col) if p.dim() == 1 else p.reshape(-1).index_select(0, lin)


def _special_at(fn, theta: torch.Tensor, theta_nz: torch.Tensor, col: torch.Tensor):
    """``fn(θ)`` at the nonzeros; evaluated on the ``G`` values only when ``θ`` is per gene."""
    return fn(theta).index_select(0, col) if theta.dim() == 1 else fn(theta_nz)


def _nb_rest_nz(x_nz, mu_nz, theta_nz, lgamma_theta_nz, eps):
    """``lgamma(x+θ) − lgamma(θ) − lgamma(x+1) + x log(μ/(θ+μ))`` at the nonzeros."""
    return _lgamma_terms(x_nz, theta_nz, lgamma_theta_nz) - x_nz * torch.log1p(
        theta_nz / mu_nz.clamp_min(eps)
    )


def _nb_grads_nz(x_nz, mu_nz, theta_nz, digamma_theta_nz, eps):
    """Derivatives of :func:`_nb_rest_nz` with respect to ``μ`` and ``θ``."""
    mu_c = mu_nz.clamp_min(eps)
    x_over = x_nz / (mu_c + theta_nz)  # x / (μ + θ)
    d_mu = torch.where(mu_nz >= eps, x_over * theta_nz / mu_c, 0.0)  # x θ / (μ (μ + θ))
    d_theta = torch.digamma(x_nz + theta_nz) - digamma_theta_nz - x_over
    return d_mu, d_theta


def _wants_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _grad_theta(per_gene: bool, dense, nz_fix, grad_out, g_nz, col, lin):
    """``Σ_b g_b · dense`` (per-gene ``θ``) or ``g · dense`` (``(B, G)`` ``θ``), plus the nonzeros.

    ``dense`` is ``∂ log p/∂θ`` at every entry as if it were zero, ``nz_fix`` what the nonzeros
    add to it (both for a unit row gradient); the per-gene sum is a matrix-vector product.
    """
    if per_gene:
        out = torch.mv(dense.t(), grad_out)
        return out.index_add_(0, col, nz_fix * g_nz)
    out = dense * grad_out[:, None]
    out.view(-1).index_add_(0, lin, nz_fix * g_nz)
    return out


class _NBLogProbSum(torch.autograd.Function):
    """Row sums of log NB: ``−Σ_g θ log(1 + μ/θ)`` plus the nonzero-only terms.

    ``mu`` is ``(B, G)``, ``theta`` ``(G,)`` or ``(B, G)`` (floored at ``eps``). Gradients:
    ``∂/∂μ = −θ/(θ+μ)`` and ``∂/∂θ = −(log(1 + μ/θ) − μ/(θ+μ))`` everywhere, plus the derivatives
    of the nonzero-only terms at the nonzeros. With ``with_grad`` they are computed in the forward
    pass for a unit gradient of every row sum, from the forward's own temporaries, and only they
    are kept for the backward pass, which scales them by the incoming row gradients (fewer
    passes over the cells × genes entries and fewer of them held than a separate backward).
    """

    @staticmethod
    def forward(ctx, mu, theta, x_nz, row, col, lin, eps, with_grad):
        t = torch.div(mu, theta).log1p_()  # log(1 + μ/θ)
        out = t @ theta if theta.dim() == 1 else (t * theta).sum(-1)
        mu_nz, theta_nz = mu.reshape(-1).index_select(0, lin), _at(theta, col, lin)
        lgamma_theta_nz = _special_at(_wide_lgamma, theta, theta_nz, col)
        rest = _nb_rest_nz(x_nz, mu_nz, theta_nz, lgamma_theta_nz, eps)
        out = out.neg_().index_add_(0, row, rest)
        if not with_grad:
            return out
        digamma_theta_nz = _special_at(torch.digamma, theta, theta_nz, col)
        d_mu, d_theta = _nb_grads_nz(x_nz, mu_nz, theta_nz, digamma_theta_nz, eps)
        q = torch.add(mu, theta)
        torch.div(theta, q, out=q)  # θ/(θ+μ); ∂(θt)/∂θ = t + q − 1
        dense_theta = t.add_(q).neg_().add_(1.0)  # 1 − t − q
        q.neg_().view(-1).index_add_(0, lin, d_mu)  # ∂/∂μ = −q (+ the nonzero terms)
        ctx.save_for_backward(q, dense_theta, d_theta, row, col, lin)
        ctx.theta_per_gene = theta.dim() == 1
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        grad_mu_unit, dense_theta, d_theta, row, col, lin = ctx.saved_tensors
        g_nz = grad_out.index_select(0, row)
        grad_mu = grad_theta = None
        if ctx.needs_input_grad[1]:
            per_gene = ctx.theta_per_gene
            grad_theta = _grad_theta(per_gene, dense_theta, d_theta, grad_out, g_nz, col, lin)
        if ctx.needs_input_grad[0]:
            grad_mu = grad_mu_unit * grad_out[:, None]
        return grad_mu, grad_theta, None, None, None, None, None, None


class _ZINBLogProbSum(torch.autograd.Function):
    """Row sums of log ZINB: the zero branch densely, replaced by the positive branch at x > 0.

    ``mu`` and ``pi`` are ``(B, G)``, ``theta`` ``(G,)`` or ``(B, G)`` (floored at ``eps``). With
    ``t = log(1 + μ/θ)``, ``r = exp(−θt) = NB(0)``, ``w = σ(π)`` and ``q = θ/(θ+μ)`` the zero
    branch is ``log p0 = log(w + (1 − w) r)``: one exp, one sigmoid and one log per entry, where
    the textbook ``softplus(−π − θt) − softplus(−π)`` needs four transcendental passes. Where both
    probabilities underflow (``p0 < 1e-30``, i.e. ``π < −69`` and ``θt > 69``) the softplus form is
    used for those entries. With ``s = (1 − w) r / p0 = σ(−π − θt)``: ``∂/∂π = (1 − w) − s``,
    ``∂/∂μ = −s q``, ``∂/∂θ = −s (t + q − 1)``. Positive branch ``−softplus(π) − θt + rest``:
    ``∂/∂π = −w``, ``∂/∂μ = −q + ∂rest/∂μ``, ``∂/∂θ = −(t + q − 1) + ∂rest/∂θ``.

    With ``with_grad`` the gradients of a unit row gradient are computed in the forward pass,
    reusing its temporaries in place, and only they are kept (three cells × genes tensors, where a
    separate backward needed six saved and five more temporaries); the backward pass scales them.
    """

    @staticmethod
    def forward(ctx, mu, theta, pi, x_nz, row, col, lin, eps, with_grad):
        t = torch.div(mu, theta).log1p_()  # log(1 + μ/θ)
        r = torch.mul(t, theta).neg_().exp_()  # NB(0) = exp(−θt)
        w = torch.sigmoid(pi)
        omw = torch.rsub(w, 1.0)
        p0 = torch.addcmul(w, omw, r)
        log_p0 = torch.log(p0)
        small = None
        if p0.numel() and _may_underflow(p0):
            # both probabilities underflow: the stable form for those entries
            small = p0 < _TINY
            b = torch.addcmul(-pi, theta, t, value=-1)
            log_p0 = torch.where(small, F.softplus(b) - F.softplus(-pi), log_p0)
        out = log_p0.sum(-1)
        theta_nz = _at(theta, col, lin)
        mu_nz, t_nz = mu.reshape(-1).index_select(0, lin), t.reshape(-1).index_select(0, lin)
        lgamma_theta_nz = _special_at(_wide_lgamma, theta, theta_nz, col)
        rest = _nb_rest_nz(x_nz, mu_nz, theta_nz, lgamma_theta_nz, eps)
        log_px = rest.sub_(theta_nz * t_nz).sub_(F.softplus(pi.reshape(-1).index_select(0, lin)))
        # explicit zeros stored in the CSR keep the zero branch
        positive = x_nz > 0
        delta = torch.where(positive, log_px - log_p0.reshape(-1).index_select(0, lin), 0.0)
        out = out.index_add_(0, row, delta)
        if not with_grad:
            return out
        del log_p0, log_px, delta
        w_nz = w.reshape(-1).index_select(0, lin)
        digamma_theta_nz = _special_at(torch.digamma, theta, theta_nz, col)
        d_mu, d_theta = _nb_grads_nz(x_nz, mu_nz, theta_nz, digamma_theta_nz, eps)
        q_nz = theta_nz / (theta_nz + mu_nz)
        s = r.mul_(omw).div_(p0)  # σ(−π − θt), in r's storage
        if small is not None:  # b = −π − θt from the forward's stable branch
            s = torch.where(small, torch.sigmoid(b), s)
        q = torch.add(mu, theta, out=p0)
        torch.div(theta, q, out=q)  # θ/(θ+μ), in p0's storage
        grad_pi = omw.sub_(s)  # (1 − w) − s
        m = t.add_(q).sub_(1.0).mul_(s)  # s (t + q − 1), in t's storage
        grad_mu = q.mul_(s).neg_()  # −s q
        # the positive branch at x > 0; explicit zeros keep the zero branch
        _overwrite(grad_pi, lin, positive, w_nz.neg_())
        _overwrite(grad_mu, lin, positive, d_mu.sub_(q_nz))
        # ∂/∂θ: −m everywhere; at x > 0 the positive branch's value instead
        m_nz = m.reshape(-1).index_select(0, lin)
        fix = torch.where(positive, d_theta.add_(1.0).sub_(t_nz).sub_(q_nz) + m_nz, 0.0)
        ctx.save_for_backward(grad_mu, grad_pi, m.neg_(), fix, row, col, lin)
        ctx.theta_per_gene = theta.dim() == 1
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        grad_mu_unit, grad_pi_unit, dense_theta, fix, row, col, lin = ctx.saved_tensors
        g, g_nz = grad_out[:, None], grad_out.index_select(0, row)
        grad_mu = grad_theta = grad_pi = None
        if ctx.needs_input_grad[0]:
            grad_mu = grad_mu_unit * g
        if ctx.needs_input_grad[1]:
            per_gene = ctx.theta_per_gene
            grad_theta = _grad_theta(per_gene, dense_theta, fix, grad_out, g_nz, col, lin)
        if ctx.needs_input_grad[2]:
            grad_pi = grad_pi_unit * g
        return grad_mu, grad_theta, grad_pi, None, None, None, None, None, None


def _may_underflow(p0: torch.Tensor) -> bool:
    """Whether the ZINB's stable zero branch is needed: some ``p0`` below ``_TINY``.

    Read on the CPU, where the stable branch costs five passes over the entries. On other
    devices it is assumed, without reading ``p0`` back: the masked branch (which changes only the
    entries below ``_TINY``) is cheaper there than a host synchronisation per training step.
    """
    return p0.device.type != "cpu" or float(p0.amin()) < _TINY


def _overwrite(dense: torch.Tensor, lin: torch.Tensor, positive: torch.Tensor, values) -> None:
    """Set ``dense`` at the flat positions ``lin`` to ``values`` where ``positive``, in place."""
    flat = dense.view(-1)
    flat.index_copy_(0, lin, torch.where(positive, values, flat.index_select(0, lin)))


class _FusedLogProbSum(torch.autograd.Function):
    """Row sums of log NB (``pi`` None) or log ZINB by the compiled kernels of :mod:`._kernels`.

    The same quantities as :class:`_NBLogProbSum` / :class:`_ZINBLogProbSum` (which the tests
    hold it to), for float32 CPU tensors and a ``theta`` per gene ``(G,)`` or per entry
    (``(B, G)``: per batch and gene, or per cell): the forward pass computes the
    gradients of a unit row gradient, the backward pass scales them. With ``library`` (one value
    per row), the first argument holds logits and ``mu = library * softmax(logits, -1)``: the
    kernel evaluates the softmax with the likelihood and returns the gradients by the logits and
    the library, so neither the proportions nor ``mu`` become autograd nodes of their own.

    There, ``row_grad`` (a number, or None) is the gradient the caller expects every row sum to
    get (``-1/B`` for a loss that is the mean of minus the row sums). The kernel then returns the
    gradients for that row gradient, with ``theta``'s summed over the rows, and a backward pass
    that gets it has nothing to compute: it returns them. Any other row gradient gets the unit
    gradients computed again from the saved inputs (exact, one more kernel call).
    """

    @staticmethod
    def forward(ctx, mu, library, theta, pi, x_nz, row, col, eps, with_grad, row_grad=None):
        x_nz, row, col = x_nz.to(torch.float32).contiguous(), row.contiguous(), col.contiguous()
        args = (theta, pi, x_nz, row, col, eps, with_grad)
        ctx.row_grad = None
        ctx.theta_per_gene = theta.dim() == 1
        if library is None:
            out, gmu, gpi, gth = _kernels.nb_zinb_log_prob_sum(mu, *args)
            glib = None
        else:
            flat = library.reshape(-1)
            ctx.library_shape = library.shape
            out, gmu, gpi, gth, glib = _kernels.softmax_nb_zinb_log_prob_sum(
                mu, flat, *args, row_grad=row_grad
            )  # with row_grad (and gradients), gth holds a per-gene theta's sums over the rows
            if with_grad and row_grad is not None:
                ctx.row_grad, ctx.eps = row_grad, eps
                ctx.save_for_backward(gmu, gpi, gth, glib, mu, flat, *args[:5])
                return out
        if with_grad:
            ctx.save_for_backward(gmu, gpi, gth, glib)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        gmu, gpi, gth, glib, *inputs = ctx.saved_tensors
        needs = ctx.needs_input_grad
        if ctx.row_grad is not None:
            if bool((grad_out == ctx.row_grad).all()):  # as expected: the kernel's gradients
                grad_lib = glib.reshape(ctx.library_shape) if needs[1] else None
                return gmu, grad_lib, gth, gpi, None, None, None, None, None, None
            logits, flat, *args = inputs  # another row gradient: the unit gradients again
            _, gmu, gpi, gth, glib = _kernels.softmax_nb_zinb_log_prob_sum(
                logits, flat, *args, ctx.eps, True
            )
        g = grad_out[:, None]
        grad_mu = gmu * g if needs[0] else None
        grad_lib = (glib * grad_out).reshape(ctx.library_shape) if needs[1] else None
        grad_theta = None
        if needs[2]:
            grad_theta = torch.mv(gth.t(), grad_out) if ctx.theta_per_gene else gth * g
        grad_pi = gpi * g if gpi is not None and needs[3] else None
        return grad_mu, grad_lib, grad_theta, grad_pi, None, None, None, None, None, None


def _fused_nb(theta: torch.Tensor, shape, *tensors: torch.Tensor | None) -> bool:
    """Whether the NB / ZINB kernel takes these tensors: float32 on the CPU (None skipped).

    ``theta`` as :func:`_param_view` returns it: ``(G,)``, or contiguous of the minibatch's
    ``shape`` (per batch and gene, or per cell).
    """
    per_entry = theta.dim() == 2 and tuple(theta.shape) == tuple(shape) and theta.is_contiguous()
    return (theta.dim() == 1 or per_entry) and _kernels.takes(theta, *tensors)


def _nb_log_prob_sum(x, mu, theta, eps, nz, pi=None, library=None, row_grad=None):
    """NB (``pi`` None) or ZINB row sums; with ``library``, ``mu`` holds the scale logits.

    ``row_grad``: the row gradient the caller expects (see :class:`_FusedLogProbSum`).
    """
    row, col, lin, x_nz, shape = _nonzeros(x, nz)
    theta = _param_view(theta.clamp_min(eps), shape)
    mu = mu.expand(shape).contiguous()
    pi = None if pi is None else pi.expand(shape).contiguous()
    params = (mu, theta) if pi is None else (mu, theta, pi)
    if library is not None:  # only where _softmax_fusable said yes
        library = library.to(torch.float32)
        grad = _wants_grad(*params, library)
        return _FusedLogProbSum.apply(mu, library, theta, pi, x_nz, row, col, eps, grad, row_grad)
    grad = _wants_grad(*params)
    if _fused_nb(theta, shape, mu, pi):
        return _FusedLogProbSum.apply(mu, None, theta, pi, x_nz, row, col, eps, grad)
    lin = _flat(row, col, lin, shape)
    if pi is None:
        return _NBLogProbSum.apply(mu, theta, x_nz.to(mu.dtype), row, col, lin, eps, grad)
    return _ZINBLogProbSum.apply(mu, theta, pi, x_nz.to(mu.dtype), row, col, lin, eps, grad)


def _softmax_fusable(logits, library, theta, pi, x) -> bool:
    """Whether the kernels can take ``mu = library * softmax(logits)`` in the likelihood call."""
    n_cells = logits.shape[0]
    return (
        logits.dim() == 2
        and tuple(x.shape) == tuple(logits.shape)
        and library.numel() == n_cells
        and library.shape[0] == n_cells
        and library.device.type == "cpu"
        and (_per_gene(theta, logits.shape[1]) or tuple(theta.shape) == tuple(logits.shape))
        and (pi is None or pi.shape[-1] == logits.shape[1])
        and _kernels.takes(theta, logits, pi)
    )


def _poisson_log_prob_sum(x, rate, eps, nz):
    row, col, lin, x_nz, shape = _nonzeros(x, nz)
    rate_nz = _at(_param_view(rate, shape), col, _flat(row, col, lin, shape))
    rest = _poisson_rest(x_nz, rate_nz, eps)  # ~x at large counts: the rates' sum takes it out
    dense = -_wide(rate.expand(shape)).sum(-1)
    out = dense.index_add(0, row, rest.to(dense.dtype))
    return out.to(torch.promote_types(x_nz.dtype, rate.dtype))


class _FusedMixtureLogProb(torch.autograd.Function):
    """:func:`log_mixture_nb` with a shared ``theta`` (per protein, or per entry) by the kernel.

    One call evaluates every entry and, when autograd will need them, its derivatives (about 60
    torch operators forward and backward on small cells × proteins tensors otherwise).
    """

    @staticmethod
    def forward(ctx, mu1, mu2, theta, pi, x, eps, with_grad):
        out, g1, g2, gpi, gth = _kernels.nb_mixture_log_prob(mu1, mu2, theta, pi, x, eps, with_grad)
        ctx.theta_per_feature = theta.dim() == 1
        if with_grad:
            ctx.save_for_backward(g1, g2, gpi, gth)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        g1, g2, gpi, gth = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grad_theta = None
        if needs[2]:  # summed over the cells for a theta per protein
            grad_theta = (gth * grad).sum(0) if ctx.theta_per_feature else gth * grad
        return (
            g1 * grad if needs[0] else None,
            g2 * grad if needs[1] else None,
            grad_theta,
            gpi * grad if needs[3] else None,
            None,
            None,
            None,
        )


def _mixture_log_prob(x, mu1, mu2, theta1, theta2, pi, eps) -> torch.Tensor:
    """:func:`log_mixture_nb`, by the compiled kernel for 2-D float32 CPU data and a shared θ.

    θ per protein ``(P,)``, or per entry ``(B, P)`` (per batch and protein).
    """
    shape = _broadcast_shapes(x.shape, mu1.shape, mu2.shape, pi.shape)
    if (
        theta2 is None
        and len(shape) == 2
        and tuple(theta1.shape) in ((shape[1],), tuple(shape))
        and _kernels.takes(theta1, mu1, mu2, pi, x)
    ):
        args = [t.expand(shape).contiguous() for t in (mu1, mu2, pi, x)]
        theta = theta1.clamp_min(eps).contiguous()
        grad = _wants_grad(mu1, mu2, theta, pi)
        return _FusedMixtureLogProb.apply(args[0], args[1], theta, args[2], args[3], eps, grad)
    return log_mixture_nb(x, mu1, mu2, theta1, theta2, pi, eps)


# --------------------------------------------------------------------------------------------------
# distributions
# --------------------------------------------------------------------------------------------------
def _broadcast_shapes(*shapes: torch.Size) -> torch.Size:
    """``torch.broadcast_shapes`` without its import of torch.fx and sympy (about 100 MB)."""
    return torch.Size(np.broadcast_shapes(*(tuple(s) for s in shapes)))


def _nb_sample(
    mu: torch.Tensor, theta: torch.Tensor, shape: torch.Size, eps: float
) -> torch.Tensor:
    """Gamma-Poisson draw: λ ~ Gamma(θ, scale=μ/θ), x ~ Poisson(λ)."""
    theta = theta.clamp_min(eps).expand(shape)
    gamma = torch._standard_gamma(theta.contiguous())
    rate = gamma * (mu.expand(shape) / theta)
    return torch.poisson(rate)


def _mean_from(mu, theta, scale_logits, library) -> torch.Tensor | None:
    """Check that ``mu`` or ``scale_logits`` and ``library`` are given; return ``mu`` (or None)."""
    if theta is None:
        raise ValueError("theta (the inverse dispersion) is required.")
    if (mu is None) == (scale_logits is None) or (scale_logits is None) != (library is None):
        raise ValueError("Give either mu, or scale_logits together with library.")
    return mu


def _mu_of(dist) -> torch.Tensor:
    """``dist.mu``, computed once from its scale logits and library when it was built so."""
    if dist._mu is None:
        dist._mu = dist.library * torch.softmax(dist.scale_logits, dim=-1)
    return dist._mu


def _log_prob_sum(dist, x, nz, pi=None, row_grad=None) -> torch.Tensor:
    """The NB / ZINB ``log_prob_sum``: softmax and likelihood in one kernel call when possible."""
    logits, library = dist.scale_logits, dist.library
    if dist._mu is None and _softmax_fusable(logits, library, dist.theta, pi, x):
        return _nb_log_prob_sum(x, logits, dist.theta, dist.eps, nz, pi, library, row_grad)
    return _nb_log_prob_sum(x, dist.mu, dist.theta, dist.eps, nz, pi)


class NegativeBinomial(Distribution):
    """Negative binomial parametrised by its mean and inverse dispersion.

    ``Var = μ + μ² / θ``. ``θ → ∞`` recovers the Poisson distribution.

    Parameters
    ----------
    mu
        Mean, ``>= 0``. Or None, with ``scale_logits`` and ``library``.
    theta
        Inverse dispersion, ``> 0`` (broadcastable with ``mu``, e.g. per gene ``(G,)``).
    eps
        Floor applied to ``theta`` and to ``mu`` inside ``log mu``.
    validate_args
        Passed to :class:`torch.distributions.Distribution`.
    scale_logits, library
        The mean as ``mu = library * softmax(scale_logits, -1)``: a decoder's gene logits
        ``(cells, genes)`` and the library size ``(cells, 1)`` (count scale). ``mu`` is computed
        when first used; :meth:`log_prob_sum` evaluates the softmax inside the compiled
        likelihood kernel where it can (float32 on the CPU, ``theta`` per gene or of the logits'
        shape), without it.

    Examples
    --------
    >>> import torch
    >>> from cellvae.distributions import NegativeBinomial
    >>> nb = NegativeBinomial(mu=torch.full((2, 3), 5.0), theta=torch.ones(3))
    >>> x = torch.tensor([[0.0, 1.0, 0.0], [3.0, 0.0, 0.0]])
    >>> nb.log_prob(x).shape
    torch.Size([2, 3])
    >>> torch.allclose(nb.log_prob_sum(x), nb.log_prob(x).sum(-1))
    True
    """

    arg_constraints = {"mu": constraints.nonnegative, "theta": constraints.positive}
    support = constraints.nonnegative_integer

    def __init__(
        self,
        mu: torch.Tensor | None = None,
        theta: torch.Tensor | None = None,
        eps: float = 1e-8,
        validate_args: bool = False,
        *,
        scale_logits: torch.Tensor | None = None,
        library: torch.Tensor | None = None,
    ):
        self._mu = _mean_from(mu, theta, scale_logits, library)
        self.scale_logits, self.library = scale_logits, library
        self.theta = theta
        self.eps = eps
        shape = (mu if mu is not None else scale_logits).shape
        super().__init__(_broadcast_shapes(shape, theta.shape), validate_args=validate_args)

    @property
    def mu(self) -> torch.Tensor:
        """Mean ``μ`` as given, or ``library * softmax(scale_logits)``."""
        return _mu_of(self)

    @property
    def mean(self) -> torch.Tensor:
        """Mean ``μ`` (broadcast to the batch shape)."""
        return self.mu.expand(self.batch_shape)

    @property
    def variance(self) -> torch.Tensor:
        """Variance ``μ + μ² / θ``."""
        return (self.mu + self.mu**2 / self.theta).expand(self.batch_shape)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """Elementwise log-likelihood, see :func:`log_nb_positive`."""
        if self._validate_args:
            self._validate_sample(value)
        return log_nb_positive(value, self.mu, self.theta, self.eps)

    def log_prob_sum(
        self, x: torch.Tensor, nz: _Nonzero | None = None, *, row_grad: float | None = None
    ) -> torch.Tensor:
        """Log-likelihood summed over the last dimension, fast for sparse ``x``.

        The ``lgamma`` terms and ``x log(μ/(θ+μ))`` vanish at ``x = 0``; they are evaluated only at
        the nonzero entries and added to the row sums of the dense part ``−Σ θ log(1 + μ/θ)``.

        Parameters
        ----------
        x
            Counts, shape ``(cells, genes)``: a dense tensor or a
            :class:`~cellvae._sparse.CSRBatch`.
        nz
            ``(row, col)`` int64 tensors with the positions of all nonzero entries of ``x`` (e.g.
            from the CSR batch). Extra positions holding zeros are harmless. Computed with
            :func:`torch.nonzero` when None.
        row_grad
            The gradient the caller's loss will send to every row sum, when known: ``-1 / cells``
            for a loss that is the mean of ``-log_prob_sum`` (a training step's). Where the
            compiled kernel evaluates the softmax of ``scale_logits`` with the likelihood, it
            then computes the gradients for that row gradient, and the backward pass has nothing
            left to do; a different gradient still gets exact results, computed again. Elsewhere
            it is ignored.

        Returns
        -------
        torch.Tensor
            Shape ``(cells,)``, equal to ``log_prob(x).sum(-1)``.
        """
        return _log_prob_sum(self, x, nz, row_grad=row_grad)

    def sample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:  # noqa: B008
        """Draw counts by the Gamma-Poisson construction; shape ``sample_shape + batch_shape``."""
        with torch.no_grad():
            return _nb_sample(self.mu, self.theta, self._extended_shape(sample_shape), self.eps)


class ZeroInflatedNegativeBinomial(Distribution):
    """Zero-inflated negative binomial: a dropout zero with probability ``σ(π)``, else NB(μ, θ).

    Parameters
    ----------
    mu
        NB mean, ``>= 0``. Or None, with ``scale_logits`` and ``library``.
    theta
        NB inverse dispersion, ``> 0``.
    zi_logits
        Logit ``π`` of the dropout probability.
    eps
        Floor applied to ``theta`` and to ``mu`` inside ``log mu``.
    validate_args
        Passed to :class:`torch.distributions.Distribution`.
    scale_logits, library
        The NB mean as ``mu = library * softmax(scale_logits, -1)``, as in
        :class:`NegativeBinomial`.

    Examples
    --------
    >>> import torch
    >>> from cellvae.distributions import ZeroInflatedNegativeBinomial
    >>> zinb = ZeroInflatedNegativeBinomial(
    ...     mu=torch.full((2, 3), 5.0), theta=torch.ones(3), zi_logits=torch.zeros(2, 3)
    ... )
    >>> x = torch.tensor([[0.0, 1.0, 0.0], [3.0, 0.0, 0.0]])
    >>> torch.allclose(zinb.log_prob_sum(x), zinb.log_prob(x).sum(-1))
    True
    >>> zinb.mean[0, 0].item()
    2.5
    """

    arg_constraints = {
        "mu": constraints.nonnegative,
        "theta": constraints.positive,
        "zi_logits": constraints.real,
    }
    support = constraints.nonnegative_integer

    def __init__(
        self,
        mu: torch.Tensor | None = None,
        theta: torch.Tensor | None = None,
        zi_logits: torch.Tensor | None = None,
        eps: float = 1e-8,
        validate_args: bool = False,
        *,
        scale_logits: torch.Tensor | None = None,
        library: torch.Tensor | None = None,
    ):
        self._mu = _mean_from(mu, theta, scale_logits, library)
        if zi_logits is None:
            raise ValueError("zi_logits (the dropout logits) is required.")
        self.scale_logits, self.library = scale_logits, library
        self.theta = theta
        self.zi_logits = zi_logits
        self.eps = eps
        shape = (mu if mu is not None else scale_logits).shape
        batch_shape = _broadcast_shapes(shape, theta.shape, zi_logits.shape)
        super().__init__(batch_shape, validate_args=validate_args)

    @property
    def mu(self) -> torch.Tensor:
        """NB mean ``μ`` as given, or ``library * softmax(scale_logits)``."""
        return _mu_of(self)

    @property
    def zi_probs(self) -> torch.Tensor:
        """Dropout probability ``σ(π)``."""
        return torch.sigmoid(self.zi_logits)

    @property
    def mean(self) -> torch.Tensor:
        """Mean ``(1 − σ(π)) μ``."""
        return ((1 - self.zi_probs) * self.mu).expand(self.batch_shape)

    @property
    def variance(self) -> torch.Tensor:
        """Variance ``(1 − p)(μ + μ²/θ) + p (1 − p) μ²`` with ``p = σ(π)``."""
        p = self.zi_probs
        var_nb = self.mu + self.mu**2 / self.theta
        return ((1 - p) * var_nb + p * (1 - p) * self.mu**2).expand(self.batch_shape)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """Elementwise log-likelihood, see :func:`log_zinb_positive`."""
        if self._validate_args:
            self._validate_sample(value)
        return log_zinb_positive(value, self.mu, self.theta, self.zi_logits, self.eps)

    def log_prob_sum(
        self, x: torch.Tensor, nz: _Nonzero | None = None, *, row_grad: float | None = None
    ) -> torch.Tensor:
        """Log-likelihood summed over the last dimension, fast for sparse ``x``.

        The zero branch is evaluated densely; at the nonzero entries it is replaced by the positive
        branch (``lgamma`` terms included), evaluated on the gathered nonzeros only.

        Parameters
        ----------
        x
            Counts, shape ``(cells, genes)``: a dense tensor or a
            :class:`~cellvae._sparse.CSRBatch`.
        nz
            ``(row, col)`` int64 tensors with the positions of all nonzero entries of ``x``. Extra
            positions holding zeros are harmless. Computed with :func:`torch.nonzero` when None.
        row_grad
            The gradient the caller's loss will send to every row sum, when known: see
            :meth:`NegativeBinomial.log_prob_sum`.

        Returns
        -------
        torch.Tensor
            Shape ``(cells,)``, equal to ``log_prob(x).sum(-1)``.
        """
        return _log_prob_sum(self, x, nz, self.zi_logits, row_grad)

    def sample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:  # noqa: B008
        """Draw an NB count, set to zero with probability ``σ(π)``."""
        shape = self._extended_shape(sample_shape)
        with torch.no_grad():
            counts = _nb_sample(self.mu, self.theta, shape, self.eps)
            dropout = torch.bernoulli(self.zi_probs.expand(shape)).bool()
            return counts.masked_fill(dropout, 0.0)


class Poisson(Distribution):
    """Poisson distribution with a log-likelihood that stays finite as ``rate → 0``.

    Parameters
    ----------
    rate
        Rate (mean), ``>= 0``.
    eps
        Floor applied to ``rate`` inside ``log rate``.
    validate_args
        Passed to :class:`torch.distributions.Distribution`.

    Examples
    --------
    >>> import torch
    >>> from cellvae.distributions import Poisson
    >>> pois = Poisson(torch.tensor([[0.0, 2.0]]))
    >>> bool(torch.isfinite(pois.log_prob(torch.tensor([[1.0, 2.0]]))).all())
    True
    >>> pois.log_prob_sum(torch.tensor([[0.0, 2.0]])).shape
    torch.Size([1])
    """

    arg_constraints = {"rate": constraints.nonnegative}
    support = constraints.nonnegative_integer

    def __init__(self, rate: torch.Tensor, eps: float = 1e-8, validate_args: bool = False):
        self.rate = rate
        self.eps = eps
        super().__init__(rate.shape, validate_args=validate_args)

    @property
    def mean(self) -> torch.Tensor:
        """Mean, the rate."""
        return self.rate

    @property
    def variance(self) -> torch.Tensor:
        """Variance, the rate."""
        return self.rate

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """Elementwise ``x log(rate) − rate − lgamma(x + 1)``."""
        if self._validate_args:
            self._validate_sample(value)
        rest = _poisson_rest(value, self.rate, self.eps)
        return (rest - _wide(self.rate)).to(torch.promote_types(value.dtype, self.rate.dtype))

    def log_prob_sum(
        self, x: torch.Tensor, nz: _Nonzero | None = None, *, row_grad: float | None = None
    ) -> torch.Tensor:
        """Log-likelihood summed over the last dimension; ``log`` and ``lgamma`` only at nonzeros.

        Parameters
        ----------
        x
            Counts, shape ``(cells, genes)``: a dense tensor or a
            :class:`~cellvae._sparse.CSRBatch`.
        nz
            ``(row, col)`` positions of all nonzero entries of ``x``, or None to compute them.
        row_grad
            Ignored; accepted for a uniform interface with the NB and ZINB.

        Returns
        -------
        torch.Tensor
            Shape ``(cells,)``, equal to ``log_prob(x).sum(-1)``.
        """
        return _poisson_log_prob_sum(x, self.rate, self.eps, nz)

    def sample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:  # noqa: B008
        """Draw counts; shape ``sample_shape + batch_shape``."""
        with torch.no_grad():
            return torch.poisson(self.rate.expand(self._extended_shape(sample_shape)))


class Normal(torch.distributions.Normal):
    """Normal distribution with the :meth:`log_prob_sum` interface of the count distributions.

    Parameters
    ----------
    loc
        Mean.
    scale
        Standard deviation, ``> 0``.
    validate_args
        Passed to :class:`torch.distributions.Distribution`.

    Examples
    --------
    >>> import torch
    >>> from cellvae.distributions import Normal
    >>> d = Normal(torch.zeros(2, 3), torch.ones(3))
    >>> d.log_prob_sum(torch.zeros(2, 3)).shape
    torch.Size([2])
    """

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor, validate_args: bool = False):
        super().__init__(loc, scale, validate_args=validate_args)

    def log_prob_sum(
        self, x: torch.Tensor, nz: _Nonzero | None = None, *, row_grad: float | None = None
    ) -> torch.Tensor:
        """Log-likelihood summed over the last dimension (``nz`` is accepted and ignored).

        Parameters
        ----------
        x
            Values, shape ``(cells, features)``.
        nz
            Ignored; accepted for a uniform interface with the count distributions.
        row_grad
            Ignored; accepted for a uniform interface with the NB and ZINB.

        Returns
        -------
        torch.Tensor
            Shape ``x.shape[:-1]``.
        """
        return self.log_prob(as_dense(x)).sum(-1)


class NegativeBinomialMixture(Distribution):
    """Two-component NB mixture for totalVI protein counts (background and foreground).

    Parameters
    ----------
    mu1
        Mean of component 1 (background).
    mu2
        Mean of component 2 (foreground).
    theta1
        Inverse dispersion of component 1, shared by both components when ``theta2`` is None.
    mixture_logits
        Logit ``π`` of the probability of component 1 (background).
    theta2
        Inverse dispersion of component 2, or None.
    eps
        Floor applied to the ``theta`` and to the ``mu`` inside their logarithms.
    validate_args
        Passed to :class:`torch.distributions.Distribution`.

    Examples
    --------
    >>> import torch
    >>> from cellvae.distributions import NegativeBinomialMixture
    >>> d = NegativeBinomialMixture(
    ...     mu1=torch.tensor([2.0]),
    ...     mu2=torch.tensor([50.0]),
    ...     theta1=torch.tensor([10.0]),
    ...     mixture_logits=torch.tensor([0.0]),
    ... )
    >>> d.mean.item()
    26.0
    >>> d.log_prob(torch.tensor([3.0])).shape
    torch.Size([1])
    """

    arg_constraints = {
        "mu1": constraints.nonnegative,
        "mu2": constraints.nonnegative,
        "theta1": constraints.positive,
        "mixture_logits": constraints.real,
    }
    support = constraints.nonnegative_integer

    def __init__(
        self,
        mu1: torch.Tensor,
        mu2: torch.Tensor,
        theta1: torch.Tensor,
        mixture_logits: torch.Tensor,
        theta2: torch.Tensor | None = None,
        eps: float = 1e-8,
        validate_args: bool = False,
    ):
        self.mu1 = mu1
        self.mu2 = mu2
        self.theta1 = theta1
        self.theta2 = theta2
        self.mixture_logits = mixture_logits
        self.eps = eps
        shapes = [mu1.shape, mu2.shape, theta1.shape, mixture_logits.shape]
        if theta2 is not None:
            shapes.append(theta2.shape)
        super().__init__(_broadcast_shapes(*shapes), validate_args=validate_args)

    @property
    def mixture_probs(self) -> torch.Tensor:
        """Probability ``σ(π)`` of component 1 (background)."""
        return torch.sigmoid(self.mixture_logits)

    @property
    def mean(self) -> torch.Tensor:
        """Mean ``σ(π) μ1 + (1 − σ(π)) μ2``."""
        p = self.mixture_probs
        return (p * self.mu1 + (1 - p) * self.mu2).expand(self.batch_shape)

    @property
    def variance(self) -> torch.Tensor:
        """Variance of the mixture, ``Σ_k w_k (Var_k + μ_k²) − mean²``."""
        p = self.mixture_probs
        theta2 = self.theta1 if self.theta2 is None else self.theta2
        second1 = self.mu1 + self.mu1**2 / self.theta1 + self.mu1**2
        second2 = self.mu2 + self.mu2**2 / theta2 + self.mu2**2
        mean = p * self.mu1 + (1 - p) * self.mu2
        return (p * second1 + (1 - p) * second2 - mean**2).expand(self.batch_shape)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """Elementwise log-likelihood, see :func:`log_mixture_nb`.

        Evaluated by the compiled kernel for 2-D float32 CPU tensors and a shared ``theta1``.
        """
        if self._validate_args:
            self._validate_sample(value)
        return _mixture_log_prob(
            value, self.mu1, self.mu2, self.theta1, self.theta2, self.mixture_logits, self.eps
        )

    def log_prob_sum(
        self, x: torch.Tensor, nz: _Nonzero | None = None, *, row_grad: float | None = None
    ) -> torch.Tensor:
        """Log-likelihood summed over the last dimension (dense; ``nz`` is accepted and ignored).

        Parameters
        ----------
        x
            Counts, shape ``(cells, proteins)``.
        nz
            Ignored; protein counts are dense.
        row_grad
            Ignored; accepted for a uniform interface with the NB and ZINB.

        Returns
        -------
        torch.Tensor
            Shape ``x.shape[:-1]``.
        """
        return self.log_prob(x).sum(-1)

    def sample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:  # noqa: B008
        """Draw the component (1 with probability ``σ(π)``), then an NB count from it."""
        shape = self._extended_shape(sample_shape)
        with torch.no_grad():
            background = torch.bernoulli(self.mixture_probs.expand(shape)).bool()
            mu = torch.where(background, self.mu1.expand(shape), self.mu2.expand(shape))
            theta2 = self.theta1 if self.theta2 is None else self.theta2
            theta = torch.where(background, self.theta1.expand(shape), theta2.expand(shape))
            return _nb_sample(mu, theta, shape, self.eps)
