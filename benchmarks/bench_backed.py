"""SCVI from a backed AnnData: the counts stream from disk, so memory stays far below the data.

``anndata.read_h5ad(path, backed="r")`` leaves the CSR count matrix in the file; cellvae reads it
a window of cells at a time (block-shuffled for training, in order for validation and getters).
Each task runs in a fresh Python process, torch on 2 threads, CPU, SCVI defaults, batch 128,
seed 0, 10% validation every epoch, no progress bar:

1. ``setup``: ``setup_anndata`` on the backed file (it scans the counts in row chunks).
2. ``train``: ``setup_anndata`` + ``SCVI`` + ``train`` for ``--epochs`` epochs, then
   ``get_latent_representation`` of every cell.

For each: wall time, throughput and peak RSS (``Measure``: the absolute peak during the task and
the peak above the RSS at its start), plus ``ru_maxrss``, the process's lifetime peak (imports
and opening the file included), which is the figure to hold against the memory target
(``--target-gb``, 2 GB: the 1M-cell CSR alone is 2.7 GB). ``--in-memory`` adds the same training
with the file read into memory, for comparison. The 1-minute load average at the start and end of
each task is recorded: on a 2-core machine, other work shows in the throughput at once.

    .venv/bin/python benchmarks/bench_backed.py --quick        # 2k cells, seconds
    .venv/bin/python benchmarks/bench_backed.py                # 1M x 2,000 genes, 18% nonzero
    .venv/bin/python benchmarks/bench_backed.py --in-memory    # + training from memory

Writes ``backed.csv`` to ``benchmarks/results/`` (``results/quick/`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from _common import (
    SEED,
    THREADS,
    EpochClock,
    Measure,
    current_rss_mb,
    print_table,
    results_dir,
    run_child,
    tool_versions,
    write_child_result,
    write_csv,
)
from bench_scvi import BATCH_SIZE, VALIDATION_SIZE  # the settings shared by every SCVI benchmark

SCRIPT = Path(__file__).resolve()
COLUMNS = [
    "dataset", "mode", "task", "status", "n_obs", "n_vars", "density", "n_train", "epochs",
    "batch_size", "open_s", "open_rss_mb", "setup_s", "train_s", "cells_per_s", "first_epoch_s",
    "steps", "peak_mb", "peak_delta_mb", "baseline_mb", "latent_s", "latent_cells_per_s",
    "latent_peak_mb", "ru_maxrss_mb", "final_train_neg_elbo", "final_val_neg_elbo",
    "load_avg_start", "load_avg_end", "mem_method", "child_wall_s", "error",
]  # fmt: skip


def open_data(path: str, mode: str):
    """The AnnData (``mode="backed"``: backed, else in memory) and its size, time to open, RSS."""
    import anndata as ad

    t0 = time.perf_counter()
    adata = ad.read_h5ad(path, backed="r" if mode == "backed" else None)
    open_s = time.perf_counter() - t0
    x = adata.X  # the nonzero count of a backed matrix from the file's row pointers
    nnz = int(x.group["indptr"][-1]) if hasattr(x, "group") else x.nnz
    return adata, {
        "n_obs": adata.n_obs,
        "n_vars": adata.n_vars,
        "density": nnz / (adata.n_obs * adata.n_vars),
        "open_s": open_s,
        "open_rss_mb": current_rss_mb(),
    }


# =========================================================================== child tasks
def child_setup(a) -> dict[str, Any]:
    """``setup_anndata`` alone on the backed file."""
    import cellvae

    adata, rec = open_data(a.data, a.mode)
    with Measure() as m:
        cellvae.SCVI.setup_anndata(adata, batch_key="batch")
    rec.update(m.record())
    rec["setup_s"] = m.seconds
    return rec


def child_train(a) -> dict[str, Any]:
    """Set up, train ``a.epochs`` epochs and embed every cell; time and peak RSS of each."""
    import cellvae
    from cellvae.module import VAE

    adata, rec = open_data(a.data, a.mode)
    with Measure() as m:
        t0 = time.perf_counter()
        cellvae.SCVI.setup_anndata(adata, batch_key="batch")
        model = cellvae.SCVI(adata)
        setup_s = time.perf_counter() - t0
        with EpochClock(VAE) as clock:
            model.train(
                a.epochs,
                batch_size=a.batch_size,
                validation_size=VALIDATION_SIZE,
                seed=a.seed,
                device="cpu",
                progress_bar=False,
                early_stopping=False,
            )
    n_train = len(model.train_indices_)
    train_s = m.seconds - setup_s
    rec.update(m.record())
    rec.update(
        n_train=n_train,
        epochs=a.epochs,
        batch_size=a.batch_size,
        setup_s=setup_s,
        train_s=train_s,
        cells_per_s=n_train * a.epochs / train_s,
        first_epoch_s=clock.summary(a.epochs, n_train)["first_epoch_s"],
        steps=len(clock.times),
        final_train_neg_elbo=model.history_["train_elbo"][-1],
        final_val_neg_elbo=model.history_["validation_elbo"][-1],
    )
    with Measure() as lat:
        latent = model.get_latent_representation()
    assert latent.shape[0] == adata.n_obs
    rec.update(
        latent_s=lat.seconds,
        latent_cells_per_s=adata.n_obs / lat.seconds,
        latent_peak_mb=lat.peak_mb,
    )
    return rec


# =========================================================================== parent
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2k cells (sim2k_d18)")
    parser.add_argument("--dataset", default=None, help="default sim1m_d18 (quick: sim2k_d18)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--in-memory", action="store_true", help="also train from memory")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--threads", type=int, default=THREADS)
    parser.add_argument("--target-gb", type=float, default=2.0, help="peak RSS goal (backed)")
    parser.add_argument("--out-dir", type=Path, default=None, help="default benchmarks/results")
    parser.add_argument("--timeout-min", type=float, default=30.0, help="per child process")
    parser.add_argument("--mem-limit-gb", type=float, default=20.0, help="per child process")
    # child mode (internal)
    parser.add_argument("--child-json", help=argparse.SUPPRESS)
    parser.add_argument("--task", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    a = parser.parse_args(argv)

    if a.child_json:
        from _common import init_child

        init_child(a.threads)
        task = {"setup": child_setup, "train": child_train}[a.task]
        load_avg_start = os.getloadavg()[0]  # other work on the machine slows the figures
        rec = task(a) | {"load_avg_start": load_avg_start, "load_avg_end": os.getloadavg()[0]}
        write_child_result(a.child_json, rec)
        return 0
    return parent(a)


def parent(a) -> int:
    from simulate import dataset_path

    name = a.dataset or ("sim2k_d18" if a.quick else "sim1m_d18")
    path = dataset_path(name)
    print(f"versions: {tool_versions()}; torch threads {a.threads}; data {path}", flush=True)
    runs = [("backed", "setup"), ("backed", "train")]
    if a.in_memory:
        runs.append(("memory", "train"))
    rows = []
    for mode, task in runs:
        args = [
            "--task", task, "--mode", mode, "--data", path, "--epochs", a.epochs,
            "--batch-size", a.batch_size, "--seed", a.seed, "--threads", a.threads,
        ]  # fmt: skip
        rec = run_child(
            SCRIPT,
            args,
            timeout_s=a.timeout_min * 60,
            mem_limit_gb=a.mem_limit_gb,
            threads=a.threads,
            label=f"{task} {mode} {name}",
        )
        rows.append({"dataset": name, "mode": mode, "task": task} | rec)
    out_dir = a.out_dir or results_dir(a.quick)
    write_csv(out_dir / "backed.csv", rows, COLUMNS)
    print_table(
        rows,
        [
            ("mode", "counts"),
            ("task", "task"),
            ("n_obs", "cells"),
            ("setup_s", "setup s"),
            ("cells_per_s", "train cells/s"),
            ("peak_mb", "task peak MB"),
            ("peak_delta_mb", "task +MB"),
            ("latent_cells_per_s", "latent cells/s"),
            ("latent_peak_mb", "latent peak MB"),
            ("ru_maxrss_mb", "process peak MB"),
            ("load_avg_end", "load"),
        ],
    )
    backed = [r for r in rows if r["mode"] == "backed"]
    if not all(r["status"] == "ok" for r in backed):
        print("a backed task failed")
        return 1
    worst = max(r["ru_maxrss_mb"] for r in backed)
    ok = worst <= a.target_gb * 1024
    print(f"backed peak RSS {worst:,.0f} MB: {'within' if ok else 'NOT within'} {a.target_gb} GB")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
