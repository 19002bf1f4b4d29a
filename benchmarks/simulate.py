"""Benchmark data: the real data sets prepared once, and large sparse data simulated from them.

Simulation (``sim*`` names): per-gene parameters are fitted to the real Kang data
(``cellvae.datasets.kang_ifnb()``) on its 2,000 highly variable genes (seurat_v3 on counts):

* counts are normalised to the median library size; for each labelled cell type (``unknown`` is
  left out) the mean normalised count of each gene gives the type's expression profile ρ_t;
* one NB inverse dispersion θ_g per gene by the method of moments with type-specific means:
  θ_g = mean_t-weighted(m_tg²) / (pooled within-type variance − mean), clipped to [0.01, 1000];
* cell types are drawn with the Kang proportions; 4 batches, each multiplying every gene by
  exp(N(0, 0.5²)) (profiles renormalised); library sizes log-normal with Kang's standard
  deviation of log library size, and a mean shifted so that the expected fraction of nonzero
  entries is the requested density (8% by default; Kang's own HVG matrix is ~6.3%);
* counts ~ Poisson(Gamma(θ_g, μ_ng / θ_g)) with μ_ng = ℓ_n · ρ_{t(n), b(n), g}.

The CSR matrix is assembled directly, chunk by chunk, into preallocated ``indptr`` /
``indices`` / ``data`` arrays (int32 indices), so simulating 1M cells needs little more memory
than the matrix itself (1M × 2,000 at 8% ≈ 1.3 GB, at 18% ≈ 2.9 GB). CITE-seq-shaped data
(``citesim*``) are fitted the same way to the shipped ECCITE data, with proteins as a second
set of profiles (own library sizes and θ), 2 batches by default.

Results are cached in ``benchmarks/results/*.h5ad`` (git-ignored)::

    .venv/bin/python benchmarks/simulate.py --n-obs 100000            # sim_100000.h5ad
    .venv/bin/python benchmarks/simulate.py --n-obs 1000000 --density 0.18
    .venv/bin/python benchmarks/simulate.py --quick                   # 2,000 cells
"""

from __future__ import annotations

import argparse
import math
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from _common import RESULTS

DEFAULT_DENSITY = 0.08
N_HVG = 2000
CHUNK = 4096


# --------------------------------------------------------------------------- real data
def hvg_genes(adata: ad.AnnData, n_top: int = N_HVG) -> list[str]:
    """Top ``n_top`` highly variable genes: seurat_v3 on counts, else seurat on log-normalised."""
    import scanpy as sc

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            df = sc.pp.highly_variable_genes(
                adata, n_top_genes=n_top, flavor="seurat_v3", inplace=False
            )
        except ImportError:  # scikit-misc missing
            tmp = adata.copy()
            sc.pp.normalize_total(tmp)
            sc.pp.log1p(tmp)
            df = sc.pp.highly_variable_genes(tmp, n_top_genes=n_top, inplace=False)
            df.index = adata.var_names
    mask = df["highly_variable"].to_numpy()
    return [g for g, keep in zip(adata.var_names, mask) if keep]


def _drop_empty_cells(adata: ad.AnnData) -> ad.AnnData:
    lib = np.asarray(adata.X.sum(1)).ravel()
    return adata[lib > 0].copy() if (lib <= 0).any() else adata


def kang_hvg(n_top: int = N_HVG) -> ad.AnnData:
    """Kang et al. PBMC (2,000 cells) on its ``n_top`` HVGs, raw counts; cached."""
    path = RESULTS / f"kang_hvg{n_top}.h5ad"
    if path.exists():
        return ad.read_h5ad(path)
    import cellvae

    adata = cellvae.datasets.kang_ifnb()
    adata = adata[:, hvg_genes(adata, n_top)].copy()
    adata = _drop_empty_cells(adata)
    adata.obs = adata.obs[["batch", "cell_type"]].copy()
    _write(adata, path)
    return adata


def eccite_hvg(n_top: int = N_HVG) -> ad.AnnData:
    """ECCITE-seq PBMC (500 cells, 49 proteins) on ``n_top`` HVGs; cached."""
    path = RESULTS / f"eccite_hvg{n_top}.h5ad"
    if path.exists():
        return ad.read_h5ad(path)
    import cellvae

    adata = cellvae.datasets.eccite_pbmc()
    adata = adata[:, hvg_genes(adata, n_top)].copy()
    adata = _drop_empty_cells(adata)
    adata.obs = adata.obs[["batch", "cell_type"]].copy()
    del adata.obsm["hto_counts"]
    _write(adata, path)
    return adata


# --------------------------------------------------------------------------- fitting
@dataclass
class Profiles:
    """Fitted parameters of one modality (genes or proteins)."""

    names: list[str]
    types: list[str]
    type_probs: np.ndarray  # (T,)
    rho: np.ndarray  # (T, G) expression profile per type, rows sum to 1
    theta: np.ndarray  # (G,) NB inverse dispersion
    loglib_mean: float
    loglib_sd: float


def fit_profiles(
    counts, labels: np.ndarray, names: list[str], exclude: str = "unknown"
) -> Profiles:
    """Per-type profiles and method-of-moments NB θ per feature from raw counts."""
    X = counts.toarray() if sp.issparse(counts) else np.asarray(counts)
    X = X.astype(np.float64)
    lib = X.sum(1)
    keep = (lib > 0) & (labels != exclude)
    X, lib, labels = X[keep], lib[keep], labels[keep]
    norm = X / lib[:, None] * np.median(lib)
    types = sorted(set(labels))
    counts_t = np.array([(labels == t).sum() for t in types], dtype=np.float64)
    means = np.stack([norm[labels == t].mean(0) for t in types])  # (T, G)
    resid = norm - means[np.searchsorted(types, labels)]
    dof = max(len(labels) - len(types), 1)
    var = (resid**2).sum(0) / dof
    w = counts_t / counts_t.sum()
    mean_m = (w[:, None] * means).sum(0)
    mean_m2 = (w[:, None] * means**2).sum(0)
    excess = var - mean_m
    with np.errstate(divide="ignore", invalid="ignore"):
        theta = np.where(excess > 1e-12, mean_m2 / excess, 1000.0)
    theta = np.clip(np.nan_to_num(theta, nan=1000.0), 0.01, 1000.0)
    floor = 1e-3 * means.mean(1, keepdims=True) + 1e-12
    rho = means + floor
    rho /= rho.sum(1, keepdims=True)
    loglib = np.log(lib)
    return Profiles(
        names=list(names),
        types=[str(t) for t in types],
        type_probs=w,
        rho=rho,
        theta=theta,
        loglib_mean=float(loglib.mean()),
        loglib_sd=float(loglib.std()),
    )


def _expected_density(profiles: Profiles, rho_tb: np.ndarray, shift: float, rng) -> float:
    n = 2000
    t = rng.choice(len(profiles.types), size=n, p=profiles.type_probs)
    b = rng.integers(rho_tb.shape[1], size=n)
    lib = np.exp(rng.normal(profiles.loglib_mean + shift, profiles.loglib_sd, size=n))
    mu = lib[:, None] * rho_tb[t, b]
    theta = profiles.theta
    p0 = np.exp(theta * (np.log(theta) - np.log(theta + mu)))
    return float(1.0 - p0.mean())


def _batch_profiles(profiles: Profiles, n_batches: int, effect_sd: float, rng) -> np.ndarray:
    """(T, B, G) profiles: each batch multiplies genes by exp(N(0, sd²)), renormalised."""
    lfc = rng.normal(0.0, effect_sd, size=(n_batches, profiles.rho.shape[1]))
    rho_tb = profiles.rho[:, None, :] * np.exp(lfc)[None]
    return rho_tb / rho_tb.sum(-1, keepdims=True)


def calibrate_shift(profiles: Profiles, rho_tb: np.ndarray, density: float, seed: int) -> float:
    """Shift of the mean log library size giving the expected nonzero fraction ``density``."""
    lo, hi = -8.0, 8.0
    for _ in range(40):
        mid = (lo + hi) / 2
        d = _expected_density(profiles, rho_tb, mid, np.random.default_rng(seed))
        lo, hi = (mid, hi) if d < density else (lo, mid)
    return (lo + hi) / 2


# --------------------------------------------------------------------------- sampling
def sample_csr(
    rho_tb: np.ndarray,
    theta: np.ndarray,
    types: np.ndarray,
    batches: np.ndarray,
    loglib: np.ndarray,
    rng: np.random.Generator,
    expected_density: float,
    chunk: int = CHUNK,
) -> sp.csr_matrix:
    """NB counts (Gamma-Poisson) written chunk by chunk into one preallocated CSR matrix."""
    n, g = len(types), rho_tb.shape[-1]
    cap = int(expected_density * n * g * 1.03) + chunk * g // 4 + 16
    indptr = np.zeros(n + 1, dtype=np.int64)
    indices = np.empty(cap, dtype=np.int32)  # gene indices: always < 2**31
    data = np.empty(cap, dtype=np.float32)
    pos = 0
    top_gene = rho_tb.argmax(-1)  # (T, B)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        t, b = types[start:stop], batches[start:stop]
        mu = np.exp(loglib[start:stop])[:, None] * rho_tb[t, b]
        lam = rng.gamma(theta, mu / theta)
        del mu
        counts = rng.poisson(lam)
        del lam
        empty = ~counts.any(1)
        if empty.any():  # every cell needs at least one count
            rows = np.flatnonzero(empty)
            counts[rows, top_gene[t[rows], b[rows]]] = 1
        mask = counts != 0
        nnz_rows = mask.sum(1)
        cols = np.nonzero(mask)[1]
        k = len(cols)
        if pos + k > len(indices):  # rare: grow by 25%
            new_cap = max(pos + k, int(len(indices) * 1.25))
            indices = np.resize(indices, new_cap)
            data = np.resize(data, new_cap)
        indices[pos : pos + k] = cols
        data[pos : pos + k] = counts[mask]
        indptr[start + 1 : stop + 1] = pos + np.cumsum(nnz_rows)
        pos += k
        del counts, mask, cols
    indices, data = indices[:pos], data[:pos]
    if pos < 2**31:  # else scipy upcasts indices to int64 as well
        indptr = indptr.astype(np.int32)
    return sp.csr_matrix((data, indices, indptr), shape=(n, g))


def simulate(
    n_obs: int,
    *,
    genes: Profiles,
    proteins: Profiles | None = None,
    n_batches: int = 4,
    batch_effect: float = 0.5,
    protein_batch_effect: float = 0.2,
    density: float | None = DEFAULT_DENSITY,
    seed: int = 0,
) -> ad.AnnData:
    """Simulate ``n_obs`` cells from fitted profiles (see the module docstring)."""
    rng = np.random.default_rng(seed)
    rho_tb = _batch_profiles(genes, n_batches, batch_effect, rng)
    shift = 0.0 if density is None else calibrate_shift(genes, rho_tb, density, seed)
    types = rng.choice(len(genes.types), size=n_obs, p=genes.type_probs)
    batches = rng.integers(n_batches, size=n_obs)
    loglib = rng.normal(genes.loglib_mean + shift, genes.loglib_sd, size=n_obs)
    expected = density if density is not None else _expected_density(genes, rho_tb, 0.0, rng)
    X = sample_csr(rho_tb, genes.theta, types, batches, loglib, rng, expected)
    obs = pd.DataFrame(
        {
            "batch": pd.Categorical.from_codes(batches, [f"batch{i}" for i in range(n_batches)]),
            "cell_type": pd.Categorical.from_codes(types, genes.types),
        },
        index=pd.Index([f"cell{i}" for i in range(n_obs)]),
    )
    adata = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=pd.Index(genes.names)))
    if proteins is not None:
        prho = _batch_profiles(proteins, n_batches, protein_batch_effect, rng)
        # proteins follow the same cell types as the genes (matched by name)
        pt = np.array([proteins.types.index(genes.types[t]) for t in types])
        ploglib = rng.normal(proteins.loglib_mean, proteins.loglib_sd, size=n_obs)
        mu = np.exp(ploglib)[:, None] * prho[pt, batches]
        y = rng.poisson(rng.gamma(proteins.theta, mu / proteins.theta)).astype(np.float32)
        adata.obsm["protein_expression"] = pd.DataFrame(
            y, index=adata.obs_names, columns=proteins.names
        )
    adata.uns["simulation"] = {
        "fitted_to": "kang_ifnb" if proteins is None else "eccite_pbmc",
        "n_batches": n_batches,
        "batch_effect_sd": batch_effect,
        "target_density": float("nan") if density is None else density,
        "density": X.nnz / max(X.shape[0] * X.shape[1], 1),
        "loglib_shift": shift,
        "seed": seed,
    }
    return adata


# --------------------------------------------------------------------------- datasets by name
def parse_count(text: str) -> int:
    """``"10k"`` → 10000, ``"1m"`` → 1000000, ``"2500"`` → 2500."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kKmM]?)", text)
    if not m:
        raise ValueError(f"Not a cell count: {text!r} (use e.g. 2000, 10k, 1m).")
    mult = {"": 1, "k": 1_000, "m": 1_000_000}[m.group(2).lower()]
    return int(round(float(m.group(1)) * mult))


def sim_path(n_obs: int, density: float = DEFAULT_DENSITY, seed: int = 0, cite: bool = False):
    """Cache file of a simulated data set: ``sim_{n}.h5ad`` for the defaults."""
    stem = f"citesim_{n_obs}" if cite else f"sim_{n_obs}"
    if not cite and not math.isclose(density, DEFAULT_DENSITY):
        stem += f"_d{round(density * 100):02d}"
    if seed:
        stem += f"_s{seed}"
    return RESULTS / f"{stem}.h5ad"


def simulated(
    n_obs: int, *, density: float = DEFAULT_DENSITY, seed: int = 0, force: bool = False
) -> Path:
    """Path of the cached simulation (Kang-fitted), made first if missing."""
    path = sim_path(n_obs, density, seed)
    if path.exists() and not force:
        return path
    t0 = time.perf_counter()
    kang = kang_hvg()
    genes = fit_profiles(kang.X, kang.obs["cell_type"].astype(str).to_numpy(), list(kang.var_names))
    adata = simulate(n_obs, genes=genes, density=density, seed=seed)
    _write(adata, path)
    print(
        f"simulated {n_obs:,} x {adata.n_vars:,} ({adata.uns['simulation']['density']:.1%} "
        f"nonzero) in {time.perf_counter() - t0:.1f} s -> {path}",
        flush=True,
    )
    return path


def simulated_cite(n_obs: int, *, seed: int = 0, n_batches: int = 2, force: bool = False) -> Path:
    """Path of the cached CITE-seq-shaped simulation (ECCITE-fitted), made first if missing."""
    path = sim_path(n_obs, seed=seed, cite=True)
    if path.exists() and not force:
        return path
    t0 = time.perf_counter()
    ec = eccite_hvg()
    labels = ec.obs["cell_type"].astype(str).to_numpy()
    genes = fit_profiles(ec.X, labels, list(ec.var_names))
    prot = ec.obsm["protein_expression"]
    proteins = fit_profiles(prot.to_numpy(), labels, [str(c) for c in prot.columns])
    adata = simulate(
        n_obs, genes=genes, proteins=proteins, n_batches=n_batches, density=None, seed=seed
    )
    _write(adata, path)
    print(
        f"simulated CITE {n_obs:,} cells x {adata.n_vars:,} genes + "
        f"{len(proteins.names)} proteins in {time.perf_counter() - t0:.1f} s -> {path}",
        flush=True,
    )
    return path


def dataset_path(name: str) -> Path:
    """Cache path of a named data set, prepared if needed.

    Names: ``kang`` (real, HVG 2,000), ``eccite`` (real CITE-seq, HVG 2,000),
    ``sim<N>`` (Kang-fitted, 8% nonzero), ``sim<N>_d<P>`` (P% nonzero), ``citesim<N>``.
    """
    if name == "kang":
        kang_hvg()
        return RESULTS / f"kang_hvg{N_HVG}.h5ad"
    if name == "eccite":
        eccite_hvg()
        return RESULTS / f"eccite_hvg{N_HVG}.h5ad"
    m = re.fullmatch(r"citesim([0-9.]+[kKmM]?)", name)
    if m:
        return simulated_cite(parse_count(m.group(1)))
    m = re.fullmatch(r"sim([0-9.]+[kKmM]?)(?:_d(\d+))?", name)
    if m:
        density = int(m.group(2)) / 100 if m.group(2) else DEFAULT_DENSITY
        return simulated(parse_count(m.group(1)), density=density)
    raise ValueError(f"Unknown data set {name!r}: kang, eccite, sim10k, sim1m_d18, citesim20k...")


def describe(adata: ad.AnnData) -> dict:
    """Size and sparsity of an AnnData for the result tables."""
    X = adata.X
    nnz = X.nnz if sp.issparse(X) else int(np.count_nonzero(X))
    return {
        "n_obs": adata.n_obs,
        "n_vars": adata.n_vars,
        "density": nnz / max(adata.n_obs * adata.n_vars, 1),
        "n_batches": int(adata.obs["batch"].nunique()) if "batch" in adata.obs else 1,
    }


def _write(adata: ad.AnnData, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.h5ad")
    adata.write_h5ad(tmp)
    tmp.replace(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-obs", type=str, default="10k", help="cells, e.g. 2000, 10k, 1m")
    parser.add_argument("--density", type=float, default=DEFAULT_DENSITY)
    parser.add_argument("--cite", action="store_true", help="CITE-seq-shaped (ECCITE-fitted)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="re-simulate even if cached")
    parser.add_argument("--quick", action="store_true", help="2,000 cells")
    args = parser.parse_args()
    n = 2000 if args.quick else parse_count(args.n_obs)
    if args.cite:
        path = simulated_cite(n, seed=args.seed, force=args.force)
    else:
        path = simulated(n, density=args.density, seed=args.seed, force=args.force)
    adata = ad.read_h5ad(path)
    info = describe(adata)
    print(
        f"{path.name}: {info['n_obs']:,} cells x {info['n_vars']:,} genes, "
        f"{info['density']:.2%} nonzero, {info['n_batches']} batches, cell types "
        f"{adata.obs['cell_type'].value_counts().to_dict()}"
    )
    if "protein_expression" in adata.obsm:
        print(f"proteins: {adata.obsm['protein_expression'].shape[1]}")


if __name__ == "__main__":
    main()
