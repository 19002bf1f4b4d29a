"""Minibatch fetch time: cellvae's TensorData + BatchSampler vs scvi-tools' AnnDataLoader.

Both loaders serve the same in-memory AnnData (sparse CSR counts, NB-ish values, 4 batches) in
shuffled minibatches of 128 cells for one full epoch; we report the wall time per batch.

Each loader is timed delivering what its model consumes: scvi-tools' batches hold a dense
cells x genes tensor; cellvae's hold a CSR batch (the stored entries, read directly by the first
encoder layer and the likelihood, never densified in training). A third row densifies cellvae's
batch as well, the like-for-like comparison of the gather itself.

    .venv/bin/python benchmarks/bench_dataloader.py                # 100k x 2,000, ~8% nonzero
    .venv/bin/python benchmarks/bench_dataloader.py --n-obs 20000  # quick run

Writes ``benchmarks/results/dataloader.csv``. This is a script, not a test.
"""

from __future__ import annotations

import argparse
import csv
import logging
import platform
import time
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from cellvae import pp
from cellvae._data import BatchSampler, TensorData
from cellvae._sparse import as_dense

RESULTS = Path(__file__).parent / "results" / "dataloader.csv"


def make_adata(n_obs: int, n_vars: int, density: float, n_batches: int, seed: int) -> ad.AnnData:
    """Sparse CSR counts: ~``density`` nonzero, nonzeros 1 + NB(1, 0.5), row chunks of 10k."""
    rng = np.random.default_rng(seed)
    blocks = []
    for start in range(0, n_obs, 10_000):
        rows = min(10_000, n_obs - start)
        mask = rng.random((rows, n_vars), dtype=np.float32) < density
        block = sp.csr_matrix(mask, dtype=np.float32)
        block.data = (1 + rng.negative_binomial(1, 0.5, size=block.nnz)).astype(np.float32)
        blocks.append(block)
    X = sp.vstack(blocks, format="csr")
    obs = pd.DataFrame(
        {"batch": pd.Categorical([f"b{i}" for i in rng.integers(n_batches, size=n_obs)])},
        index=[f"c{i}" for i in range(n_obs)],
    )
    var = pd.DataFrame(index=[f"g{j}" for j in range(n_vars)])
    return ad.AnnData(X=X, obs=obs, var=var)


def cellvae_loader(adata: ad.AnnData, batch_size: int, seed: int, densify: bool = False):
    """Return (seconds to set up, a function running one shuffled epoch and counting batches)."""
    t0 = time.perf_counter()
    pp.setup_anndata(adata, batch_key="batch")
    td = TensorData.from_adata(adata)
    sampler = BatchSampler(
        torch.arange(adata.n_obs),
        batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )
    setup = time.perf_counter() - t0

    def epoch() -> int:
        n, n_vars = 0, 0
        for idx in sampler:
            batch = td[idx]
            x = as_dense(batch["x"]) if densify else batch["x"]
            n += 1
            n_vars = x.shape[1]
        assert n_vars == adata.n_vars
        return n

    return setup, epoch


def scvi_loader(adata: ad.AnnData, batch_size: int, seed: int):
    """The same for scvi-tools' AnnDataLoader; a message if scvi-tools cannot be imported."""
    try:
        import scvi
        from scvi.dataloaders import AnnDataLoader
    except Exception as err:  # any import failure means "not available"
        return f"scvi-tools not importable ({type(err).__name__}: {err})"
    adata = adata.copy()  # scvi-tools adds _scvi_* columns to obs
    t0 = time.perf_counter()
    scvi.settings.seed = seed
    scvi.model.SCVI.setup_anndata(adata, batch_key="batch")
    model = scvi.model.SCVI(adata)  # the documented way to get the AnnDataManager
    loader = AnnDataLoader(model.adata_manager, batch_size=batch_size, shuffle=True)
    setup = time.perf_counter() - t0

    def epoch() -> int:
        n, n_vars = 0, 0
        for batch in loader:
            n += 1
            n_vars = batch["X"].shape[1]
        assert n_vars == adata.n_vars
        return n

    return setup, epoch


def time_epochs(loaders: dict, n_epochs: int) -> dict[str, list[float]]:
    """Seconds per batch of each epoch; loaders alternate so both see the same machine load."""
    per_batch: dict[str, list[float]] = {name: [] for name in loaders}
    for _, epoch in loaders.values():  # warm-up: one epoch each, not timed
        epoch()
    for _ in range(n_epochs):
        for name, (_, epoch) in loaders.items():
            t0 = time.perf_counter()
            n = epoch()
            per_batch[name].append((time.perf_counter() - t0) / n)
    return per_batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-obs", type=int, default=100_000)
    parser.add_argument("--n-vars", type=int, default=2_000)
    parser.add_argument("--density", type=float, default=0.08)
    parser.add_argument("--n-batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per loader")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    logging.getLogger("scvi").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")

    t0 = time.perf_counter()
    adata = make_adata(args.n_obs, args.n_vars, args.density, args.n_batches, args.seed)
    density = adata.X.nnz / (adata.n_obs * adata.n_vars)
    print(
        f"data: {adata.n_obs:,} cells x {adata.n_vars:,} genes, CSR, {density:.1%} nonzero, "
        f"{args.n_batches} batches (made in {time.perf_counter() - t0:.1f} s); "
        f"batch size {args.batch_size}, torch threads {torch.get_num_threads()}, "
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}"
    )

    loaders = {
        "cellvae (CSR batch, as trained)": cellvae_loader(adata, args.batch_size, args.seed),
        "cellvae densified": cellvae_loader(adata, args.batch_size, args.seed, densify=True),
    }
    sc = scvi_loader(adata, args.batch_size, args.seed)
    if isinstance(sc, str):
        print(sc)
    else:
        import scvi

        loaders[f"scvi-tools {scvi.__version__} AnnDataLoader"] = sc
    n_batches = -(-adata.n_obs // args.batch_size)
    times = time_epochs(loaders, args.epochs)

    rows = []
    for name, per in times.items():
        rows.append((name, min(per), float(np.median(per)), loaders[name][0]))
    header = f"{'loader':<36} {'best ms/batch':>13} {'median':>8} {'us/cell':>8} {'setup s':>8}"
    print(f"{args.epochs} timed epochs of ~{n_batches} shuffled batches each, loaders alternating")
    print(header)
    print("-" * len(header))
    for name, best, med, setup in rows:
        print(
            f"{name:<36} {best * 1e3:>13.3f} {med * 1e3:>8.3f} "
            f"{best * 1e6 / args.batch_size:>8.2f} {setup:>8.2f}"
        )
    if len(rows) == 3:
        for ours in rows[:2]:
            print(
                f"speed-up (scvi-tools / {ours[0]}): best {rows[2][1] / ours[1]:.1f}x, "
                f"median {rows[2][2] / ours[2]:.1f}x"
            )

    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(
            [
                "loader",
                "best_ms_per_batch",
                "median_ms_per_batch",
                "epochs",
                "setup_s",
                "n_obs",
                "n_vars",
                "density",
                "batch_size",
                "threads",
            ]
        )
        for name, best, med, setup in rows:
            writer.writerow(
                [
                    name,
                    f"{best * 1e3:.4f}",
                    f"{med * 1e3:.4f}",
                    args.epochs,
                    f"{setup:.3f}",
                    args.n_obs,
                    args.n_vars,
                    f"{density:.4f}",
                    args.batch_size,
                    args.threads,
                ]
            )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
