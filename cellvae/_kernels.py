"""Fused CPU kernels for the NB / ZINB log-likelihood row sums, when they were built.

(Also :func:`csr_dense` and :func:`csr_t_dense`, the product ``b + X W`` of the sparse first
layer and its weight gradient ``Xᵀ dY``, which :mod:`cellvae._sparse` uses in place of
``embedding_bag`` and of sorting the entries by gene, :func:`csr_row_sums`, and
:func:`nb_mixture_log_prob`, totalVI's protein likelihood with its gradients in one call, and
:func:`protein_terms`, that likelihood with the protein background's KL, summed per cell.)

``_kernels.c`` is compiled at install time into ``cellvae/_ckernels*.so`` (``setup.py``; an
optional extension: where no C compiler or no glibc vector maths is found, the install goes on
without it) and loaded here with :mod:`ctypes`. It evaluates the whole likelihood and its
gradients in two passes (dense zero branch in float32 vector maths, then the nonzeros in
float64), where the torch code in :mod:`cellvae.distributions` runs ~25 separate operators over
the cells × genes entries. The passes run on torch's OpenMP threads (``torch.get_num_threads()``;
one below ``_MIN_PARALLEL`` entries): the extension links ``libgomp.so.1``, which resolves to the
runtime torch has already loaded, so the kernel shares torch's thread pool instead of competing
with it (two Python threads calling the kernel gained nothing: torch's workers kept the second
core). Each output is computed by one thread in a fixed order, so results do not depend on the
number of threads.

Used by :mod:`cellvae.distributions` for float32 CPU tensors (the NB / ZINB with a dispersion
per gene, per batch and gene, or per cell; the protein mixture with one per protein, or per
batch and protein); every other case (GPU, float64) runs the torch code, also the reference
the tests hold these kernels to. ``CELLVAE_NO_KERNELS=1`` in the environment, or
``_kernels.enabled = False``, turns them off.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
from collections.abc import Sequence

import torch

__all__ = [
    "AdamState",
    "available",
    "bf16_join_narrow",
    "bf16_split_widen",
    "bn_relu_drop_backward",
    "bn_relu_drop_forward",
    "csr_dense",
    "csr_row_sums",
    "csr_t_dense",
    "gather_csr",
    "nb_mixture_log_prob",
    "nb_zinb_log_prob_sum",
    "normal_sample_backward",
    "normal_sample_forward",
    "protein_terms",
    "protein_terms_backward",
    "random_lanes",
    "softmax_nb_zinb_log_prob_sum",
    "takes",
]


def _load() -> ctypes.CDLL | None:
    if os.environ.get("CELLVAE_NO_KERNELS", "") not in ("", "0"):
        return None
    spec = importlib.util.find_spec("cellvae._ckernels")
    if spec is None or not spec.origin or not os.path.isfile(spec.origin):
        return None
    try:
        lib = ctypes.CDLL(spec.origin)
    except OSError:
        return None
    i64, ptr, f64 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_double
    lib.cv_nb_zinb.restype = ctypes.c_int
    lib.cv_nb_zinb.argtypes = [i64, i64, ptr, ptr, ptr, i64, ptr, ptr, ptr, ptr, ptr, f64]
    lib.cv_nb_zinb.argtypes += [ptr, ptr, ptr, ptr, ptr, ptr, ptr, ctypes.c_float, ptr]
    lib.cv_nb_zinb.argtypes += [ctypes.c_int, i64]
    lib.cv_lgamma_digamma.restype = None
    lib.cv_lgamma_digamma.argtypes = [i64, ptr, ptr, ptr]
    lib.cv_csr_t_dense.restype = ctypes.c_int
    lib.cv_csr_t_dense.argtypes = [i64, i64, i64, i64, ptr, ptr, ptr, ptr, ptr, ctypes.c_int]
    lib.cv_csr_dense.restype = ctypes.c_int
    lib.cv_csr_dense.argtypes = [i64, i64, i64, i64, ptr, ptr, ptr, ptr, ptr, ptr, ctypes.c_int]
    lib.cv_csr_row_sums.restype = ctypes.c_int
    lib.cv_csr_row_sums.argtypes = [i64, i64, ptr, ptr, ptr]
    lib.cv_csr_offsets.restype = i64
    lib.cv_csr_offsets.argtypes = [i64, ptr, ptr, ctypes.c_int, i64, ptr]
    lib.cv_gather_csr.restype = None
    lib.cv_gather_csr.argtypes = [i64, ptr, ptr, ctypes.c_int, ptr, ctypes.c_int, ptr, ptr]
    lib.cv_gather_csr.argtypes += [ptr, ptr, ptr, ctypes.c_int]
    c_int, f32, u64 = ctypes.c_int, ctypes.c_float, ctypes.c_uint64
    lib.cv_bn_relu_drop_fwd.restype = c_int
    lib.cv_bn_relu_drop_fwd.argtypes = [i64, i64, ptr, c_int, ptr, ptr, ptr]
    lib.cv_bn_relu_drop_fwd.argtypes += [ptr, ptr, ptr, ptr, f64, f64, ptr, c_int, u64, c_int]
    lib.cv_bn_relu_drop_fwd.argtypes += [f32, ptr, ptr, ptr, c_int]
    lib.cv_bn_relu_drop_bwd.restype = None
    lib.cv_bn_relu_drop_bwd.argtypes = [i64, i64, ptr, c_int, ptr, ptr, ptr]
    lib.cv_bn_relu_drop_bwd.argtypes += [ptr, ptr, ptr, ptr, f32, ptr, ptr, ptr, ptr, c_int]
    lib.cv_nb_mixture.restype = None
    lib.cv_nb_mixture.argtypes = [i64, i64, ptr, ptr, ptr, ptr, ptr, ptr, ptr, f64, ptr, ptr]
    lib.cv_nb_mixture.argtypes += [ptr, ptr, ptr, ctypes.c_int, i64]
    lib.cv_protein_terms.restype = c_int
    lib.cv_protein_terms.argtypes = [i64, i64, *[ptr] * 7, ptr, i64, ptr, ptr, ptr, ptr, ptr, f64]
    lib.cv_protein_terms.argtypes += [*[ptr] * 10, c_int, i64]
    lib.cv_protein_terms_backward.restype = None
    lib.cv_protein_terms_backward.argtypes = [i64, i64, ptr, ptr, ptr, i64, *[ptr] * 15, c_int]
    lib.cv_protein_terms_backward.argtypes += [i64]
    lib.cv_bf16_split_widen.restype = None
    lib.cv_bf16_split_widen.argtypes = [i64, i64, ptr, c_int, ptr, ptr, ptr, c_int]
    lib.cv_bf16_join_narrow.restype = None
    lib.cv_bf16_join_narrow.argtypes = [i64, i64, c_int, ptr, ptr, ptr, ptr, c_int]
    lib.cv_adam.restype = c_int
    # n, sizes, params, grads, exp_avg, exp_avg_sq, steps, copies; lr, b1, b2, wd, eps; threads
    adam_args = [c_int, ptr, ptr, ptr, ptr, ptr, ptr, ptr, f64, f64, f64, f64, f64, c_int]
    lib.cv_adam.argtypes = adam_args
    for name in ("cv_normal_sample_fwd", "cv_normal_sample_bwd"):
        getattr(lib, name).restype = None
    lib.cv_normal_sample_fwd.argtypes = [i64, i64, ptr, ptr, f32, ptr, ptr, ptr, ptr]
    lib.cv_normal_sample_bwd.argtypes = [i64, i64, ptr, ptr, f32, ptr, ptr, ptr, ptr, ptr]
    lib.cv_random_lanes.restype = None
    lib.cv_random_lanes.argtypes = [i64, ctypes.c_uint64, ptr]
    return lib


_lib = _load()
# entries below which the kernel runs on one thread: a hot pool of two was no slower from 2,048
# entries, but saved under 10 µs below 8,192 (128 cells: 38 -> 29 µs at 8,192, 110 -> 82 at 32,768)
_MIN_PARALLEL = 8192
enabled = True


def available() -> bool:
    """Whether the compiled kernels are loaded and enabled."""
    return enabled and _lib is not None


def _threads(n: int) -> int:
    """OpenMP threads for a kernel call over ``n`` values.

    Torch's threads, or one below ``_MIN_PARALLEL`` (read at each call, so tests can lower it).
    """
    return torch.get_num_threads() if n >= _MIN_PARALLEL else 1


def takes(*tensors: torch.Tensor | None) -> bool:
    """Whether the kernels are available and take these tensors: float32 on the CPU.

    None entries are skipped. Index tensors travel with their values (a minibatch moves as a
    whole), so callers pass the floating ones.
    """
    return available() and all(
        t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors if t is not None
    )


def lgamma_digamma(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``lgamma(z)`` and ``digamma(z)`` of positive float32 values, computed in float64."""
    z = z.detach().contiguous()
    lg = torch.empty(z.shape, dtype=torch.float64)
    dg = torch.empty(z.shape, dtype=torch.float64)
    _lib.cv_lgamma_digamma(z.numel(), z.data_ptr(), lg.data_ptr(), dg.data_ptr())
    return lg, dg


def nb_zinb_log_prob_sum(
    mu: torch.Tensor,
    theta: torch.Tensor,
    pi: torch.Tensor | None,
    x_nz: torch.Tensor,
    row: torch.Tensor,
    col: torch.Tensor,
    eps: float,
    with_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Row sums of the NB (``pi`` None) or ZINB log-likelihood, and their unit-row gradients.

    ``mu`` and ``pi`` are contiguous float32 ``(B, G)``, ``theta`` float32 floored at ``eps``:
    ``(G,)`` per gene, or contiguous ``(B, G)`` per entry; ``(row, col, x_nz)`` are the stored
    entries (contiguous int64, int64, float32), in any order. Returns the ``(B,)`` row sums
    and, with ``with_grad``, the ``(B, G)`` derivatives of each row sum with respect to ``mu``,
    ``pi`` (None for the NB) and the per-entry ``theta`` (otherwise three Nones).
    """
    out, gmu, gpi, gth, _ = _nb_zinb(mu, None, theta, pi, x_nz, row, col, eps, with_grad)
    return out, gmu, gpi, gth


def softmax_nb_zinb_log_prob_sum(
    logits: torch.Tensor,
    library: torch.Tensor,
    theta: torch.Tensor,
    pi: torch.Tensor | None,
    x_nz: torch.Tensor,
    row: torch.Tensor,
    col: torch.Tensor,
    eps: float,
    with_grad: bool,
    row_grad: float | None = None,
) -> tuple[torch.Tensor, ...]:
    """:func:`nb_zinb_log_prob_sum` at ``mu = library * softmax(logits, -1)``, in one call.

    ``logits`` is contiguous float32 ``(B, G)`` and ``library`` float32 ``(B,)``; ``theta`` as
    in :func:`nb_zinb_log_prob_sum`. Returns the row sums, then (with ``with_grad``, else
    Nones) the unit-row derivatives by ``logits``, ``pi`` and the per-entry ``theta``, and the
    ``(B,)`` ones by ``library``.

    With ``row_grad`` (and ``with_grad``), the derivatives are those of ``row_grad`` times the
    sum of the row sums: the gradients a loss ``row_grad * out.sum()`` sends to the inputs, with
    no pass over the entries left to do. A per-gene ``theta``'s come summed over the rows,
    ``(G,)``, with no ``(B, G)`` array of them written; a per-entry one's are ``(B, G)``.
    """
    library = library.contiguous()
    args = (logits, library, theta, pi, x_nz, row, col, eps, with_grad)
    if row_grad is None or not with_grad:
        return _nb_zinb(*args)
    try:
        return _nb_zinb(*args, row_grad=row_grad)
    except _Underflow:  # some ZINB p(0) below 1e-30: the unit gradients, scaled here
        out, gmu, gpi, gth, glib = _nb_zinb(*args)
        gpi = None if gpi is None else gpi.mul_(row_grad)
        gth = gth.sum(0) if theta.dim() == 1 else gth
        return out, gmu.mul_(row_grad), gpi, gth.mul_(row_grad), glib.mul_(row_grad)


class _Underflow(Exception):
    """cv_nb_zinb could not scale the gradients by row_grad: a ZINB p(0) underflowed."""


def _nb_zinb(mu_or_logits, library, theta, pi, x_nz, row, col, eps, with_grad, row_grad=None):
    """Call ``cv_nb_zinb``: ``library`` None means the first argument is ``mu``.

    With ``row_grad`` (``library`` given, ``with_grad``), the gradients are those of a row
    gradient ``row_grad`` and a per-gene ``theta``'s come summed over the rows (raises
    :class:`_Underflow` where the kernel cannot do that).
    """
    n_rows, n_genes = mu_or_logits.shape
    threads = _threads(mu_or_logits.numel())
    lgth, dgth, th_ld = _theta_terms(theta, mu_or_logits.shape)  # per entry: at the nonzeros
    out = torch.empty(n_rows, dtype=torch.float32)
    mu, logits = mu_or_logits, None
    glib = None
    if library is not None:
        mu, logits = torch.empty_like(mu_or_logits), mu_or_logits
        glib = torch.empty(n_rows, dtype=torch.float32) if with_grad else None
    gmu = gpi = gth = th_sum = None
    if with_grad:
        gmu = torch.empty_like(mu)
        if row_grad is None or th_ld:
            gth = torch.empty_like(mu)
        else:
            th_sum = torch.empty(n_genes, dtype=torch.float32)
        gpi = None if pi is None else torch.empty_like(mu)
    tensors = (mu, theta, pi, row, col, x_nz, lgth, dgth, out, gmu, gpi, gth, logits, library)
    tensors += (glib, th_sum)
    m, th, p, rw, cl, xv, lg, dg, o, gm, gp, gt, lo, lb, glb, ts = map(_ptr, tensors)
    scale = 1.0 if row_grad is None else row_grad
    status = _lib.cv_nb_zinb(
        n_rows, n_genes, m, th, p, row.numel(), rw, cl, xv, lg, dg, eps, o, gm, gp, gt, lo, lb,
        glb, scale, ts, threads, th_ld,
    )  # fmt: skip
    if status == 1:
        raise _Underflow
    if status == -3:
        raise ValueError("row_grad needs the softmax form (a library) and gradients.")
    if status == -2:
        raise IndexError(f"a stored entry lies outside the {n_rows} x {n_genes} minibatch.")
    if status != 0:
        raise MemoryError("cellvae's likelihood kernel could not allocate its buffers.")
    return out, gmu, gpi, gth if th_sum is None else th_sum, glib


def nb_mixture_log_prob(
    mu1: torch.Tensor,
    mu2: torch.Tensor,
    theta: torch.Tensor,
    pi: torch.Tensor,
    x: torch.Tensor,
    eps: float,
    with_grad: bool,
) -> tuple[torch.Tensor, ...]:
    """Elementwise log-likelihood of the totalVI protein mixture (shared ``theta``).

    ``mu1``, ``mu2``, ``pi`` and ``x`` are contiguous float32 ``(B, P)``, ``theta`` float32
    floored at ``eps``: ``(P,)``, or contiguous ``(B, P)`` (per batch and protein). Returns
    ``log p`` ``(B, P)`` and, with ``with_grad``, its derivatives by ``mu1``, ``mu2``, ``pi`` and
    the per-entry ``theta`` (otherwise four Nones).
    """
    n_rows, n_cols = x.shape
    threads = _threads(x.numel())
    lgth, dgth, th_ld = _theta_terms(theta, x.shape)
    out = torch.empty_like(x)
    grads = [torch.empty_like(x) for _ in range(4)] if with_grad else [None] * 4
    ptrs = [_ptr(t) for t in grads]
    _lib.cv_nb_mixture(
        n_rows, n_cols, mu1.data_ptr(), mu2.data_ptr(), theta.data_ptr(), pi.data_ptr(),
        x.data_ptr(), _ptr(lgth), _ptr(dgth), eps, out.data_ptr(), *ptrs, threads, th_ld,
    )  # fmt: skip
    return out, *grads


def _theta_terms(theta: torch.Tensor, shape) -> tuple[torch.Tensor | None, ...]:
    """The lgamma and digamma of a per-feature ``theta`` (float64), and its row stride.

    A per-entry ``theta`` (contiguous, of the minibatch's ``shape``) gets Nones (NULL for the
    kernel, which evaluates them itself) and a stride of one row.
    """
    if theta.dim() == 1:
        return (*lgamma_digamma(theta), 0)
    if tuple(theta.shape) != tuple(shape) or not theta.is_contiguous():
        raise ValueError("theta must be 1-D or a contiguous tensor of the minibatch's shape.")
    return None, None, shape[-1]


def _ptr(t: torch.Tensor | None) -> int | None:
    """A tensor's data pointer for ctypes, or None (NULL)."""
    return None if t is None else t.data_ptr()


def protein_terms(
    mu1: torch.Tensor,
    mu2: torch.Tensor,
    theta: torch.Tensor,
    pi: torch.Tensor,
    x: torch.Tensor,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    codes: torch.Tensor,
    mask: torch.Tensor,
    prior_m: torch.Tensor,
    prior_ls: torch.Tensor,
    eps: float,
    with_grad: bool,
) -> tuple[torch.Tensor, ...]:
    """The per-cell protein reconstruction and background KL of totalVI (``cv_protein_terms``).

    ``mu1``, ``mu2``, ``pi``, ``x``, ``alpha`` and ``beta`` are contiguous float32 ``(B, P)``;
    ``theta`` float32 floored at ``eps``, ``(P,)`` or per entry as in
    :func:`nb_mixture_log_prob`; ``codes`` int64 ``(B,)``; ``mask`` bool
    ``(n_codes, P)`` (torch stores one byte, 0 or 1, per entry: the kernel reads it as is);
    ``prior_m`` and ``prior_ls`` contiguous float32 ``(P, n_codes)``. Returns ``rec`` and ``kl``
    ``(B,)`` and, with ``with_grad``, the seven per-entry derivatives
    ``(g1, g2, gpi, gth, ga, gb, gls)`` (else Nones). Raises IndexError for a code outside the
    mask's rows.
    """
    n_rows, n_cols = x.shape
    threads = _threads(x.numel())
    lgth, dgth, th_ld = _theta_terms(theta, x.shape)
    lp, rec, kl = torch.empty_like(x), x.new_empty(n_rows), x.new_empty(n_rows)
    grads = [torch.empty_like(x) for _ in range(7)] if with_grad else [None] * 7
    ptrs = [_ptr(t) for t in grads]
    mask = mask.contiguous()
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got {mask.dtype}.")
    status = _lib.cv_protein_terms(
        n_rows, n_cols, mu1.data_ptr(), mu2.data_ptr(), theta.data_ptr(), pi.data_ptr(),
        x.data_ptr(), alpha.data_ptr(), beta.data_ptr(), codes.data_ptr(), mask.shape[0],
        mask.data_ptr(), prior_m.data_ptr(), prior_ls.data_ptr(), _ptr(lgth), _ptr(dgth), eps,
        lp.data_ptr(), rec.data_ptr(), kl.data_ptr(), *ptrs, threads, th_ld,
    )  # fmt: skip
    if status:
        raise IndexError(f"A batch code is outside [0, {mask.shape[0]}).")
    return rec, kl, *grads


def protein_terms_backward(
    grad_rec: torch.Tensor,
    grad_kl: torch.Tensor,
    codes: torch.Tensor,
    n_codes: int,
    grads,
    theta_per_entry: bool = False,
) -> tuple[torch.Tensor, ...]:
    """The gradients of :func:`protein_terms` for upstream ``grad_rec`` and ``grad_kl``.

    ``grads`` are its seven derivatives. Returns the gradients by ``mu1``, ``mu2``, ``pi``,
    ``alpha`` and ``beta`` ``(B, P)``, ``theta`` (``(P,)``, or ``(B, P)`` with
    ``theta_per_entry``), ``prior_m`` and ``prior_ls`` ``(P, n_codes)``.
    """
    g1 = grads[0]
    n_rows, n_cols = g1.shape
    threads = _threads(g1.numel())
    outs = [torch.empty_like(g1) for _ in range(5)]
    outs += [torch.empty_like(g1) if theta_per_entry else g1.new_empty(n_cols)]
    outs += [g1.new_empty(n_cols, n_codes), g1.new_empty(n_cols, n_codes)]
    grad_rec, grad_kl = grad_rec.contiguous(), grad_kl.contiguous()
    _lib.cv_protein_terms_backward(
        n_rows, n_cols, grad_rec.data_ptr(), grad_kl.data_ptr(), codes.data_ptr(), n_codes,
        *(t.data_ptr() for t in grads), *(t.data_ptr() for t in outs), threads,
        n_cols if theta_per_entry else 0,
    )  # fmt: skip
    return tuple(outs)


def csr_dense(
    offsets: torch.Tensor,
    col: torch.Tensor,
    val: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """``bias + X W`` for the CSR rows ``X`` with stored entries ``(col, val)`` and ``offsets``.

    Row ``r``'s entries are ``offsets[r]`` up to the next row's offset (the last row's up to
    ``len(col)``); ``offsets`` and ``col`` are int64, ``val``, ``weight`` ``(n_cols, n_out)`` and
    ``bias`` ``(n_out,)`` (or None) float32. Returns ``(len(offsets), n_out)`` float32; raises
    IndexError for offsets that do not start at 0 or go back, or a column outside the weight's
    rows.
    """
    offsets, col = offsets.to(torch.int64).contiguous(), col.to(torch.int64).contiguous()
    val, weight = val.contiguous(), weight.contiguous()
    (n_rows,), (n_cols, n_out) = offsets.shape, weight.shape
    bias = None if bias is None else bias.contiguous()
    out = torch.empty(n_rows, n_out, dtype=torch.float32)
    threads = _threads(col.numel() * n_out)
    status = _lib.cv_csr_dense(
        n_rows, n_cols, n_out, col.numel(), offsets.data_ptr(), col.data_ptr(), val.data_ptr(),
        weight.data_ptr(), None if bias is None else bias.data_ptr(), out.data_ptr(), threads,
    )  # fmt: skip
    if status == -2:
        raise IndexError(f"the {n_rows} rows' offsets or columns do not fit {n_cols} columns.")
    return out


def csr_row_sums(offsets: torch.Tensor, val: torch.Tensor) -> torch.Tensor:
    """The ``(len(offsets),)`` float32 sums of CSR rows (``offsets`` as in :func:`csr_dense`)."""
    offsets, val = offsets.to(torch.int64).contiguous(), val.contiguous()
    out = torch.empty(offsets.numel(), dtype=torch.float32)
    status = _lib.cv_csr_row_sums(
        offsets.numel(), val.numel(), offsets.data_ptr(), val.data_ptr(), out.data_ptr()
    )
    if status == -2:
        raise IndexError(f"the {offsets.numel()} rows' offsets do not fit {val.numel()} entries.")
    return out


def csr_t_dense(
    row: torch.Tensor,
    col: torch.Tensor,
    val: torch.Tensor,
    dy: torch.Tensor,
    n_cols: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``Xᵀ dy`` for the ``(len(dy), n_cols)`` matrix ``X`` with stored entries ``(row, col, val)``.

    ``row`` and ``col`` are int64, ``val`` and ``dy`` float32 (made contiguous here); the entries
    may come in any order and repeat (repeats add up). Returns ``(n_cols, dy.shape[1])`` float32,
    written into ``out`` when given (contiguous, of that shape and dtype). The kernel sorts the
    entries by column, then sums each column's rows of ``dy`` in registers.
    """
    row, col = row.to(torch.int64).contiguous(), col.to(torch.int64).contiguous()
    val, dy = val.contiguous(), dy.contiguous()
    n_rows, n_out = dy.shape
    if out is None:
        out = torch.empty(n_cols, n_out, dtype=torch.float32)
    elif out.shape != (n_cols, n_out) or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous float32 ({n_cols}, {n_out}) tensor.")
    threads = _threads(out.numel())
    status = _lib.cv_csr_t_dense(
        n_rows, n_cols, n_out, row.numel(), row.data_ptr(), col.data_ptr(), val.data_ptr(),
        dy.data_ptr(), out.data_ptr(), threads,
    )  # fmt: skip
    if status == -2:
        raise IndexError(f"a stored entry lies outside the {n_rows} x {n_cols} matrix.")
    if status != 0:
        raise MemoryError("cellvae's sparse weight-gradient kernel could not allocate its sort.")
    return out


def gather_csr(
    idx: torch.Tensor, indptr: torch.Tensor, indices: torch.Tensor, values: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """``(row, col, val, offsets)`` of the stored entries of CSR rows ``idx``, row after row.

    ``idx`` is int64, ``indptr`` and ``indices`` int32 or int64, ``values`` float32, all on the
    CPU (``indptr``, ``indices`` and ``values`` contiguous). Returns int64 ``row`` (position in
    ``idx``), ``col`` and ``offsets`` (where each row begins), float32 ``val``. Two calls, no
    numpy: the rows' lengths and offsets (checking ``idx``), then one copy per row. Raises
    IndexError for a row outside the matrix.
    """
    idx = idx.contiguous()
    n_sel, n_rows, ptr64 = idx.numel(), indptr.numel() - 1, indptr.dtype == torch.int64
    offsets = torch.empty(n_sel, dtype=torch.int64)
    total = _lib.cv_csr_offsets(
        n_sel, idx.data_ptr(), indptr.data_ptr(), ptr64, n_rows, offsets.data_ptr()
    )
    if total < 0:
        bad = idx[(idx < 0) | (idx >= n_rows)][0]
        raise IndexError(f"cell index {int(bad)} is outside the {n_rows} cells.")
    row = torch.empty(total, dtype=torch.int64)
    col = torch.empty(total, dtype=torch.int64)
    val = torch.empty(total, dtype=torch.float32)
    threads = _threads(total)
    _lib.cv_gather_csr(
        n_sel, idx.data_ptr(), indptr.data_ptr(), ptr64, indices.data_ptr(),
        indices.dtype == torch.int64, values.data_ptr(), offsets.data_ptr(), row.data_ptr(),
        col.data_ptr(), val.data_ptr(), threads,
    )  # fmt: skip
    return row, col, val, offsets


def _pointers(tensors: Sequence[torch.Tensor | None]) -> ctypes.Array | None:
    """A C array of the tensors' data pointers, NULL for a None entry (None for no tensors)."""
    if not tensors:
        return None
    return (ctypes.c_void_p * len(tensors))(*map(_ptr, tensors))


def _sizes(parts: Sequence[int]) -> ctypes.Array:
    """A C array of int64 sizes."""
    return (ctypes.c_int64 * len(parts))(*parts)


def bn_relu_drop_forward(
    y: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    momentum: float,
    eps: float,
    lanes: torch.Tensor | None,
    threshold: int,
    scale: float,
    covariates: Sequence[tuple[torch.Tensor, torch.Tensor]] = (),
    seed: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``relu(batch_norm(y + Σ table[codes])) * drop`` in training, for float32 ``(B, H)`` ``y``.

    Batch norm with the minibatch's statistics (``running_mean`` / ``running_var`` updated in
    place with ``momentum``), then ReLU, then dropout: an entry is kept (times ``scale``) where
    its int16 ``lanes`` value is at least ``threshold``. With ``lanes`` None and a 64-bit
    ``seed``, the kernel makes the values of ``random_lanes(y.shape, seed)`` as it goes; with
    neither, there is no dropout. The batch norm's input is ``y`` plus, for each
    ``(table, codes)`` of ``covariates``, the ``(n_cat, H)`` table's row of each row's int64
    code (a layer's injected covariates; ``y`` is not written).
    Every tensor is contiguous and float32 (codes int64). Returns ``out`` and the ``(H,)`` mean and
    inverse standard deviation that :func:`bn_relu_drop_backward` takes. Raises IndexError for
    a code outside its table.
    """
    n_rows, n_cols = y.shape
    out = torch.empty_like(y)
    # the kernels write float32: whatever the session's default dtype is
    mean, invstd = torch.empty(n_cols, dtype=y.dtype), torch.empty(n_cols, dtype=y.dtype)
    threads = _threads(y.numel())
    tables, codes = [t for t, _ in covariates], [c for _, c in covariates]
    status = _lib.cv_bn_relu_drop_fwd(
        n_rows, n_cols, y.data_ptr(), len(tables), _pointers(tables), _pointers(codes),
        _sizes([len(t) for t in tables]),
        gamma.data_ptr(), beta.data_ptr(), running_mean.data_ptr(), running_var.data_ptr(),
        momentum, eps, None if lanes is None else lanes.data_ptr(), seed is not None,
        (seed or 0) & (2**64 - 1), threshold, scale, out.data_ptr(), mean.data_ptr(),
        invstd.data_ptr(), threads,
    )  # fmt: skip
    if status:
        raise IndexError("a covariate code lies outside its embedding's categories.")
    return out, mean, invstd


def bn_relu_drop_backward(
    y: torch.Tensor,
    out: torch.Tensor,
    gamma: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    scale: float,
    dout: torch.Tensor,
    covariates: Sequence[tuple[torch.Tensor, torch.Tensor]] = (),
) -> tuple[torch.Tensor, ...]:
    """Gradients ``(dy, dgamma, dbeta, *dtables)`` of :func:`bn_relu_drop_forward` from ``dout``.

    ``y``, ``covariates`` and ``out`` are that function's inputs and output (an entry passed the
    ReLU and the dropout where ``out`` is positive), ``scale`` the dropout's (1.0 without); one
    gradient per covariate table follows the three.
    """
    n_rows, n_cols = y.shape
    dout = dout.contiguous()
    dy = torch.empty_like(y)
    dgamma, dbeta = torch.empty(n_cols, dtype=y.dtype), torch.empty(n_cols, dtype=y.dtype)
    tables, codes = [t for t, _ in covariates], [c for _, c in covariates]
    dtables = [torch.zeros_like(t) for t in tables]
    threads = _threads(y.numel())
    _lib.cv_bn_relu_drop_bwd(
        n_rows, n_cols, y.data_ptr(), len(tables), _pointers(tables), _pointers(codes),
        _pointers(dtables), out.data_ptr(), gamma.data_ptr(), mean.data_ptr(), invstd.data_ptr(),
        scale, dout.data_ptr(), dy.data_ptr(), dgamma.data_ptr(), dbeta.data_ptr(), threads,
    )  # fmt: skip
    return dy, dgamma, dbeta, *dtables


def random_lanes(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Uniform random int16 values of ``shape`` from the 64-bit ``seed`` (SplitMix64)."""
    out = torch.empty(shape, dtype=torch.int16)
    _lib.cv_random_lanes(out.numel(), seed & (2**64 - 1), out.data_ptr())
    return out


def bf16_split_widen(
    out: torch.Tensor, sizes: Sequence[int], biases: Sequence[torch.Tensor | None]
) -> list[torch.Tensor]:
    """The contiguous bfloat16 ``(B, sum(sizes))`` ``out`` split by columns into float32 parts.

    Part ``i`` is ``(B, sizes[i])``, contiguous, plus ``biases[i]`` (float32, contiguous; None:
    no bias): what ``part.float() + bias`` gives, in one pass over ``out``.
    """
    n_rows, n_cols = out.shape
    parts = [torch.empty(n_rows, n, dtype=torch.float32) for n in sizes]
    _lib.cv_bf16_split_widen(
        n_rows, n_cols, out.data_ptr(), len(sizes), _sizes(sizes), _pointers(biases),
        _pointers(parts), _threads(out.numel()),
    )  # fmt: skip
    return parts


def bf16_join_narrow(
    grads: Sequence[torch.Tensor], with_sums: Sequence[bool]
) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """Contiguous float32 ``(B, n_i)`` ``grads`` side by side in one bfloat16 ``(B, Σ n_i)``.

    Rounded to the nearest even, as ``Tensor.to(torch.bfloat16)``. Also returns the column sums
    of each ``grads[i]`` where ``with_sums[i]`` (else None), summed in float32 with the rows in
    order: the same on any number of threads.
    """
    n_rows = grads[0].shape[0]
    sizes = [g.shape[1] for g in grads]
    block = torch.empty(n_rows, sum(sizes), dtype=torch.bfloat16)
    sums = [torch.empty(n, dtype=torch.float32) if w else None for n, w in zip(sizes, with_sums)]
    _lib.cv_bf16_join_narrow(
        n_rows, block.shape[1], len(grads), _sizes(sizes), _pointers(grads), block.data_ptr(),
        _pointers(sums), _threads(block.numel()),
    )  # fmt: skip
    return block, sums


class AdamState:
    """The parameters, moments and step counts of an Adam update, ready for :meth:`step`.

    Built for contiguous float32 CPU tensors (:meth:`build` says None otherwise); keeps their
    data pointers, so whoever holds it must build it again when a parameter's storage changes
    or a copy is added (:class:`cellvae.train.Adam` compares the pointers at each step). With
    the pointer arrays prepared once, the Python around the call takes ~15 µs instead of ~45
    (SCVI's 17 tensors).
    """

    def __init__(self, params, exp_avg, exp_avg_sq, steps, copies=None):
        self.n = len(params)
        self.sizes = _sizes([p.numel() for p in params])
        self.arrays = [_pointers(t) for t in (params, exp_avg, exp_avg_sq, steps)]
        self.copies = copies  # kept alive while the kernel writes them
        self.arrays.append(None if copies is None else _pointers(copies))
        self.total = sum(p.numel() for p in params)

    @classmethod
    def build(cls, params, exp_avg, exp_avg_sq, steps, copies=None) -> AdamState | None:
        """The state of these tensors, or None where the kernel does not take them.

        ``copies`` (None, or one entry per parameter): contiguous bfloat16 CPU tensors of the
        parameters' sizes, or None, which each update writes with the new values (the
        parameters' ``Tensor.to(torch.bfloat16)``); a ValueError for another tensor.
        """
        tensors = (*params, *exp_avg, *exp_avg_sq)
        if not params or not takes(*tensors) or not all(t.is_contiguous() for t in tensors):
            return None
        for p, c in zip(params, copies or [None] * len(params), strict=True):
            if c is not None and not (
                c.dtype == torch.bfloat16
                and c.device.type == "cpu"
                and c.is_contiguous()
                and c.numel() == p.numel()
            ):
                raise ValueError("A copy must be a contiguous bfloat16 CPU tensor of its size.")
        if copies is not None and all(c is None for c in copies):
            copies = None
        return cls(params, exp_avg, exp_avg_sq, steps, copies)

    def step(self, grads, *, lr: float, betas: tuple[float, float], eps: float, wd: float) -> bool:
        """One update with ``grads`` (contiguous float32, one per parameter); True: skipped.

        ``torch.optim.Adam``'s update (L2 weight decay, no amsgrad), in place, after one
        read-only pass over the gradients: where one of them holds an inf or a NaN, nothing
        changes and True is returned. Each step count is advanced by one with its update. Where
        torch's non-finite check and fused Adam took ~40 + ~190 µs for SCVI's 780k parameters
        (hot, 2 threads), this takes ~90 µs.
        """
        p, m, v, s, copies = self.arrays
        status = _lib.cv_adam(
            self.n, self.sizes, p, _pointers(grads), m, v, s, copies, lr, betas[0], betas[1], wd,
            eps, _threads(self.total),
        )  # fmt: skip
        return bool(status)


def normal_sample_forward(
    mu: torch.Tensor, noise: torch.Tensor, var_eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(m, v, z, kl)`` of q(z | x) = N(m, v) from the heads' outputs side by side.

    ``mu`` is contiguous float32 ``(B, 2L)``: the means, then the variances before
    ``exp(·) + var_eps``; ``noise`` contiguous ``(B, L)`` standard normal values. ``z = m +
    sqrt(v) · noise`` and ``kl`` (``(B,)``) is KL(N(m, v) ‖ N(0, I)) per row.
    """
    n_rows, n_lat = noise.shape
    m, v, z = (torch.empty(n_rows, n_lat, dtype=torch.float32) for _ in range(3))
    kl = torch.empty(n_rows, dtype=torch.float32)
    _lib.cv_normal_sample_fwd(
        n_rows, n_lat, mu.data_ptr(), noise.data_ptr(), var_eps, m.data_ptr(), v.data_ptr(),
        z.data_ptr(), kl.data_ptr(),
    )  # fmt: skip
    return m, v, z, kl


def normal_sample_backward(
    mu: torch.Tensor,
    noise: torch.Tensor,
    var_eps: float,
    grads: Sequence[torch.Tensor | None],
) -> torch.Tensor:
    """The gradient by ``mu`` of :func:`normal_sample_forward` from those of ``(m, v, z, kl)``.

    Each of ``grads`` is contiguous float32 or None (no gradient).
    """
    d = torch.empty_like(mu)
    ptrs = [None if g is None else g.data_ptr() for g in grads]
    _lib.cv_normal_sample_bwd(
        noise.shape[0], noise.shape[1], mu.data_ptr(), noise.data_ptr(), var_eps, *ptrs,
        d.data_ptr(),
    )  # fmt: skip
    return d
