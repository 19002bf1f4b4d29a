"""The compiled likelihood kernels (cellvae/_kernels.c) against float64 references.

test_distributions.py runs its row-sum tests through both the torch code and these kernels; here
they are held to scipy at the extremes of every parameter, entry by entry.
"""

import copy
import os
import platform
import sys

import numpy as np
import pytest
import torch
from scipy import special
from test_distributions import _inputs, _make, _nb_mag, _ref_nb, _ref_zinb, _softplus_mag

import cellvae
from cellvae import _kernels
from cellvae import nn as nn_module
from cellvae._sparse import CSRBatch
from cellvae.distributions import (
    NegativeBinomial,
    NegativeBinomialMixture,
    ZeroInflatedNegativeBinomial,
    log_nb_positive,
    log_zinb_positive,
)
from cellvae.nn import FCLayers, parallel_stacks

built = pytest.mark.skipif(
    _kernels._lib is None, reason="kernels not built (test_built_where_required)"
)


@pytest.mark.skipif(
    not os.environ.get("CELLVAE_REQUIRE_KERNELS"), reason="only where the install built them"
)
def test_built_where_required():
    # `make test` (and so CI) sets CELLVAE_REQUIRE_KERNELS=1: its install builds the kernels
    # (gcc and glibc's libmvec), and a build that silently failed must not go unnoticed
    assert sys.platform.startswith("linux") and platform.machine() == "x86_64"
    assert _kernels._lib is not None and _kernels.available()


def _float32_inputs():
    """The wide-range inputs of test_distributions, rounded to float32, and in float64."""
    a32 = {k: np.asarray(v, dtype=np.float32) for k, v in _inputs(seed=4).items()}
    return a32, {k: v.astype(np.float64) for k, v in a32.items()}


@built
def test_lgamma_digamma_match_scipy():
    rng = np.random.default_rng(0)
    z = torch.tensor(10 ** rng.uniform(-6, 7, 5000), dtype=torch.float32)
    z = torch.cat([z, torch.tensor([1.0, 2.0, 7.999999, 8.0, 8.000001, 1e-8])])
    lg, dg = _kernels.lgamma_digamma(z)
    z64 = z.double().numpy()
    np.testing.assert_allclose(lg.numpy(), special.gammaln(z64), rtol=1e-11, atol=1e-11)
    np.testing.assert_allclose(dg.numpy(), special.digamma(z64), rtol=1e-11, atol=1e-11)


@built
@pytest.mark.parametrize("name", ["nb", "zinb"])
def test_each_entry_matches_scipy(name):
    # one entry per call (a 1 x 1 minibatch): value against scipy, at float32 precision of the
    # terms that cancel (as in test_distributions)
    a32, a64 = _float32_inputs()
    values = []
    for k in range(len(a32["x"])):
        one = {n: torch.tensor(a32[n][k : k + 1]) for n in ("x", "mu", "theta", "pi")}
        dist, _ = _make(name, one["mu"][None], one["theta"], one["pi"][None])
        values.append(dist.log_prob_sum(one["x"][None]).item())
    if name == "nb":
        ref = _ref_nb(a64["x"], a64["mu"], a64["theta"])
        mag = _nb_mag(a64["x"], a64["mu"], a64["theta"])
    else:
        ref = _ref_zinb(a64["x"], a64["mu"], a64["theta"], a64["pi"])
        mag = _nb_mag(a64["x"], a64["mu"], a64["theta"]) + _softplus_mag(a64["pi"])
    assert np.isfinite(values).all()
    assert (np.abs(np.array(values) - ref) <= 1e-6 * (mag + 1)).all()


@built
@pytest.mark.parametrize("name", ["nb", "zinb"])
def test_gradients_match_float64_autograd(name):
    # one cell of all entries: the gradient of its row sum is each entry's own derivative
    a32, a64 = _float32_inputs()
    ref = {n: torch.tensor(a64[n]).requires_grad_() for n in ("mu", "theta", "pi")}
    x64 = torch.tensor(a64["x"])
    if name == "nb":
        value = log_nb_positive(x64, ref["mu"], ref["theta"])
    else:
        value = log_zinb_positive(x64, ref["mu"], ref["theta"], ref["pi"])
    wrt = ["mu", "theta"] if name == "nb" else ["mu", "theta", "pi"]
    expected = torch.autograd.grad(value.sum(), [ref[n] for n in wrt])
    got = {n: torch.tensor(a32[n]).requires_grad_() for n in ("mu", "theta", "pi")}
    dist, _ = _make(name, got["mu"][None], got["theta"], got["pi"][None])
    assert _kernels.available()
    out = dist.log_prob_sum(torch.tensor(a32["x"])[None])
    assert out.grad_fn.name() == "_FusedLogProbSumBackward"
    for n, e in zip(wrt, expected):
        (g,) = torch.autograd.grad(out.sum(), got[n], retain_graph=True)
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g.double(), e, rtol=1e-3, atol=1e-3)


@built
@pytest.mark.parametrize("name", ["nb", "zinb"])
def test_stored_zeros_and_any_order_of_entries(name, monkeypatch):
    # a CSR may store zeros, and nz may list the entries in any order: same as the torch code
    g = torch.Generator().manual_seed(2)
    mu = torch.exp(torch.randn(16, 50, generator=g) * 2)
    theta = torch.exp(torch.randn(50, generator=g))
    pi = torch.randn(16, 50, generator=g) * 2
    x = torch.poisson(mu * (torch.rand(16, 50, generator=g) < 0.2), generator=g)
    row, col = torch.nonzero(x, as_tuple=True)
    zr, zc = torch.nonzero(x == 0, as_tuple=True)
    perm = torch.randperm(len(row) + len(zr[::5]), generator=g)
    nz = (torch.cat([row, zr[::5]])[perm], torch.cat([col, zc[::5]])[perm])
    weights = torch.rand(16, generator=g) + 0.5

    def run():
        params = [p.clone().requires_grad_() for p in (mu, theta, pi)]
        out = _make(name, *params)[0].log_prob_sum(x, nz)
        wrt = params[:2] if name == "nb" else params
        return [out.detach(), *torch.autograd.grad((out * weights).sum(), wrt)], out.grad_fn

    fused, fn = run()
    assert fn.name() == "_FusedLogProbSumBackward"
    monkeypatch.setattr(_kernels, "enabled", False)
    plain, fn = run()
    assert fn.name() != "_FusedLogProbSumBackward"
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4 * b.abs().max().item())


@built
def test_entries_outside_the_minibatch_raise():
    # (0, 3) of a 2 x 3 minibatch has a valid flat position (1, 0): only the kernel's check sees it
    ones = torch.ones(2, 3)
    for r, c in [(2, 1), (0, 3), (-1, 0)]:
        row, col = torch.tensor([r]), torch.tensor([c])
        with pytest.raises(IndexError, match="outside the 2 x 3 minibatch"):
            _kernels.nb_zinb_log_prob_sum(ones, ones[0], None, ones[0, :1], row, col, 1e-8, True)


def test_other_cases_use_the_torch_code():
    # float64 is left to the torch code; a per-entry dispersion goes to the kernels where built
    mu, x = torch.ones(3, 4, requires_grad=True), CSRBatch.from_dense(torch.eye(3, 4))
    out = NegativeBinomial(mu, torch.ones(3, 4)).log_prob_sum(x)
    assert ("Fused" in out.grad_fn.name()) == (_kernels._lib is not None)
    mu64 = torch.ones(3, 4, dtype=torch.float64, requires_grad=True)
    out = NegativeBinomial(mu64, torch.ones(4, dtype=torch.float64)).log_prob_sum(x)
    assert "Fused" not in out.grad_fn.name() and out.dtype == torch.float64


@built
@pytest.mark.parametrize("name", ["nb", "zinb"])
@pytest.mark.parametrize("softmax", [False, True])
@pytest.mark.parametrize("mean", [False, True])
def test_per_entry_theta_in_the_kernel_matches_float64_torch(name, softmax, mean, monkeypatch):
    # a (B, G) theta (dispersion per batch and gene, or per cell): row sums and the gradients by
    # every input, theta's per entry, against the torch code in float64, for the row gradient
    # the loss announces (a mean) and another; a row whose ZINB p(0) underflows; the same bits
    # on 1, 2 and 3 threads with entries in any order
    monkeypatch.setattr(_kernels, "_MIN_PARALLEL", 0)
    logits, library, _, pi, x = _softmax_inputs(7, n_cells=23)
    gen = torch.Generator().manual_seed(7)
    theta = torch.exp(torch.randn(x.shape, generator=gen) * 1.5)
    if name == "zinb":
        pi[4, :30] = -120.0  # p(0) below 1e-30 where x = 0: the stable branch, per-entry theta
        theta[4, :30] = 50.0
        logits[4, :30] = 10.0
        library[4] = 1e5  # mu ~ 3,000 there: theta log(1 + mu / theta) > 80
    weights = torch.rand(len(x), generator=gen) + 0.5
    if mean:
        weights = torch.full((len(x),), -1.0 / len(x))
    nz = torch.nonzero(x, as_tuple=True)
    cls = NegativeBinomial if name == "nb" else ZeroInflatedNegativeBinomial

    def run(dtype, fused):
        params = [p.to(dtype).clone().requires_grad_() for p in (logits, library, theta, pi)]
        extra = {} if name == "nb" else {"zi_logits": params[3]}
        if softmax:
            dist = cls(scale_logits=params[0], library=params[1], theta=params[2], **extra)
            if not fused:
                dist.mu  # noqa: B018 (the torch code)
            wrt = params if name == "zinb" else params[:3]
        else:
            mu = (params[1] * torch.softmax(params[0], -1)).detach().requires_grad_()
            dist = cls(mu=mu, theta=params[2], **extra)
            wrt = [mu, params[2]] + ([params[3]] if name == "zinb" else [])
        if not fused:
            monkeypatch.setattr(_kernels, "enabled", False)
        out = dist.log_prob_sum(x.to(dtype), nz, row_grad=-1.0 / len(x))
        monkeypatch.setattr(_kernels, "enabled", True)
        return out, torch.autograd.grad((out * weights.to(dtype)).sum(), wrt), out.grad_fn.name()

    out, grads, fn = run(torch.float32, fused=True)
    assert fn == "_FusedLogProbSumBackward"
    ref, ref_grads, ref_fn = run(torch.float64, fused=False)
    assert "Fused" not in ref_fn
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-3)
    for g, r in zip(grads, ref_grads, strict=True):
        assert g.shape == r.shape and torch.isfinite(g).all()
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-4 * r.abs().max().item())
    row, col = nz
    perm = torch.randperm(len(row), generator=gen)
    row, col = row[perm], col[perm]
    mu = library * torch.softmax(logits, -1)
    p = None if name == "nb" else pi
    results = _on_1_2_3_threads(
        lambda: _kernels.nb_zinb_log_prob_sum(mu, theta, p, x[row, col], row, col, 1e-8, True)
    )
    for other in results[1:]:
        assert all(a is b or torch.equal(a, b) for a, b in zip(results[0], other))


@built
def test_per_entry_theta_needs_the_minibatch_shape():
    mu, idx, val = torch.ones(2, 3), torch.zeros(1, dtype=torch.int64), torch.ones(1)
    for bad in (torch.ones(3, 3), torch.ones(3, 2).t()):
        with pytest.raises(ValueError, match="theta must be"):
            _kernels.nb_zinb_log_prob_sum(mu, bad, None, val, idx, idx, 1e-8, True)


@built
@pytest.mark.parametrize("dispersion", ["gene", "gene-batch", "gene-cell"])
def test_scvi_trains_the_same_with_and_without_kernels(dispersion, monkeypatch):
    # the training losses of a few epochs agree (not bit for bit: float64 lgamma at the nonzeros,
    # float64 sums in batch norm); without dropout, whose masks the kernels draw from another
    # stream (test_random_lanes_are_splitmix64); per-batch and per-cell dispersions take the
    # kernel too (a (B, G) theta)
    adata = cellvae.datasets.kang_ifnb()[:400, :300]
    adata = adata[:, np.asarray(adata.X.sum(0)).ravel() > 0].copy()
    histories, calls = [], []
    kernel = _kernels.softmax_nb_zinb_log_prob_sum
    monkeypatch.setattr(
        _kernels, "softmax_nb_zinb_log_prob_sum", lambda *a, **k: calls.append(1) or kernel(*a, **k)
    )
    for enabled in (True, False):
        monkeypatch.setattr(_kernels, "enabled", enabled)
        calls.clear()
        bdata = adata.copy()
        cellvae.pp.setup_anndata(bdata, batch_key="stim")
        model = cellvae.SCVI(bdata, n_latent=5, dropout_rate=0.0, dispersion=dispersion)
        model.train(max_epochs=3, seed=0, progress_bar=False)
        histories.append(model.history["validation_elbo"].to_numpy())
        assert (len(calls) > 0) == enabled
    np.testing.assert_allclose(histories[0], histories[1], rtol=1e-4)


@built
@pytest.mark.parametrize("dispersions", [("gene", "protein"), ("gene-batch", "protein-batch")])
def test_totalvi_trains_the_same_with_and_without_kernels(dispersions, monkeypatch):
    # as test_scvi_trains_the_same_with_and_without_kernels, for totalVI with one dispersion per
    # gene and protein, or per batch and gene / protein (the kernels then read (B, G) and
    # (B, P) thetas); the protein kernel runs in both, with a 1-D and a 2-D theta
    adata = cellvae.datasets.synthetic(300, 40, n_batches=2, n_proteins=6, random_state=1)
    histories, calls = [], []
    kernel = _kernels.protein_terms
    monkeypatch.setattr(
        _kernels, "protein_terms", lambda *a, **k: calls.append(a[2].dim()) or kernel(*a, **k)
    )
    gene, protein = dispersions
    for enabled in (True, False):
        monkeypatch.setattr(_kernels, "enabled", enabled)
        calls.clear()
        bdata = adata.copy()
        cellvae.TOTALVI.setup_anndata(
            bdata, batch_key="batch", protein_expression_obsm_key="protein_expression"
        )
        model = cellvae.TOTALVI(
            bdata,
            n_hidden=32,
            n_latent=5,
            gene_dispersion=gene,
            protein_dispersion=protein,
            dropout_rate_encoder=0.0,
            dropout_rate_decoder=0.0,
        )
        model.train(max_epochs=3, batch_size=64, seed=0, progress_bar=False)
        histories.append(model.history["validation_elbo"].to_numpy())
        assert set(calls) == ({1 if protein == "protein" else 2} if enabled else set())
    np.testing.assert_allclose(histories[0], histories[1], rtol=1e-4)


@built
@pytest.mark.parametrize("name", ["nb", "zinb"])
def test_non_finite_parameters_stay_non_finite(name):
    # the dense pass clamps expf's arguments (for speed); a NaN must still reach the row sum
    mu, theta, pi = torch.rand(3, 40) + 0.5, torch.rand(40) + 0.5, torch.randn(3, 40) * 100
    x = CSRBatch.from_dense(torch.poisson(torch.ones(3, 40)))
    mu[0, 5] = float("nan")
    if name == "zinb":
        pi[1, 7] = float("nan")
    out = _make(name, mu, theta, pi)[0].log_prob_sum(x)
    assert torch.isnan(out[0]) and torch.isnan(out[1]) == (name == "zinb")
    assert torch.isfinite(out[2])


@built
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts minor page faults")
def test_scratch_is_not_faulted_in_at_every_call():
    # the gathered nonzeros' float64 scratch (80 bytes each: 41 MB here, 1.6 MB for 128 cells x
    # 2,000 genes at 8%) is kept between calls; allocated and freed at each call, glibc mapped
    # and unmapped it and each call faulted its 10,000 pages in again (2.8 instead of 1.2 ms of
    # the 128-cell minibatch)
    import resource

    gen = torch.Generator().manual_seed(0)
    mu, theta = torch.rand(1024, 5000, generator=gen) + 0.1, torch.rand(5000, generator=gen) + 0.5
    row, col = torch.nonzero(torch.rand(1024, 5000, generator=gen) < 0.1, as_tuple=True)
    x = torch.ones(row.numel())
    for _ in range(2):
        _kernels.nb_zinb_log_prob_sum(mu, theta, None, x, row, col, 1e-8, False)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        _kernels.nb_zinb_log_prob_sum(mu, theta, None, x, row, col, 1e-8, False)
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3 < 1000


@built
@pytest.mark.parametrize("name", ["nb", "zinb"])
def test_results_do_not_depend_on_the_number_of_threads(name, monkeypatch):
    # the dense pass runs by rows and the nonzeros by ranges on torch's OpenMP threads: every
    # output must still be the serial one bit for bit, entries in any order, stored zeros and
    # underflowing zero branches included
    monkeypatch.setattr(_kernels, "_MIN_PARALLEL", 0)
    gen = torch.Generator().manual_seed(3)
    mu = torch.exp(torch.randn(37, 300, generator=gen) * 2)
    theta = torch.exp(torch.randn(300, generator=gen))
    pi = None if name == "nb" else torch.randn(37, 300, generator=gen) * 3
    if pi is not None:
        pi[5, :20] = -120.0  # p(0) underflows: the stable branch fixes row 5
    x = torch.poisson(mu * (torch.rand(37, 300, generator=gen) < 0.3), generator=gen)
    row, col = torch.nonzero(x, as_tuple=True)
    zr, zc = torch.nonzero(x == 0, as_tuple=True)
    perm = torch.randperm(len(row) + 50, generator=gen)
    row, col = torch.cat([row, zr[:50]])[perm], torch.cat([col, zc[:50]])[perm]
    val = x[row, col]
    results = _on_1_2_3_threads(
        lambda: _kernels.nb_zinb_log_prob_sum(mu, theta, pi, val, row, col, 1e-8, True)
    )
    assert torch.isfinite(results[0][0]).all()
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert (a is None and b is None) or torch.equal(a, b)


@built
@pytest.mark.parametrize("n_out", [19, 405])
def test_sparse_weight_gradient_matches_float64_on_any_number_of_threads(n_out, monkeypatch):
    # Xᵀ dY of the sparse first layer: entries in any order, repeated entries adding up, and the
    # same result bit for bit on 1, 2 and 3 threads (the threads share the sort by column, then
    # each owns a range of output rows); 405 = 256 + 128 + 16 + 5 outputs: every block width
    monkeypatch.setattr(_kernels, "_MIN_PARALLEL", 0)
    gen = torch.Generator().manual_seed(5)
    x = torch.poisson(torch.rand(41, 301, generator=gen) * (torch.rand(41, 301) < 0.1) * 20)
    row, col = torch.nonzero(x, as_tuple=True)
    perm = torch.randperm(len(row), generator=gen)
    row, col = torch.cat([row[perm], row[:7]]), torch.cat([col[perm], col[:7]])
    val = torch.rand(len(row), generator=gen) * 10
    dense = torch.zeros(41, 301, dtype=torch.float64).index_put_((row, col), val.double(), True)
    dy = torch.randn(41, n_out, generator=gen)
    expected = dense.t() @ dy.double()
    _check_on_1_2_3_threads(lambda: _kernels.csr_t_dense(row, col, val, dy, 301), expected)
    # each output is the same sum whatever block it is summed in: its column alone, one by one
    got = _kernels.csr_t_dense(row, col, val, dy, 301)
    for j in (0, n_out // 2, n_out - 1):
        alone = _kernels.csr_t_dense(row, col, val, dy[:, j : j + 1], 301)
        assert torch.equal(got[:, j : j + 1], alone)


def _on_1_2_3_threads(call) -> list:
    """``[call(), call(), call()]`` on 1, 2 and 3 torch threads (the kernels use torch's)."""
    threads, results = torch.get_num_threads(), []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(call())
    finally:
        torch.set_num_threads(threads)
    return results


def _check_on_1_2_3_threads(call, expected):
    """``call()`` on 1, 2 and 3 threads: close to the float64 ``expected``, the same bits."""
    results = _on_1_2_3_threads(call)
    torch.testing.assert_close(results[0].double(), expected, rtol=1e-5, atol=1e-4)
    assert all(torch.equal(results[0], other) for other in results[1:])


@built
def test_sparse_weight_gradient_checks_its_entries():
    dy = torch.ones(2, 4)
    for r, c in [(2, 0), (0, 3), (-1, 0), (0, -1)]:
        with pytest.raises(IndexError, match="outside the 2 x 3 matrix"):
            _kernels.csr_t_dense(torch.tensor([r]), torch.tensor([c]), torch.ones(1), dy, 3)


@built
def test_sparse_linear_uses_the_kernel_for_its_weight_gradient(monkeypatch):
    # the same gradient as the sorted embedding_bag of the torch code, which it replaces on CPU
    gen = torch.Generator().manual_seed(6)
    x = CSRBatch.from_dense(torch.poisson(torch.rand(30, 200, generator=gen) * 0.3))
    calls, kernel = [], _kernels.csr_t_dense
    monkeypatch.setattr(_kernels, "csr_t_dense", lambda *a: calls.append(1) or kernel(*a))
    grads = []
    for enabled in (True, False):
        monkeypatch.setattr(_kernels, "enabled", enabled)
        w = torch.randn(200, 16, generator=torch.Generator().manual_seed(0), requires_grad=True)
        cellvae._sparse.sparse_linear(x, w).pow(2).sum().backward()
        grads.append(w.grad)
    assert len(calls) == 1
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-5)


def _csr_with_empty_rows(n_rows, n_cols, seed):
    """A float32 CSR batch of counts with empty rows (first, middle, last), and its dense form."""
    gen = torch.Generator().manual_seed(seed)
    dense = torch.poisson(torch.rand(n_rows, n_cols, generator=gen) * 3, generator=gen)
    dense[torch.rand(n_rows, n_cols, generator=gen) > 0.1] = 0
    dense[[0, n_rows // 2, n_rows - 1]] = 0
    return CSRBatch.from_dense(dense), dense


@built
@pytest.mark.parametrize("n_out", [1, 19, 128, 130, 256, 405])
def test_sparse_product_matches_float64_on_any_number_of_threads(n_out, monkeypatch):
    # bias + X W row by row: blocks of 256 (with AVX-512), 128 and 16 outputs in registers and
    # the remainder, with and without a bias, the same bits on 1, 2 and 3 threads (each thread
    # owns a range of rows)
    monkeypatch.setattr(_kernels, "_MIN_PARALLEL", 0)
    x, dense = _csr_with_empty_rows(37, 301, seed=n_out)
    gen = torch.Generator().manual_seed(1)
    w, b = torch.randn(301, n_out, generator=gen), torch.randn(n_out, generator=gen)
    for bias in (b, None):
        expected = dense.double() @ w.double() + (0.0 if bias is None else bias.double())
        _check_on_1_2_3_threads(
            lambda bias=bias: _kernels.csr_dense(x.offsets, x.col, x.val, w, bias), expected
        )


@built
def test_sparse_product_and_row_sums_check_their_entries():
    w = torch.ones(3, 4)
    one = torch.ones(1)
    for offsets, col in [([0], [3]), ([0], [-1]), ([1], [0]), ([-1], [0]), ([0, 2], [0])]:
        offsets, col = torch.tensor(offsets), torch.tensor(col)
        with pytest.raises(IndexError, match="do not fit 3 columns"):
            _kernels.csr_dense(offsets, col, one, w, None)
    for offsets in ([1], [-1], [0, 2], [1, 0]):
        with pytest.raises(IndexError, match="do not fit 1 entries"):
            _kernels.csr_row_sums(torch.tensor(offsets), one)


@built
def test_row_sums_kernel_matches_float64():
    x, dense = _csr_with_empty_rows(53, 400, seed=3)
    got = _kernels.csr_row_sums(x.offsets, x.val)
    assert got.shape == (53,) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), dense.double().sum(1))
    calls, kernel = [], _kernels.csr_row_sums
    try:
        _kernels.csr_row_sums = lambda *a: calls.append(1) or kernel(*a)
        torch.testing.assert_close(cellvae._sparse.row_sums(x), got.unsqueeze(-1))
    finally:
        _kernels.csr_row_sums = kernel
    assert calls == [1]


@built
def test_sparse_linear_kernels_match_the_torch_code(monkeypatch):
    # value and the weight, bias and dense-column gradients of [X | D] W + b: compiled product
    # and weight gradient (written into one tensor with D's rows) against embedding_bag
    x, dense = _csr_with_empty_rows(30, 200, seed=6)
    gen = torch.Generator().manual_seed(0)
    extra, w0 = torch.randn(30, 3, generator=gen), torch.randn(203, 16, generator=gen)
    b0 = torch.randn(16, generator=gen)
    calls = []

    def counting(kernel):
        return lambda *a, **kw: calls.append(1) or kernel(*a, **kw)

    for name in ("csr_dense", "csr_t_dense"):
        monkeypatch.setattr(_kernels, name, counting(getattr(_kernels, name)))
    results = []
    for enabled in (True, False):
        monkeypatch.setattr(_kernels, "enabled", enabled)
        w, b, e = (t.clone().requires_grad_() for t in (w0, b0, extra))
        out = cellvae._sparse.sparse_linear(cellvae._sparse.hstack(x, e), w, b)
        out.pow(2).sum().backward()
        results.append((out, w.grad, b.grad, e.grad))
    assert len(calls) == 2
    for got, expected in zip(*results, strict=True):  # float32 sums in another order
        atol = 1e-6 * float(expected.detach().abs().max())
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=atol)
    ref = torch.cat([dense, extra], 1).double() @ w0.double() + b0.double()
    torch.testing.assert_close(results[0][0].double(), ref, rtol=1e-5, atol=1e-4)


@built
def test_sparse_weight_gradient_into_a_given_tensor():
    x, dense = _csr_with_empty_rows(9, 40, seed=2)
    dy = torch.randn(9, 5)
    full = torch.full((42, 5), 7.0)
    _kernels.csr_t_dense(x.row, x.col, x.val, dy, 40, out=full[:40])
    torch.testing.assert_close(full[:40].double(), dense.double().t() @ dy.double())
    assert (full[40:] == 7.0).all()
    with pytest.raises(ValueError, match="contiguous float32"):
        _kernels.csr_t_dense(x.row, x.col, x.val, dy, 40, out=torch.empty(5, 40).t())


def _bn_relu_drop_reference(y, gamma, beta, keep, scale, momentum, eps):
    """float64 torch: BatchNorm1d (training) → ReLU → dropout with the mask ``keep``."""
    y64, g64, b64 = (t.double().requires_grad_() for t in (y, gamma, beta))
    rm, rv = (
        torch.zeros(y.shape[1], dtype=torch.float64),
        torch.ones(y.shape[1], dtype=torch.float64),
    )
    bn = torch.nn.functional.batch_norm(y64, rm, rv, g64, b64, True, momentum, eps)
    out = torch.relu(bn) * (keep.double() * float(torch.tensor(scale, dtype=torch.float32)))
    return out, (y64, g64, b64), rm, rv


@built
@pytest.mark.parametrize("shape", [(64, 48), (130, 100), (96, 200)])
@pytest.mark.parametrize("dropout", [True, False])
def test_bn_relu_dropout_matches_float64(shape, dropout, monkeypatch):
    # output, running statistics and the three gradients against float64 torch, on 1, 2 and 3
    # threads (columns not a multiple of the kernel's chunk of 64), bit for bit across threads
    monkeypatch.setattr(_kernels, "_MIN_PARALLEL", 0)
    gen = torch.Generator().manual_seed(5)
    n, h = shape
    y = torch.randn(n, h, generator=gen) * 3 + torch.randn(h, generator=gen)
    gamma, beta = torch.rand(h, generator=gen) + 0.5, torch.randn(h, generator=gen) * 0.5
    dout = torch.randn(n, h, generator=gen)
    lanes = torch.randint(-(2**15), 2**15, (n, h), dtype=torch.int16, generator=gen)
    threshold, scale = (-26214, 65536 / 58982) if dropout else (0, 1.0)
    keep = lanes >= threshold if dropout else torch.ones(n, h, dtype=torch.bool)
    ref, leaves, rm_ref, rv_ref = _bn_relu_drop_reference(y, gamma, beta, keep, scale, 0.1, 1e-3)
    ref.backward(dout.double())

    def run():
        rm, rv = torch.zeros(h), torch.ones(h)
        out, mean, invstd = _kernels.bn_relu_drop_forward(
            y, gamma, beta, rm, rv, 0.1, 1e-3, lanes if dropout else None, threshold, scale
        )
        grads = _kernels.bn_relu_drop_backward(y, out, gamma, mean, invstd, scale, dout)
        return out, rm, rv, *grads

    results = _on_1_2_3_threads(run)
    out, rm, rv, *grads = results[0]
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rm.double(), rm_ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(rv.double(), rv_ref, rtol=1e-6, atol=1e-7)
    for got, leaf in zip(grads, leaves):
        torch.testing.assert_close(
            got.double(), leaf.grad, rtol=1e-4, atol=1e-5 * leaf.grad.abs().max()
        )
    assert (out == 0).float().mean() > 0.3  # the ReLU (and dropout) did zero entries
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


@built
def test_bn_relu_dropout_adds_covariate_vectors(monkeypatch):
    # the batch norm's input is y plus one row of each covariate's table per cell, added inside
    # the kernel: output, running statistics and the gradients by y, gamma, beta and both tables
    # against float64 torch, bit for bit on 1, 2 and 3 threads; y is not written; a code outside
    # its table raises IndexError
    monkeypatch.setattr(_kernels, "_MIN_PARALLEL", 0)
    gen = torch.Generator().manual_seed(8)
    n, h = 90, 150
    y = torch.randn(n, h, generator=gen) * 2
    tables = [torch.randn(3, h, generator=gen), torch.randn(5, h, generator=gen) * 4]
    codes = [torch.randint(3, (n,), generator=gen), torch.randint(5, (n,), generator=gen)]
    gamma, beta = torch.rand(h, generator=gen) + 0.5, torch.randn(h, generator=gen) * 0.5
    dout = torch.randn(n, h, generator=gen)
    lanes = torch.randint(-(2**15), 2**15, (n, h), dtype=torch.int16, generator=gen)
    threshold, scale = -26214, 65536 / 58982
    t64 = [t.double().requires_grad_() for t in tables]
    y64, g64, b64 = (t.double().requires_grad_() for t in (y, gamma, beta))
    rm_ref, rv_ref = torch.zeros(h, dtype=torch.float64), torch.ones(h, dtype=torch.float64)
    ins = y64 + t64[0][codes[0]] + t64[1][codes[1]]
    bn = torch.nn.functional.batch_norm(ins, rm_ref, rv_ref, g64, b64, True, 0.1, 1e-3)
    ref = torch.relu(bn) * ((lanes >= threshold).double() * float(torch.tensor(scale)))
    ref.backward(dout.double())
    y_before, covs = y.clone(), list(zip(tables, codes))

    def run():
        rm, rv = torch.zeros(h), torch.ones(h)
        out, mean, invstd = _kernels.bn_relu_drop_forward(
            y, gamma, beta, rm, rv, 0.1, 1e-3, lanes, threshold, scale, covs
        )
        grads = _kernels.bn_relu_drop_backward(y, out, gamma, mean, invstd, scale, dout, covs)
        return out, rm, rv, *grads

    results = _on_1_2_3_threads(run)
    assert torch.equal(y, y_before)
    out, rm, rv, *grads = results[0]
    assert len(grads) == 5
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rm.double(), rm_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rv.double(), rv_ref, rtol=1e-6, atol=1e-6)
    for got, leaf in zip(grads, (y64, g64, b64, *t64), strict=True):
        torch.testing.assert_close(
            got.double(), leaf.grad, rtol=1e-4, atol=1e-5 * leaf.grad.abs().max()
        )
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))
    bad = [(tables[0], codes[0]), (tables[1], torch.full((n,), 5))]
    with pytest.raises(IndexError, match="covariate code"):
        _kernels.bn_relu_drop_forward(y, gamma, beta, rm, rv, 0.1, 1e-3, None, 0, 1.0, bad)


@built
@pytest.mark.parametrize("dropout_rate", [0.1, 0.0])
def test_fc_layers_fused_block_matches_torch_modules(dropout_rate):
    # FCLayers in training runs BatchNorm1d → ReLU → Dropout in one compiled pass (float32 on
    # the CPU): the same outputs, gradients, running statistics and batch counts as the torch
    # modules in float64 (which the fused pass does not take), with the same dropout masks
    def run(fused, dtype):
        torch.manual_seed(0)
        fc = FCLayers(30, 16, n_cat_list=[3], n_layers=2, n_hidden=40, dropout_rate=dropout_rate)
        fc._fusable = fused
        fc.to(dtype)
        x = torch.randn(50, 30).to(dtype)
        out = fc(x, torch.randint(3, (50,)))
        (out * torch.linspace(-1, 1, 16, dtype=dtype)).sum().backward()
        return out, [p.grad for p in fc.parameters()], list(fc.buffers())

    calls = []
    original = nn_module._BatchNormReLUDropout.apply
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(
            nn_module._BatchNormReLUDropout, "apply", lambda *a: calls.append(1) or original(*a)
        )
        fused = run(True, torch.float32)
        assert len(calls) == 2  # both layers
        reference = run(True, torch.float64)
        assert len(calls) == 2  # float64 runs the torch modules
    torch.testing.assert_close(fused[0].double(), reference[0], rtol=1e-5, atol=1e-5)
    # gradients of O(1) (the biases before batch norm: 0 up to rounding)
    for a, b in zip(fused[1], reference[1]):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)
    for a, b in zip(fused[2], reference[2]):  # running statistics, and num_batches_tracked
        torch.testing.assert_close(a.to(b.dtype), b, rtol=1e-5, atol=1e-6)


def test_fc_layers_fused_block_leaves_the_other_cases_to_torch():
    fc = FCLayers(10, 8, n_hidden=8)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        fc(torch.randn(1, 10))  # torch's own error for a batch of one in training
    fc.eval()
    x = torch.randn(5, 10)
    bn, lin = fc.post[0][0], fc.linears[0]
    expected = torch.relu(bn(x @ lin.weight + lin.bias))
    torch.testing.assert_close(fc(x), expected)


def _splitmix64(seed: int, k: int) -> int:
    """Output k of SplitMix64 from ``seed``, in Python integers (Steele, Lea and Flood 2014)."""
    mask = 2**64 - 1
    z = (seed + (k + 1) * 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


@built
@pytest.mark.parametrize("n", [1, 4, 7, 4099])
def test_random_lanes_are_splitmix64(n):
    seed = -1234567890123456789  # a negative int64 seed is taken modulo 2^64
    lanes = _kernels.random_lanes((n,), seed).numpy().astype(np.int64)
    words = [_splitmix64(seed % 2**64, k) for k in range((n + 3) // 4)]
    expected = [(words[i // 4] >> (16 * (i % 4))) & 0xFFFF for i in range(n)]
    expected = [v - 2**16 if v >= 2**15 else v for v in expected]  # as int16
    assert lanes.tolist() == expected


@built
@pytest.mark.parametrize("x", [0.3, 1.0, 2.5, 4095.0, 4095.5, 4096.0, 1e4 + 0.25])
def test_counts_beyond_the_log_factorial_table_and_non_integers(x):
    # log(x!) comes from a table for integer counts below 4,096, from lgamma otherwise; the
    # reference is the gamma-function form in float64 (scipy's pmf is -inf at non-integers)
    mu, theta, pi = 0.7 * x + 1.0, 2.0, -1.5
    x32 = float(np.float32(x))
    log_nb = (
        special.gammaln(x32 + theta)
        - special.gammaln(theta)
        - special.gammaln(x32 + 1)
        + theta * np.log(theta / (theta + mu))
        + x32 * np.log(mu / (theta + mu))
    )
    val, idx = torch.tensor([x32]), torch.zeros(1, dtype=torch.int64)
    for zi, ref in ((None, log_nb), (torch.tensor([[pi]]), log_nb - np.logaddexp(0, pi))):
        out = _kernels.nb_zinb_log_prob_sum(
            torch.tensor([[mu]]), torch.tensor([theta]), zi, val, idx, idx, 1e-8, False
        )[0]
        np.testing.assert_allclose(out.item(), ref, rtol=1e-6)


def _softmax_inputs(seed, n_cells=12, n_genes=300):
    """Logits with a wide spread (some proportions below e^-80 of the row's largest), libraries
    (one cell without counts), per-gene theta, dropout logits and counts drawn from them."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n_cells, n_genes, generator=g) * 3
    logits[0, :10] -= 120.0  # below the clamp of the exponent
    logits[1] += 50.0  # a shift the softmax must not see
    library = torch.exp(torch.randn(n_cells, 1, generator=g) + 7)
    library[2] = 0.0  # a cell without counts
    theta = torch.exp(torch.randn(n_genes, generator=g))
    pi = torch.randn(n_cells, n_genes, generator=g) * 2
    mu = library * torch.softmax(logits.double(), -1).float()
    x = torch.poisson(mu, generator=g)
    return logits, library, theta, pi, x


@built
@pytest.mark.parametrize("name", ["nb", "zinb"])
@pytest.mark.parametrize("seed", [0, 1])
def test_softmax_in_the_kernel_matches_float64_torch(name, seed):
    # mu = library * softmax(logits) evaluated inside the kernel: row sums and the gradients by
    # the logits, the library, theta and pi, against the torch code in float64
    logits, library, theta, pi, x = _softmax_inputs(seed)
    weights = torch.rand(len(x), generator=torch.Generator().manual_seed(seed)) + 0.5
    nz = torch.nonzero(x, as_tuple=True)
    cls = NegativeBinomial if name == "nb" else ZeroInflatedNegativeBinomial

    def run(dtype, fused):
        params = [p.to(dtype).clone().requires_grad_() for p in (logits, library, theta, pi)]
        extra = {} if name == "nb" else {"zi_logits": params[3]}
        dist = cls(scale_logits=params[0], library=params[1], theta=params[2], **extra)
        if not fused:
            dist.mu  # noqa: B018 (computing mu first sends log_prob_sum to the torch code)
        out = dist.log_prob_sum(x.to(dtype), nz)
        wrt = params if name == "zinb" else params[:3]
        grads = torch.autograd.grad((out * weights.to(dtype)).sum(), wrt)
        return out, grads

    out, grads = run(torch.float32, fused=True)
    assert out.grad_fn.name() == "_FusedLogProbSumBackward"
    ref, ref_grads = run(torch.float64, fused=False)
    assert "Fused" not in ref.grad_fn.name()
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-3)
    for g, r in zip(grads, ref_grads, strict=True):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-4 * r.abs().max().item())
    # the cell without counts: mu and the logits' gradient vanish, the library's does not
    assert (grads[0][2] == 0).all() and grads[1][2].item() < 0


@built
def test_softmax_kernel_without_gradients_and_its_mu():
    logits, library, theta, pi, x = _softmax_inputs(3)
    nz = torch.nonzero(x, as_tuple=True)
    dist = ZeroInflatedNegativeBinomial(
        scale_logits=logits, library=library, theta=theta, zi_logits=pi
    )
    with torch.no_grad():
        plain = dist.log_prob_sum(x, nz)
    assert plain.grad_fn is None
    mu = dist.mu  # computed once, by torch, and kept
    assert dist.mu is mu
    torch.testing.assert_close(mu, library * torch.softmax(logits, -1))
    torch.testing.assert_close(plain, dist.log_prob(x).sum(-1), rtol=1e-5, atol=1e-3)


@built
@pytest.mark.parametrize("name", ["nb", "zinb"])
@pytest.mark.parametrize("per_entry", [False, True])
def test_softmax_kernel_for_an_expected_row_gradient(name, per_entry, monkeypatch):
    # with row_grad c the kernel returns the gradients of c times the sum of the row sums, a
    # per-gene theta's summed over the rows (a per-entry one's not): the unit gradients times c,
    # on 1, 2 and 3 threads bit for bit, with entries in any order and stored zeros; a row whose
    # ZINB p(0) underflows takes the unit call and is scaled in torch
    monkeypatch.setattr(_kernels, "_MIN_PARALLEL", 0)
    logits, library, theta, pi, x = _softmax_inputs(5, n_cells=37)
    theta[:5] = 20.0
    if per_entry:  # one theta per entry: the per-gene values times a factor per entry
        gen = torch.Generator().manual_seed(6)
        theta = theta * torch.exp(torch.randn(x.shape, generator=gen) * 0.5)
        theta[5, :5] = 20.0
    logits[5, :5] = 40.0  # row 5's counts on genes 0-4: mu ~ 2e5, theta log(1 + mu / theta) > 80
    library[5] = 1e6
    pi = None if name == "nb" else pi
    gen = torch.Generator().manual_seed(5)
    row, col = torch.nonzero(x, as_tuple=True)
    zr, zc = torch.nonzero(x == 0, as_tuple=True)
    perm = torch.randperm(len(row) + 40, generator=gen)
    row, col = torch.cat([row, zr[:40]])[perm], torch.cat([col, zc[:40]])[perm]
    val, lib, c = x[row, col], library.reshape(-1), -1.0 / 37
    args = (logits, lib, theta, None, val, row, col, 1e-8, True)
    for underflow in [False, True] if name == "zinb" else [False]:
        if pi is not None:
            pi[5, :5] = -120.0 if underflow else 0.0
            args = (*args[:3], pi, *args[4:])
        out, gmu, gpi, gth, glib = _kernels.softmax_nb_zinb_log_prob_sum(*args)
        results = _on_1_2_3_threads(
            lambda a=args: _kernels.softmax_nb_zinb_log_prob_sum(*a, row_grad=c)
        )
        for other in results[1:]:
            assert all(a is b or torch.equal(a, b) for a, b in zip(results[0], other))
        s_out, s_gmu, s_gpi, s_gth, s_glib = results[0]
        assert torch.equal(s_out, out) and s_gth.shape == theta.shape
        torch.testing.assert_close(s_gmu, gmu * c, rtol=1e-6, atol=1e-6 * gmu.abs().max() * -c)
        torch.testing.assert_close(s_glib, glib * c)
        if pi is not None:
            torch.testing.assert_close(s_gpi, gpi * c)
        th_sum = gth.double().sum(0) * c if not per_entry else gth.double() * c
        atol = 1e-6 * th_sum.abs().max()
        torch.testing.assert_close(s_gth.double(), th_sum, rtol=1e-5, atol=atol)


@built
@pytest.mark.parametrize("name", ["nb", "zinb"])
def test_expected_row_gradient_hint_keeps_the_gradients_exact(name, monkeypatch):
    # log_prob_sum(row_grad=c): a backward pass that sends c to every row returns the kernel's
    # gradients (one kernel call in all), close to float64 torch; any other row gradient gets the
    # unit gradients computed again: the same bits as without the hint (two calls)
    logits, library, theta, pi, x = _softmax_inputs(2)
    nz = torch.nonzero(x, as_tuple=True)
    cls = NegativeBinomial if name == "nb" else ZeroInflatedNegativeBinomial
    calls = []
    kernel = _kernels.softmax_nb_zinb_log_prob_sum
    monkeypatch.setattr(
        _kernels, "softmax_nb_zinb_log_prob_sum", lambda *a, **k: calls.append(1) or kernel(*a, **k)
    )

    def grads(dtype, weights, **hint):
        params = [p.to(dtype).clone().requires_grad_() for p in (logits, library, theta, pi)]
        extra = {} if name == "nb" else {"zi_logits": params[3]}
        dist = cls(scale_logits=params[0], library=params[1], theta=params[2], **extra)
        if dtype == torch.float64:
            dist.mu  # noqa: B018 (the torch code)
        out = dist.log_prob_sum(x.to(dtype), nz, **hint)
        wrt = params if name == "zinb" else params[:3]
        return torch.autograd.grad((out * weights.to(dtype)).sum(), wrt)

    n = len(x)
    mean = torch.full((n,), -1.0 / n)
    calls.clear()
    fast = grads(torch.float32, mean, row_grad=-1.0 / n)
    assert len(calls) == 1
    for g, r in zip(fast, grads(torch.float64, mean), strict=True):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-4 * r.abs().max().item())
    weights = torch.rand(n, generator=torch.Generator().manual_seed(2)) + 0.5
    calls.clear()
    other = grads(torch.float32, weights, row_grad=-1.0 / n)
    assert len(calls) == 2
    calls.clear()
    plain = grads(torch.float32, weights)
    assert len(calls) == 1
    assert all(torch.equal(a, b) for a, b in zip(other, plain, strict=True))


@built
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("per_entry", [False, True])
def test_protein_mixture_kernel_matches_float64_torch(seed, per_entry):
    # totalVI's NB mixture with a shared theta, per protein or per entry (per batch and
    # protein): values and the gradients by both means, the mixing logits and theta, against the
    # torch code in float64, at extremes too
    g = torch.Generator().manual_seed(seed)
    n_cells, n_proteins = 40, 30
    mu1 = torch.exp(torch.randn(n_cells, n_proteins, generator=g) * 2)
    fore = torch.rand(n_cells, n_proteins, generator=g) * 5 + 1
    pi = torch.randn(n_cells, n_proteins, generator=g) * 3
    theta = torch.exp(torch.randn(n_proteins, generator=g) * 2)
    if per_entry:
        theta = theta * torch.exp(torch.randn(n_cells, n_proteins, generator=g))
    mu1[0, :3] = torch.tensor([0.0, 1e-12, 1e6])  # an underflowed, a floored and a huge mean
    pi[1, :2] = torch.tensor([-60.0, 60.0])  # all foreground, all background
    theta[..., 4] = 1e-10  # below the floor: no gradient
    y = torch.poisson(torch.where(torch.rand(mu1.shape, generator=g) < 0.5, mu1, mu1 * fore))
    y[2, :2] = torch.tensor([5000.0, 2.5])  # past the log-factorial table; not an integer
    weights = torch.rand(mu1.shape, generator=g)

    def run(dtype):
        params = [t.to(dtype).clone().requires_grad_() for t in (mu1, fore, pi, theta)]
        mix = NegativeBinomialMixture(params[0], params[0] * params[1], params[3], params[2])
        lp = mix.log_prob(y.to(dtype))
        return lp, torch.autograd.grad((lp * weights.to(dtype)).sum(), params)

    lp, grads = run(torch.float32)
    assert lp.grad_fn.name() == "_FusedMixtureLogProbBackward"
    ref, ref_grads = run(torch.float64)  # float64: the torch code, log_mixture_nb
    assert "Fused" not in ref.grad_fn.name()
    torch.testing.assert_close(lp.double(), ref, rtol=1e-5, atol=1e-4)
    for got, exp in zip(grads, ref_grads, strict=True):
        assert torch.isfinite(got).all() and got.shape == exp.shape
        torch.testing.assert_close(got.double(), exp, rtol=1e-4, atol=1e-5 * exp.abs().max())
    assert (grads[3][..., 4] == 0.0).all()
    with torch.no_grad():  # no gradients asked: the same values
        mix = NegativeBinomialMixture(mu1, mu1 * fore, theta, pi)
        torch.testing.assert_close(mix.log_prob(y), lp.detach())


@built
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("per_entry", [False, True])
def test_protein_terms_kernel_matches_float64_torch(seed, per_entry, monkeypatch):
    # totalVI's per-cell protein reconstruction and background KL in one kernel: values and the
    # gradients by both means, theta (per protein, or per entry: per batch and protein), the
    # mixing logits, alpha, beta and the prior's mean and log scale, for random upstream
    # gradients, against the torch code in float64; proteins a batch did not measure count
    # nowhere; bit-identical on 1, 2 and 3 threads
    from cellvae.module import TOTALVAE

    monkeypatch.setattr(_kernels, "_MIN_PARALLEL", 0)
    g = torch.Generator().manual_seed(seed)
    n_cells, n_proteins, n_batch = 60, 17, 3
    module = TOTALVAE(10, n_proteins, n_batch=n_batch, use_observed_lib_size=True)
    with torch.no_grad():
        module.prior_mean.normal_(generator=g)
        module.prior_log_scale.normal_(0.0, 0.5, generator=g)
        module.protein_batch_mask[1, :5] = False
    mu1 = torch.exp(torch.randn(n_cells, n_proteins, generator=g) * 2)
    fore = torch.rand(n_cells, n_proteins, generator=g) * 5 + 1
    pi = torch.randn(n_cells, n_proteins, generator=g) * 3
    theta = torch.exp(torch.randn(n_proteins, generator=g))
    if per_entry:
        theta = theta * torch.exp(torch.randn(n_cells, n_proteins, generator=g))
    alpha = torch.randn(n_cells, n_proteins, generator=g)
    beta = torch.exp(torch.randn(n_cells, n_proteins, generator=g) * 0.5)
    y = torch.poisson(mu1 * fore, generator=g)
    y[module.protein_batch_mask[torch.arange(n_cells) % n_batch] == 0] = float("nan")  # unmeasured
    codes = torch.arange(n_cells) % n_batch
    ups = torch.rand(2, n_cells, generator=g)

    def run(dtype):
        m = module.to(dtype)
        m.zero_grad(set_to_none=True)
        params = [t.to(dtype).clone().requires_grad_() for t in (mu1, fore, theta, pi, alpha, beta)]
        gen = {
            "py": NegativeBinomialMixture(params[0], params[0] * params[1], params[2], params[3]),
            "py_": {"back_alpha": params[4], "back_beta": params[5]},
        }
        y_in = y.to(dtype) if dtype == torch.float32 else torch.nan_to_num(y.double())
        rec, kl = m.protein_terms(gen, y_in, codes)
        ((rec * ups[0].to(dtype)).sum() + (kl * ups[1].to(dtype)).sum()).backward()
        grads = [p.grad for p in params] + [m.prior_mean.grad, m.prior_log_scale.grad]
        return rec, kl, [t.detach().clone() for t in grads]

    rec, kl, grads = run(torch.float32)
    assert rec.grad_fn.name() == "_ProteinTermsBackward"
    ref_rec, ref_kl, ref_grads = run(torch.float64)  # the torch code
    assert "ProteinTerms" not in ref_rec.grad_fn.name()
    torch.testing.assert_close(rec.double(), ref_rec.detach(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(kl.double(), ref_kl.detach(), rtol=1e-5, atol=1e-4)
    for got, exp in zip(grads, ref_grads, strict=True):
        assert torch.isfinite(got).all() and got.shape == exp.shape
        torch.testing.assert_close(got.double(), exp, rtol=1e-4, atol=1e-5 * exp.abs().max())
    unmeasured = module.protein_batch_mask[codes] == 0
    cell_grads = grads[:6] if per_entry else grads[:2] + grads[3:6]
    assert unmeasured.any() and all((g[unmeasured] == 0).all() for g in cell_grads)

    module.float()
    gen = {
        "py": NegativeBinomialMixture(mu1, mu1 * fore, theta, pi),
        "py_": {"back_alpha": alpha, "back_beta": beta},
    }
    with torch.no_grad():
        results = _on_1_2_3_threads(lambda: module.protein_terms(gen, y, codes))
    assert all(torch.equal(a, b) for r in results[1:] for a, b in zip(results[0], r))
    torch.testing.assert_close(results[0][0], rec.detach())
    strided = torch.stack([codes, codes.flip(0)], 1)[:, 0]  # a column view: stride 2
    with torch.no_grad():
        assert all(map(torch.equal, module.protein_terms(gen, y, strided), results[0]))
    with pytest.raises(IndexError, match="batch code"):
        module.protein_terms(gen, y, codes + n_batch)


@built
def test_bf16_split_widen_is_torchs_widening_plus_bias(monkeypatch):
    # bfloat16 product (B, 37 + 300 + 5) split into float32 parts plus their biases (one
    # without): bit for bit torch's part.float() + bias, parts of any width (vectors of 16 and
    # a tail), the same on 1, 2 and 3 threads
    monkeypatch.setattr(_kernels, "_MIN_PARALLEL", 0)
    gen = torch.Generator().manual_seed(7)
    sizes = [37, 300, 5]
    out = (torch.randn(23, sum(sizes), generator=gen) * 30).bfloat16()
    biases = [torch.randn(37, generator=gen), None, torch.randn(5, generator=gen)]
    expected = [
        p.float() if b is None else p.float() + b
        for p, b in zip(out.split(sizes, 1), biases, strict=True)
    ]
    results = _on_1_2_3_threads(lambda: _kernels.bf16_split_widen(out, sizes, biases))
    for parts in results:
        assert [p.shape for p in parts] == [(23, n) for n in sizes]
        assert all(p.is_contiguous() and torch.equal(p, e) for p, e in zip(parts, expected))


@built
def test_bf16_join_narrow_rounds_like_torch_and_sums_columns(monkeypatch):
    # float32 gradients (B, n_i) side by side in one bfloat16 block: torch's round to nearest
    # even bit for bit (ties both ways, the largest finite float32, infinities, NaN stays NaN),
    # columns in blocks of 256 with tails; the column sums against float64 where asked, None
    # elsewhere; the same bits on 1, 2 and 3 threads
    monkeypatch.setattr(_kernels, "_MIN_PARALLEL", 0)
    gen = torch.Generator().manual_seed(8)
    grads = [torch.randn(19, n, generator=gen) * 100 for n in (300, 17, 513)]
    ties = torch.tensor([0x3F808000, 0x3F818000, 0xBF808000, 0x7F7FFFFF], dtype=torch.int64)
    grads[1][0, :4] = ties.to(torch.int32).view(torch.float32)  # 1 + 2^-8 etc.: exact ties
    grads[1][1, :3] = torch.tensor([float("inf"), -float("inf"), float("nan")])
    results = _on_1_2_3_threads(lambda: _kernels.bf16_join_narrow(grads, [True, True, False]))
    block, sums = results[0]
    expected = torch.cat(grads, 1).to(torch.bfloat16)
    nan = expected.isnan()
    assert block.shape == expected.shape and torch.equal(block.isnan(), nan)
    assert torch.equal(block[~nan], expected[~nan])
    assert block[0, 300] == 1.0 and block[0, 301] == 1.015625  # ties to the even neighbour
    assert sums[2] is None and sums[1][0] == float("inf") and sums[1][2].isnan()
    for got, g in [(sums[0], grads[0]), (sums[1][3:], grads[1][:, 3:])]:  # float32 sums
        torch.testing.assert_close(got.double(), g.double().sum(0), rtol=1e-6, atol=1e-3)
    for other_block, other_sums in results[1:]:
        assert torch.equal(other_block.view(torch.int16), block.view(torch.int16))
        for a, b in zip(other_sums[:2], sums[:2]):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@built
@pytest.mark.parametrize("shape", [(37, 301), (6, 130), (256, 256)])
def test_batch_norm_kernel_makes_the_lanes_of_its_seed(shape, monkeypatch):
    # the dropout's int16 values made inside the kernel from a seed are those random_lanes
    # writes for it: the same outputs and running statistics bit for bit, rows whose flat start
    # is not a multiple of four included, on 1, 2 and 3 threads
    monkeypatch.setattr(_kernels, "_MIN_PARALLEL", 0)
    gen = torch.Generator().manual_seed(9)
    n, h = shape
    y = torch.randn(n, h, generator=gen) * 3
    gamma, beta = torch.rand(h, generator=gen) + 0.5, torch.randn(h, generator=gen)
    table, codes = torch.randn(3, h, generator=gen), torch.randint(3, (n,), generator=gen)
    seed, threshold, scale = -(2**62) - 12345, -19661, 1 / 0.8

    def run(lanes, **kw):
        rm, rv = torch.zeros(h), torch.ones(h)
        covs = [(table, codes)]
        out = _kernels.bn_relu_drop_forward(
            y, gamma, beta, rm, rv, 0.1, 1e-3, lanes, threshold, scale, covs, **kw
        )
        return (*out, rm, rv)

    pairs = _on_1_2_3_threads(
        lambda: [run(_kernels.random_lanes(shape, seed)), run(None, seed=seed)]
    )
    results = [r for pair in pairs for r in pair]
    first = results[0]
    assert (first[0] == 0).float().mean() > 0.3  # ReLU and dropout both zero entries
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(first, other))


def _normal_sample_reference(q, w_m, b_m, w_v, b_v, noise, var_eps):
    """The encoder's heads, sample and KL to N(0, I) in float64 torch operators."""
    q_m = q @ w_m.t() + b_m
    q_v = torch.exp(q @ w_v.t() + b_v) + var_eps
    z = q_m + q_v.sqrt() * noise
    kl = 0.5 * (q_v + q_m**2 - torch.log(q_v) - 1.0).sum(-1)
    return q_m, q_v, z, kl


@built
@pytest.mark.parametrize("used", ["all", "z and kl", "z", "kl", "q_m and q_v"])
def test_normal_sample_node_matches_float64_torch(used):
    # values and gradients of the fused heads + sample + KL against float64 torch, on random
    # inputs with variances from ~e-6 (below var_eps) to ~e3; outputs left out of the loss send
    # no gradient (None) to the backward pass
    g = torch.Generator().manual_seed(5)
    n, h, lat = 37, 24, 6
    q = torch.randn(n, h, generator=g)
    w_m, w_v = torch.randn(lat, h, generator=g) * 0.3, torch.randn(lat, h, generator=g) * 0.5
    b_m, b_v = torch.randn(lat, generator=g), torch.randn(lat, generator=g) * 2
    noise = torch.randn(n, lat, generator=g)
    ups = [torch.randn(n, lat, generator=g), torch.randn(n, lat, generator=g)]
    ups += [torch.randn(n, lat, generator=g), torch.rand(n, generator=g)]
    mask = {
        "all": (1, 1, 1, 1), "z and kl": (0, 0, 1, 1), "z": (0, 0, 1, 0), "kl": (0, 0, 0, 1),
        "q_m and q_v": (1, 1, 0, 0),
    }[used]  # fmt: skip
    results = []
    for fused in (True, False):
        dt = torch.float32 if fused else torch.float64
        leaves = [t.to(dt).clone().requires_grad_() for t in (q, w_m, b_m, w_v, b_v)]
        args = (*leaves, noise.to(dt), 1e-4)
        fn = nn_module._NormalSample.apply if fused else _normal_sample_reference
        outs = fn(*args)
        loss = sum((o * u.to(dt)).sum() for o, u, k in zip(outs, ups, mask) if k)
        loss.backward()
        results.append([o.detach().double() for o in outs] + [t.grad.double() for t in leaves])
    for got, ref in zip(*results):  # float32 sums of up to 37 terms of either sign
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
    assert float(results[1][5].abs().sum()) > 0  # the input's gradient is not trivially zero


def _fused_and_torch(monkeypatch, enc, *args, seed: int):
    """``enc.forward_kl(*args)`` with and without the kernels, each after ``manual_seed``."""
    outs = []
    for enabled in (True, False):
        monkeypatch.setattr(_kernels, "enabled", enabled)
        torch.manual_seed(seed)
        outs.append(enc.forward_kl(*args))
    return outs


@built
def test_encoder_fused_sample_draws_what_the_torch_path_draws(monkeypatch):
    # the same seed gives the same noise, so the same z, on both paths; the KL comes with the
    # fused path and is what kl_normal gives on the torch path (no dropout: the hidden layer's
    # masks draw differently with and without the kernels)
    from cellvae.module._base import kl_normal

    enc = nn_module.Encoder(30, 5, n_cat_list=[3], n_hidden=16, dropout_rate=0.0).train()
    x, c = torch.randn(20, 30), torch.randint(0, 3, (20,))
    (m1, v1, z1, kl1), (m0, v0, z0, kl0) = _fused_and_torch(monkeypatch, enc, x, c, seed=7)
    assert kl0 is None and kl1 is not None
    for a, b in ((m1, m0), (v1, v0), (z1, z0), (kl1, kl_normal(m0, v0))):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(z1, m1)  # a sample, not the mean


@built
@pytest.mark.parametrize("latent_library", [True, False])
def test_totalvi_encoder_fused_heads_draw_what_the_torch_path_draws(monkeypatch, latent_library):
    # logistic-normal z and the latent library: the same values on both paths for one seed,
    # and the KL of z (before the softmax) from the fused node equals kl_normal's
    from cellvae.module._base import kl_normal

    enc = nn_module.EncoderTOTALVI(
        30, 5, n_cat_list=[2], n_hidden=16, dropout_rate=0.0, latent_library=latent_library
    ).train()
    x, c = torch.randn(20, 30), torch.randint(0, 2, (20,))
    fused, plain = _fused_and_torch(monkeypatch, enc, x, c, seed=3)
    assert plain[6] is None and fused[6] is not None
    torch.testing.assert_close(fused[6], kl_normal(plain[0], plain[1]), rtol=1e-5, atol=1e-5)
    flat = lambda o: [*o[:4], *o[4].values(), *o[5].values()]
    assert (fused[2] is None) == (not latent_library)  # ql_m only with a latent library
    for a, b in zip(flat(fused), flat(plain), strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert torch.allclose(fused[4]["z"].sum(-1), torch.ones(20))  # the softmax of the sample
    with torch.no_grad():  # the heads' definitions, written out
        h = enc.encoder(x, c)
        expected = [enc.z_mean_encoder(h), torch.exp(enc.z_var_encoder(h)) + 1e-4]
        if latent_library:
            hl = enc.l_encoder(x, c)
            expected += [enc.l_mean_encoder(hl), torch.exp(enc.l_var_encoder(hl)) + 1e-4]
    for a, b in zip(fused[:4], expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _stacks(widths, dropout_rate, n_layers=1):
    torch.manual_seed(0)
    return [
        FCLayers(
            7, w, n_cat_list=[3, 1, 4], n_layers=n_layers, n_hidden=w, dropout_rate=dropout_rate
        )
        for w in widths
    ]


def _run_stacks(stacks, x, cats, side_by_side):
    """Outputs, input and parameter gradients, and buffers after one training pass."""
    if side_by_side:
        outs = parallel_stacks(stacks, x, *cats)
    else:
        outs = [s(x, *cats) for s in stacks]
    loss = sum((o * torch.linspace(-1, 1, o.shape[1])).sum() for o in outs)
    params = [p for s in stacks for p in s.parameters()]
    grads = torch.autograd.grad(loss, [x, *params])
    return outs, grads, [b.clone() for s in stacks for b in s.buffers()]


@built
def test_parallel_stacks_run_side_by_side_as_each_stack_alone():
    # one-layer stacks of the same form (here of different widths) reading the same input are
    # one product and one fused batch norm pass: the same outputs, gradients, running statistics
    # and batch counts as each stack run on its own
    widths = [16, 8, 16, 5]
    stacks, alone = _stacks(widths, 0.0), _stacks(widths, 0.0)
    x = torch.randn(40, 7, requires_grad=True)
    cats = [torch.randint(3, (40, 1)), torch.zeros(40, 1), torch.randint(4, (40, 1))]
    calls = []
    original = nn_module._BatchNormReLUDropout.apply
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(
            nn_module._BatchNormReLUDropout, "apply", lambda *a: calls.append(1) or original(*a)
        )
        joined = _run_stacks(stacks, x, cats, True)
        assert len(calls) == 1
        single = _run_stacks(alone, x, cats, False)
        assert len(calls) == 1 + len(widths)
    assert [o.shape[1] for o in joined[0]] == widths
    for a, b in zip(joined[0], single[0], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    for a, b in zip(joined[1], single[1], strict=True):  # of O(1); the biases' 0 up to rounding
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert len(joined[2]) == 3 * len(widths)  # running mean, variance, batch count each
    for a, b in zip(joined[2], single[2], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert all(int(s.post[0][0].num_batches_tracked) == 1 for s in stacks)


@built
def test_parallel_stacks_drop_each_column_on_its_own():
    # with dropout the joined pass draws one mask over all columns: each stack's share of it
    # is a fresh mask (not the first stack's repeated) at the stack's rate, scaled by 1 / (1 - p)
    stacks = _stacks([64, 64], 0.5)
    stacks[1].load_state_dict(stacks[0].state_dict())  # the same values before the dropout
    a, b = parallel_stacks(stacks, torch.randn(400, 7), torch.randint(3, (400, 1)))
    kept_a, kept_b = a > 0, b > 0
    assert not torch.equal(kept_a, kept_b)
    torch.testing.assert_close(a[kept_a & kept_b], b[kept_a & kept_b])
    # among the entries that passed the ReLU, each is kept with probability 1/2: of those that
    # either stack kept, a kept 2/3
    assert abs(kept_a.sum() / (kept_a | kept_b).sum() - 2 / 3) < 0.05
    assert abs(kept_b.sum() / (kept_a | kept_b).sum() - 2 / 3) < 0.05


@built
def test_parallel_stacks_leave_other_stacks_to_themselves():
    # deeper stacks, stacks of different forms, and stacks in evaluation each run on their own
    x, cats = torch.randn(30, 7), [torch.randint(3, (30, 1))]
    one_dropout_off = _stacks([8, 8], 0.1)
    one_dropout_off[1].post[0][2].eval()
    cases = [
        _stacks([8, 8], 0.0, n_layers=2),
        [*_stacks([8], 0.0), *_stacks([8], 0.1)],
        one_dropout_off,
        [s.eval() for s in _stacks([8, 4], 0.1)],
    ]
    for stacks in cases:
        alone = copy.deepcopy(stacks)
        torch.manual_seed(1)
        outs = parallel_stacks(stacks, x, *cats)
        torch.manual_seed(1)
        for out, s in zip(outs, alone, strict=True):
            torch.testing.assert_close(out, s(x, *cats), rtol=0, atol=0)
