"""Tests for cellvae.distributions against independent float64 scipy references."""

import itertools

import numpy as np
import pytest
import torch
from scipy import special, stats

from cellvae import _kernels, distributions
from cellvae._sparse import CSRBatch
from cellvae.distributions import (
    NegativeBinomial,
    NegativeBinomialMixture,
    Normal,
    Poisson,
    ZeroInflatedNegativeBinomial,
    log_mixture_nb,
    log_nb_positive,
    log_zinb_positive,
)

# --------------------------------------------------------------------------------------------------
# inputs and independent references
# --------------------------------------------------------------------------------------------------


def _inputs(seed: int = 0, n: int = 3000) -> dict[str, np.ndarray]:
    """Random parameters over wide ranges plus every combination of the extremes."""
    rng = np.random.default_rng(seed)
    mu = 10 ** rng.uniform(-3, 4, n)
    theta = 10 ** rng.uniform(-4, 6, n)
    x = np.floor(10 ** rng.uniform(0, 5, n))
    near = rng.random(n) < 0.3  # counts near the mean, where the likelihood is large
    x[near] = rng.poisson(mu[near])
    x[rng.random(n) < 0.3] = 0
    # the extremes: x = 0 and 1e5, theta 1e-4 and 1e6, mu 1e-3 and 1e4, logits +-30
    grid = itertools.product([0.0, 1.0, 7.0, 1e5], [1e-3, 1.0, 1e4], [1e-4, 1.0, 1e6], [-30, 0, 30])
    gx, gmu, gtheta, gpi = np.array(list(grid)).T
    m = len(gx)
    return {
        "x": np.r_[x, gx],
        "mu": np.r_[mu, gmu],
        "mu2": np.r_[10 ** rng.uniform(-3, 4, n), 10 ** rng.uniform(-3, 4, m)],
        "theta": np.r_[theta, gtheta],
        "theta2": 10 ** rng.uniform(-4, 6, n + m),
        "pi": np.r_[rng.normal(0, 4, n), gpi],
        "loc": rng.normal(0, 10, n + m),
        "scale": 10 ** rng.uniform(-3, 3, n + m),
        "xn": np.r_[rng.normal(0, 1, n) * 10 ** rng.uniform(-3, 5, n), np.zeros(m)],
    }


def _ref_nb(x, mu, theta):
    return stats.nbinom.logpmf(x, theta, theta / (theta + mu))


def _ref_zinb(x, mu, theta, pi):
    log_drop, log_keep = special.log_expit(pi), special.log_expit(-pi)
    at_zero = np.logaddexp(log_drop, log_keep + _ref_nb(0.0, mu, theta))
    return np.where(x == 0, at_zero, log_keep + _ref_nb(x, mu, theta))


def _ref_mixture(x, mu1, mu2, theta1, theta2, pi):
    return np.logaddexp(
        special.log_expit(pi) + _ref_nb(x, mu1, theta1),
        special.log_expit(-pi) + _ref_nb(x, mu2, theta2),
    )


def _gl_mag(x, theta):
    """Magnitude of the lgamma terms that cancel in log NB (sets the float32 error scale)."""
    return (
        np.abs(special.gammaln(x + theta))
        + np.abs(special.gammaln(theta))
        + np.abs(special.gammaln(x + 1))
    )


def _nb_mag(x, mu, theta):
    log_sum = np.log(theta + mu)
    return (
        _gl_mag(x, theta)
        + x * (np.abs(np.log(mu)) + np.abs(np.log(theta)) + np.abs(log_sum))
        + theta * np.log1p(mu / theta)
    )


def _softplus_mag(pi):
    """Magnitude of the softplus terms of the zero-inflation / mixture weights."""
    return np.logaddexp(0, pi) + np.logaddexp(0, -pi)


# name -> (torch log-likelihood from tensors, float64 reference, magnitude for float32 tolerance)
CASES = {
    "nb": (
        lambda t: NegativeBinomial(t["mu"], t["theta"]).log_prob(t["x"]),
        lambda a: _ref_nb(a["x"], a["mu"], a["theta"]),
        lambda a: _nb_mag(a["x"], a["mu"], a["theta"]),
    ),
    "zinb": (
        lambda t: ZeroInflatedNegativeBinomial(t["mu"], t["theta"], t["pi"]).log_prob(t["x"]),
        lambda a: _ref_zinb(a["x"], a["mu"], a["theta"], a["pi"]),
        lambda a: _nb_mag(a["x"], a["mu"], a["theta"]) + _softplus_mag(a["pi"]),
    ),
    "poisson": (
        lambda t: Poisson(t["mu"]).log_prob(t["x"]),
        lambda a: stats.poisson.logpmf(a["x"], a["mu"]),
        lambda a: a["x"] * np.abs(np.log(a["mu"])) + a["mu"] + special.gammaln(a["x"] + 1),
    ),
    "normal": (
        lambda t: Normal(t["loc"], t["scale"]).log_prob(t["xn"]),
        lambda a: stats.norm.logpdf(a["xn"], a["loc"], a["scale"]),
        lambda a: ((a["xn"] - a["loc"]) / a["scale"]) ** 2 + np.abs(np.log(a["scale"])) + 1,
    ),
    "mixture_shared_theta": (
        lambda t: NegativeBinomialMixture(t["mu"], t["mu2"], t["theta"], t["pi"]).log_prob(t["x"]),
        lambda a: _ref_mixture(a["x"], a["mu"], a["mu2"], a["theta"], a["theta"], a["pi"]),
        lambda a: (
            _nb_mag(a["x"], a["mu"], a["theta"])
            + _nb_mag(a["x"], a["mu2"], a["theta"])
            + _softplus_mag(a["pi"])
        ),
    ),
    "mixture_two_thetas": (
        lambda t: NegativeBinomialMixture(
            t["mu"], t["mu2"], t["theta"], t["pi"], theta2=t["theta2"]
        ).log_prob(t["x"]),
        lambda a: _ref_mixture(a["x"], a["mu"], a["mu2"], a["theta"], a["theta2"], a["pi"]),
        lambda a: (
            _nb_mag(a["x"], a["mu"], a["theta"])
            + _nb_mag(a["x"], a["mu2"], a["theta2"])
            + _softplus_mag(a["pi"])
        ),
    ),
}


def _tensors(arrays, dtype):
    return {k: torch.tensor(v, dtype=dtype) for k, v in arrays.items()}


# --------------------------------------------------------------------------------------------------
# elementwise log-likelihood
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_log_prob_matches_scipy_float64(name):
    fn, ref_fn, _ = CASES[name]
    arrays = _inputs()
    ref = ref_fn(arrays)
    got = fn(_tensors(arrays, torch.float64)).numpy()
    assert np.isfinite(ref).all()
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("name", list(CASES))
def test_log_prob_float32_finite_and_close(name):
    fn, ref_fn, mag_fn = CASES[name]
    arrays = _inputs(seed=1)
    got = fn(_tensors(arrays, torch.float32))
    assert got.dtype == torch.float32
    got = got.double().numpy()
    assert np.isfinite(got).all()
    # float32 rounding of the terms that cancel: a few dozen ulps of their magnitude
    ref = ref_fn(arrays)
    err = np.abs(got - ref)
    assert (err <= 1e-5 * np.abs(ref) + 2e-6 * mag_fn(arrays)).all(), err.max()


def test_functional_forms_match_classes():
    t = _tensors(_inputs(seed=2, n=200), torch.float64)
    x, mu, mu2, theta, pi = t["x"], t["mu"], t["mu2"], t["theta"], t["pi"]
    torch.testing.assert_close(
        log_nb_positive(x, mu, theta), NegativeBinomial(mu, theta).log_prob(x)
    )
    torch.testing.assert_close(
        log_zinb_positive(x, mu, theta, pi),
        ZeroInflatedNegativeBinomial(mu, theta, pi).log_prob(x),
    )
    torch.testing.assert_close(
        log_mixture_nb(x, mu, mu2, theta, None, pi),
        NegativeBinomialMixture(mu, mu2, theta, pi).log_prob(x),
    )
    # the shared-theta shortcut equals the general two-theta path
    torch.testing.assert_close(
        log_mixture_nb(x, mu, mu2, theta, None, pi), log_mixture_nb(x, mu, mu2, theta, theta, pi)
    )


def test_nb_with_huge_theta_approaches_poisson():
    x = torch.arange(0, 60, dtype=torch.float64)[:, None]
    mu = torch.tensor([0.05, 1.0, 7.0, 30.0], dtype=torch.float64)
    pois = torch.tensor(stats.poisson.logpmf(x.numpy(), mu.numpy()))
    close = NegativeBinomial(mu, torch.full_like(mu, 1e9)).log_prob(x)
    far = NegativeBinomial(mu, torch.full_like(mu, 10.0)).log_prob(x)
    assert (close - pois).abs().max() < 1e-5
    assert (far - pois).abs().max() > 1e-2  # the check above is not vacuous


def test_zinb_with_very_negative_logits_approaches_nb():
    t = _tensors(_inputs(seed=3, n=500), torch.float64)
    nb = NegativeBinomial(t["mu"], t["theta"]).log_prob(t["x"])
    pi = torch.full_like(t["mu"], -40.0)  # dropout probability 4e-18
    zinb = ZeroInflatedNegativeBinomial(t["mu"], t["theta"], pi).log_prob(t["x"])
    # x > 0: log(1 - 4e-18); x = 0: log(NB(0) + 4e-18) - log NB(0) <= 4e-18 / NB(0)
    bound = torch.where(t["x"] > 0, 0.0, torch.exp(-40.0 - nb))
    rounding = 1e-14 * (40 + nb.abs())  # the softplus terms of magnitude ~40 are subtracted
    assert ((zinb - nb).abs() <= bound + rounding).all()
    assert (bound < 1e-6).sum() > 400  # most entries are checked tightly
    # p(0) never drops below the dropout mass
    assert (zinb[t["x"] == 0] >= -40.0 - 1e-12).all()


def test_zinb_zero_probability_at_least_nb():
    t = _tensors(_inputs(seed=4, n=2000), torch.float64)
    zero = torch.zeros_like(t["mu"])
    nb0 = NegativeBinomial(t["mu"], t["theta"]).log_prob(zero)
    zinb0 = ZeroInflatedNegativeBinomial(t["mu"], t["theta"], t["pi"]).log_prob(zero)
    # up to the rounding of the two softplus terms that are subtracted
    rounding = 1e-15 * (1 + t["pi"].abs())
    assert (zinb0 >= nb0 - rounding).all()
    # strictly more mass at zero whenever dropout is non-negligible and NB(0) is not ~1
    strict = (t["pi"] > -5) & (nb0 < -1e-3)
    assert strict.sum() > 100
    assert (zinb0[strict] > nb0[strict] + 1e-6).all()


def test_stable_at_zero_rate():
    x = torch.tensor([0.0, 3.0, 0.0, 5.0])
    mu = torch.tensor([0.0, 0.0, 2.0, 2.0], requires_grad=True)
    theta = torch.tensor([1e-9, 2.0, 1e7, 0.5], requires_grad=True)
    pi = torch.tensor([50.0, -50.0, 0.0, 3.0], requires_grad=True)
    dists = [
        NegativeBinomial(mu, theta),
        ZeroInflatedNegativeBinomial(mu, theta, pi),
        Poisson(mu),
    ]
    values = [d.log_prob(x) for d in dists] + [d.log_prob_sum(x[None]) for d in dists]
    for value in values:
        grads = torch.autograd.grad(value.sum(), [mu, theta, pi], allow_unused=True)
        assert torch.isfinite(value).all()
        assert all(g is None or torch.isfinite(g).all() for g in grads)
    assert Poisson(mu).log_prob(x)[0] == 0  # rate 0 puts all mass on 0


# --------------------------------------------------------------------------------------------------
# log_prob_sum: sparse row sums equal the dense ones, values and gradients
# --------------------------------------------------------------------------------------------------


@pytest.fixture(params=["torch", "kernels"])
def path(request, monkeypatch):
    """Run a test through the torch code and through the compiled kernels (float32, CPU)."""
    if request.param == "kernels" and _kernels._lib is None:
        pytest.skip("the compiled kernels were not built here (see test_kernels.py)")
    monkeypatch.setattr(_kernels, "enabled", request.param == "kernels")
    return request.param


def _batch(dtype, theta_shape, n_cells=24, n_genes=300, seed=5):
    g = torch.Generator().manual_seed(seed)
    mu = torch.exp(torch.randn(n_cells, n_genes, generator=g, dtype=dtype) * 2)
    keep = torch.rand(n_cells, n_genes, generator=g) < 0.1
    x = torch.where(keep, torch.poisson(mu * 3 + 1, generator=g), torch.zeros_like(mu))
    x[0, :5] = 1e5  # very large counts
    x[1] = 0  # an empty cell
    theta = torch.exp(torch.randn(theta_shape, generator=g, dtype=dtype) * 2)
    pi = torch.randn(n_cells, n_genes, generator=g, dtype=dtype) * 3
    return x, mu, theta, pi


def _make(name, mu, theta, pi):
    if name == "nb":
        return NegativeBinomial(mu, theta), [mu, theta]
    if name == "zinb":
        return ZeroInflatedNegativeBinomial(mu, theta, pi), [mu, theta, pi]
    if name == "poisson":
        return Poisson(mu), [mu]
    return Normal(pi, theta), [pi, theta]


@pytest.mark.parametrize("name", ["nb", "zinb", "poisson", "normal"])
@pytest.mark.parametrize("theta_shape", [(300,), (1, 300), (24, 300)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_log_prob_sum_equals_dense(name, theta_shape, dtype, path):
    x, mu, theta, pi = _batch(dtype, theta_shape)
    params = [p.requires_grad_() for p in (mu, theta, pi)]
    # nz as given by the loader, or (theta of shape (1, G)) found by log_prob_sum itself
    nz = None if theta_shape == (1, 300) else torch.nonzero(x, as_tuple=True)
    dist, wrt = _make(name, *params)
    fast = dist.log_prob_sum(x, nz)
    assert fast.shape == (x.shape[0],) and fast.dtype == dtype
    # the reference: the dense log_prob in float64, at the same (rounded) parameters
    dist64, wrt64 = _make(name, *(p.detach().double().requires_grad_() for p in params))
    dense = dist64.log_prob(x.double()).sum(-1)
    # summation order differs: compare at the precision of the summed magnitudes (float32: the
    # torch code's error, up to 6e-6 of the magnitude here; the kernels' is below 3e-7)
    scale = dist64.log_prob(x.double()).detach().abs().sum(-1)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert ((fast - dense).abs() <= tol * scale + tol).all()
    weights = torch.randn(x.shape[0], generator=torch.Generator().manual_seed(0), dtype=dtype)
    g_dense = torch.autograd.grad((dense * weights.double()).sum(), wrt64)
    g_fast = torch.autograd.grad((fast * weights).sum(), wrt)
    for a, b in zip(g_fast, g_dense):
        assert a.shape == b.shape
        rtol, atol = (1e-9, 1e-12) if dtype == torch.float64 else (1e-4, 1e-5 * b.abs().max())
        torch.testing.assert_close(a.double(), b, rtol=rtol, atol=atol)


@pytest.mark.parametrize("name", ["nb", "zinb"])
@pytest.mark.parametrize("theta_shape", [(6,), (4, 6)])
def test_log_prob_sum_gradcheck(name, theta_shape):
    """Finite differences check the hand-written backward of the dense parts."""
    g = torch.Generator().manual_seed(6)
    x = torch.poisson(torch.full((4, 6), 1.5), generator=g).double()
    x[0, 0], x[1, 1] = 0.0, 4.0
    mu = (torch.rand(4, 6, generator=g, dtype=torch.float64) * 5 + 0.1).requires_grad_()
    theta = (torch.rand(theta_shape, generator=g, dtype=torch.float64) * 3 + 0.2).requires_grad_()
    pi = torch.randn(4, 6, generator=g, dtype=torch.float64).requires_grad_()
    if name == "nb":
        fn, inputs = lambda m, t: NegativeBinomial(m, t).log_prob_sum(x), (mu, theta)
    else:
        fn = lambda m, t, p: ZeroInflatedNegativeBinomial(m, t, p).log_prob_sum(x)
        inputs = (mu, theta, pi)
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)


@pytest.mark.parametrize("name", ["nb", "zinb", "poisson"])
def test_log_prob_sum_tolerates_explicit_zeros_in_nz(name):
    x, mu, theta, pi = _batch(torch.float64, (300,))
    row, col = torch.nonzero(x, as_tuple=True)
    zr, zc = torch.nonzero(x == 0, as_tuple=True)
    nz = (torch.cat([row, zr[::7]]), torch.cat([col, zc[::7]]))  # as CSR with stored zeros
    dist, wrt = _make(name, *(p.requires_grad_() for p in (mu, theta, pi)))
    fast, dense = dist.log_prob_sum(x, nz), dist.log_prob(x).sum(-1)
    torch.testing.assert_close(fast, dense)
    for a, b in zip(torch.autograd.grad(fast.sum(), wrt), torch.autograd.grad(dense.sum(), wrt)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_zinb_log_prob_sum_where_both_zero_probabilities_underflow(dtype, path):
    # p(0) < 1e-30 (π ≪ 0 and θ log(1 + μ/θ) ≫ 0) switches those entries to the softplus form
    g = torch.Generator().manual_seed(3)
    x = torch.poisson(torch.full((6, 40), 0.3), generator=g).to(dtype)
    mu = torch.exp(torch.randn(6, 40, generator=g, dtype=dtype) * 3)
    mu[:, :10] = 1e4
    theta = torch.exp(torch.randn(40, generator=g, dtype=dtype))
    theta[:10] = 50.0  # θt ≈ 50 log(201) ≈ 265 at the first 10 genes
    pi = torch.randn(6, 40, generator=g, dtype=dtype) * 3
    pi[:, :5] = -90.0
    wrt = [p.requires_grad_() for p in (mu, theta, pi)]
    dist = ZeroInflatedNegativeBinomial(*wrt)
    fast, dense = dist.log_prob_sum(x), dist.log_prob(x).sum(-1)
    assert torch.isfinite(fast).all()
    torch.testing.assert_close(fast, dense)
    weights = torch.rand(6, generator=g, dtype=dtype) + 0.5
    for a, b in zip(
        torch.autograd.grad((fast * weights).sum(), wrt),
        torch.autograd.grad((dense * weights).sum(), wrt),
    ):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("underflow", [False, True])
def test_zinb_stable_branch_without_reading_p0_back(monkeypatch, underflow):
    # off the CPU the stable zero branch runs without reading p(0) back to the host: with no entry
    # below 1e-30 it must change nothing (bit for bit), and with some it matches the CPU's choice
    monkeypatch.setattr(_kernels, "enabled", False)  # the torch code, as off the CPU
    g = torch.Generator().manual_seed(5)
    x = torch.poisson(torch.full((8, 50), 0.4), generator=g)
    mu = torch.exp(torch.randn(8, 50, generator=g) * 2)
    theta = torch.exp(torch.randn(50, generator=g))
    pi = torch.randn(8, 50, generator=g) * 2
    if underflow:
        mu[:, :6], theta[:6], pi[:, :3] = 1e4, 50.0, -90.0
    weights = torch.rand(8, generator=g) + 0.5

    def value_and_grads():
        wrt = [p.clone().requires_grad_() for p in (mu, theta, pi)]
        out = ZeroInflatedNegativeBinomial(*wrt).log_prob_sum(CSRBatch.from_dense(x))
        return [out.detach(), *torch.autograd.grad((out * weights).sum(), wrt)]

    assert distributions._may_underflow(torch.full((3, 4), 1e-20)) is False  # CPU: read
    assert distributions._may_underflow(torch.full((3, 4), 1e-31)) is True
    on_cpu = value_and_grads()
    monkeypatch.setattr(distributions, "_may_underflow", lambda p0: True)  # as off the CPU
    for a, b in zip(value_and_grads(), on_cpu):
        assert torch.isfinite(a).all()
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["nb", "zinb"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_log_prob_sum_without_grad_equals_with_grad(name, dtype, path):
    # the forward computes the gradients only when they will be needed; the values are the same
    x, mu, theta, pi = _batch(dtype, (300,))
    with torch.no_grad():
        plain = _make(name, mu, theta, pi)[0].log_prob_sum(x)
    dist, _ = _make(name, *(p.requires_grad_() for p in (mu, theta, pi)))
    with_grad = dist.log_prob_sum(x)
    assert with_grad.requires_grad and not plain.requires_grad
    torch.testing.assert_close(plain, with_grad.detach(), rtol=0, atol=0)


def test_log_prob_sum_requires_2d():
    with pytest.raises(ValueError, match="2-D"):
        NegativeBinomial(torch.ones(3), torch.ones(3)).log_prob_sum(torch.ones(3))


# --------------------------------------------------------------------------------------------------
# moments and sampling
# --------------------------------------------------------------------------------------------------

_MU = torch.tensor([0.3, 4.0, 60.0], dtype=torch.float64)
_MU2 = torch.tensor([5.0, 40.0, 200.0], dtype=torch.float64)
_THETA = torch.tensor([0.7, 3.0, 25.0], dtype=torch.float64)
_PI = torch.tensor([-1.0, 0.5, 2.0], dtype=torch.float64)

DISTS = {
    "nb": lambda: NegativeBinomial(_MU, _THETA),
    "zinb": lambda: ZeroInflatedNegativeBinomial(_MU, _THETA, _PI),
    "poisson": lambda: Poisson(_MU),
    "mixture_shared_theta": lambda: NegativeBinomialMixture(_MU, _MU2, _THETA, _PI),
    "mixture_two_thetas": lambda: NegativeBinomialMixture(
        _MU, _MU2, _THETA, _PI, theta2=_THETA * 4
    ),
}


@pytest.mark.parametrize("name", list(DISTS))
def test_sample_moments(name):
    dist = DISTS[name]()
    n = 100_000
    with torch.random.fork_rng():
        torch.manual_seed(0)
        draws = dist.sample((n,))
    assert draws.shape == (n, 3)
    assert (draws >= 0).all() and (draws == draws.round()).all()
    mean, var = dist.mean, dist.variance
    # sample mean within 5 standard errors, sample variance within 5%
    assert ((draws.mean(0) - mean).abs() <= 5 * (var / n).sqrt()).all()
    torch.testing.assert_close(draws.var(0), var, rtol=0.05, atol=0)


@pytest.mark.parametrize("name", list(DISTS))
def test_moments_match_pmf(name):
    """`mean` and `variance` equal the moments of the pmf given by `log_prob`."""
    dist = DISTS[name]()
    support = torch.arange(0, 4000, dtype=torch.float64)[:, None]
    pmf = dist.log_prob(support).exp()
    torch.testing.assert_close(pmf.sum(0), torch.ones(3, dtype=torch.float64))
    mean = (support * pmf).sum(0)
    torch.testing.assert_close(mean, dist.mean)
    torch.testing.assert_close(((support - mean) ** 2 * pmf).sum(0), dist.variance)


def test_nb_moments_match_scipy():
    n, p = _THETA.numpy(), (_THETA / (_THETA + _MU)).numpy()
    nb = NegativeBinomial(_MU, _THETA)
    np.testing.assert_allclose(nb.mean.numpy(), stats.nbinom.mean(n, p), rtol=1e-12)
    np.testing.assert_allclose(nb.variance.numpy(), stats.nbinom.var(n, p), rtol=1e-12)


def test_sample_shape_broadcasts_parameters():
    nb = NegativeBinomial(torch.ones(5, 4), torch.ones(4))
    assert nb.batch_shape == (5, 4)
    assert nb.sample().shape == (5, 4)
    assert nb.sample((2,)).shape == (2, 5, 4)
    zinb = ZeroInflatedNegativeBinomial(torch.ones(5, 4), torch.ones(4), torch.zeros(1, 4))
    assert zinb.sample((3,)).shape == (3, 5, 4)


@pytest.mark.parametrize("prior", ["standard", "general"])
def test_kl_normal_matches_torch_distributions_float64(prior):
    # the standard normal prior takes a shorter formula; both against torch's closed form
    from cellvae.module import kl_normal

    gen = torch.Generator().manual_seed(11)
    q_m = torch.randn(40, 6, generator=gen, dtype=torch.float64) * 3
    q_v = torch.exp(torch.randn(40, 6, generator=gen, dtype=torch.float64) * 2)
    if prior == "standard":
        p_m, p_v, args = torch.zeros(()), torch.ones(()), ()
    else:
        p_m = torch.randn(40, 1, generator=gen, dtype=torch.float64)
        p_v = torch.exp(torch.randn(40, 1, generator=gen, dtype=torch.float64))
        args = (p_m, p_v)
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(q_m, q_v.sqrt()),
        torch.distributions.Normal(p_m.double().expand_as(q_m), p_v.double().sqrt().expand_as(q_m)),
    ).sum(-1)
    torch.testing.assert_close(kl_normal(q_m, q_v, *args), expected, rtol=1e-12, atol=1e-12)


def test_mean_from_scale_logits_and_argument_errors():
    logits, library = torch.randn(3, 5), torch.tensor([[10.0], [0.0], [3.0]])
    theta, pi = torch.rand(5) + 0.5, torch.randn(3, 5)
    nb = NegativeBinomial(scale_logits=logits, library=library, theta=theta)
    torch.testing.assert_close(nb.mu, library * torch.softmax(logits, -1))
    assert nb.batch_shape == (3, 5) and nb.mu is nb.mu  # computed once
    zinb = ZeroInflatedNegativeBinomial(
        scale_logits=logits, library=library, theta=theta, zi_logits=pi
    )
    torch.testing.assert_close(zinb.mean, (1 - torch.sigmoid(pi)) * nb.mu)
    mu = torch.ones(3, 5)
    for bad in (
        {"theta": theta},  # no mean
        {"mu": mu, "scale_logits": logits, "library": library, "theta": theta},  # both
        {"scale_logits": logits, "theta": theta},  # logits without library
        {"mu": mu},  # no theta
    ):
        with pytest.raises(ValueError, match="mu|theta"):
            NegativeBinomial(**bad)
    with pytest.raises(ValueError, match="zi_logits"):
        ZeroInflatedNegativeBinomial(mu=mu, theta=theta)


@pytest.mark.parametrize("path", ["kernels", "torch"])
def test_large_counts_keep_float64_accuracy(monkeypatch, path):
    # at 1e5-1e6 counts each lgamma is above 1e6, where float32's spacing is ~0.1: the terms that
    # cancel are computed in float64 by the kernels and by the torch code alike
    monkeypatch.setattr(_kernels, "enabled", path == "kernels")
    rng = np.random.default_rng(4)
    n = 64
    x = np.floor(10 ** rng.uniform(3, 6.3, (2, n)))
    mu = x * rng.uniform(0.8, 1.25, (2, n))
    theta = np.exp(rng.normal(0.5, 1.0, n))
    pi = rng.normal(0, 1, (2, n))
    ref_nb = stats.nbinom.logpmf(x, theta, theta / (theta + mu))
    ref_zinb = ref_nb - np.logaddexp(0, pi)  # log(1 − w) + log NB at x > 0
    ref_pois = stats.poisson.logpmf(x, mu)
    t = {k: torch.tensor(v, dtype=torch.float32) for k, v in dict(x=x, mu=mu, pi=pi).items()}
    th = torch.tensor(theta, dtype=torch.float32)
    nb = NegativeBinomial(mu=t["mu"], theta=th)
    zinb = ZeroInflatedNegativeBinomial(mu=t["mu"], theta=th, zi_logits=t["pi"])
    pois = Poisson(rate=t["mu"])
    # float32 inputs hold x and mu to ~6e-8 relative: x log(mu) then moves by ~x · 6e-8
    for dist, ref in ((nb, ref_nb), (zinb, ref_zinb), (pois, ref_pois)):
        np.testing.assert_allclose(dist.log_prob(t["x"]).numpy(), ref, rtol=2e-4, atol=0.02)
        np.testing.assert_allclose(dist.log_prob_sum(t["x"]).numpy(), ref.sum(-1), rtol=2e-4)
    mix = log_mixture_nb(t["x"], t["mu"], 3 * t["mu"], th, None, t["pi"])
    ref_mix = np.logaddexp(ref_nb, stats.nbinom.logpmf(x, theta, theta / (theta + 3 * mu)) - pi)
    np.testing.assert_allclose(mix.numpy(), ref_mix - np.logaddexp(0, -pi), rtol=2e-4, atol=0.02)


def test_nb_at_zero_counts_cancels_the_lgamma_terms():
    # lgamma(x + θ) − lgamma(θ) − lgamma(x + 1) is 0 at x = 0 for every θ: computed in one
    # precision, it stays so (lgamma(θ) in float32 against the rest in float64 left up to 6e-5)
    theta = torch.logspace(-1, 6, 4000)
    mu = torch.full_like(theta, 5.0)
    zero_term = -(theta * torch.log1p(mu / theta))  # log NB(0), the same float32 operations
    got = NegativeBinomial(mu=mu, theta=theta).log_prob(torch.zeros_like(theta))
    np.testing.assert_allclose(got.numpy(), zero_term.numpy(), rtol=0, atol=1e-6)


def test_poisson_log_prob_keeps_the_promoted_dtype():
    rate16 = torch.tensor([2.0], dtype=torch.float16)
    assert Poisson(rate=rate16).log_prob(torch.tensor([1e5])).dtype == torch.float32
    out = Poisson(rate=torch.tensor([2.0])).log_prob(torch.tensor([3.0], dtype=torch.float64))
    assert out.dtype == torch.float64
    assert np.isfinite(Poisson(rate=rate16).log_prob(torch.tensor([1e5])).item())


@pytest.mark.parametrize("likelihood", ["nb", "zinb"])
def test_torch_row_sums_equal_elementwise_at_large_theta(monkeypatch, likelihood):
    # the sparse torch path's lgamma(θ) is float64 like the rest of the terms: at θ up to 1e6 a
    # float32 lgamma(θ) left row sums up to 1.35 nats from log_prob(x).sum(-1)
    monkeypatch.setattr(_kernels, "enabled", False)
    rng = np.random.default_rng(7)
    x = torch.tensor(rng.poisson(3.0, (8, 100)) * (rng.random((8, 100)) < 0.5), dtype=torch.float32)
    mu = torch.tensor(rng.uniform(0.5, 8.0, (8, 100)), dtype=torch.float32)
    theta = torch.tensor(10 ** rng.uniform(2, 6, 100), dtype=torch.float32)
    pi = torch.tensor(rng.normal(0, 1, (8, 100)), dtype=torch.float32)
    dist = (
        NegativeBinomial(mu=mu, theta=theta)
        if likelihood == "nb"
        else ZeroInflatedNegativeBinomial(mu=mu, theta=theta, zi_logits=pi)
    )
    sums = dist.log_prob_sum(CSRBatch.from_dense(x)).numpy()
    np.testing.assert_allclose(sums, dist.log_prob(x).sum(-1).numpy(), rtol=1e-5, atol=1e-3)


def test_poisson_row_sums_keep_the_promoted_dtype():
    rate16 = torch.full((1, 3), 2.0, dtype=torch.float16)
    x = torch.tensor([[1e5, 0.0, 3.0]])
    sums = Poisson(rate=rate16).log_prob_sum(x)
    assert sums.dtype == torch.float32 and torch.isfinite(sums).all()
    torch.testing.assert_close(sums, Poisson(rate=rate16).log_prob(x).sum(-1))
