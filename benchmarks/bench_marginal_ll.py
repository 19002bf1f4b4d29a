"""``get_marginal_ll`` side by side: time and peak memory of the importance-sampled log p(x).

On the shipped Kang data (2,000 cells × 9,015 genes), each tool trains SCVI for ``--epochs``
epochs (defaults otherwise, seed 0, untimed), then the timed task is one ``get_marginal_ll`` of
the first ``--cells`` cells with ``--n-mc`` importance samples (scvi-tools' default, 1,000), at
batch size 128. Each tool runs in a fresh process on 2 threads; ``Measure`` gives the task's peak
RSS above its start. cellvae draws the samples in chunks of at most 2^20 samples × cells × genes
(before, all at once: 9.4 GB for 128 cells × 2,000 genes).

    .venv/bin/python benchmarks/bench_marginal_ll.py            # 128 cells, 1,000 samples
    .venv/bin/python benchmarks/bench_marginal_ll.py --quick    # 32 cells, 100 samples

Writes ``marginal_ll.csv`` to ``benchmarks/results/`` (``results/quick/`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from _common import (
    SEED,
    THREADS,
    Measure,
    init_child,
    print_table,
    ratio,
    results_dir,
    run_child,
    tool_versions,
    write_child_result,
    write_csv,
)

SCRIPT = Path(__file__).resolve()
TOOLS = ("cellvae", "scvi-tools")


def child(tool: str, cells: int, n_mc: int, epochs: int) -> dict[str, Any]:
    import numpy as np
    import torch

    import cellvae

    torch.manual_seed(SEED)
    adata = cellvae.datasets.kang_ifnb()
    if tool == "cellvae":
        cellvae.SCVI.setup_anndata(adata, batch_key="batch")
        model = cellvae.SCVI(adata).train(epochs, progress_bar=False, device="cpu")
    else:
        import scvi

        scvi.settings.seed = SEED
        scvi.model.SCVI.setup_anndata(adata, batch_key="batch")
        model = scvi.model.SCVI(adata)
        model.train(epochs, accelerator="cpu", enable_progress_bar=False)
    idx = np.arange(cells)
    with Measure() as m:
        value = model.get_marginal_ll(indices=idx, n_mc_samples=n_mc, batch_size=128)
    return {"marginal_ll": float(value), **m.record()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child-json")
    parser.add_argument("--tool", choices=TOOLS)
    parser.add_argument("--cells", type=int, default=128)
    parser.add_argument("--n-mc", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=THREADS)
    parser.add_argument("--quick", action="store_true", help="32 cells, 100 samples, 2 epochs")
    a = parser.parse_args(argv)
    if a.quick:
        a.cells, a.n_mc, a.epochs = 32, 100, 2
    if a.child_json:
        init_child(a.threads)
        write_child_result(a.child_json, child(a.tool, a.cells, a.n_mc, a.epochs))
        return 0
    print(f"get_marginal_ll of {a.cells} Kang cells, {a.n_mc} samples; {tool_versions()}")
    rows = []
    for tool in TOOLS:
        args = ["--tool", tool, "--cells", a.cells, "--n-mc", a.n_mc, "--epochs", a.epochs]
        record = run_child(SCRIPT, args, label=tool, mem_limit_gb=20, threads=a.threads)
        rows.append({"tool": tool, "cells": a.cells, "n_mc": a.n_mc, **record})
    mine, theirs = rows
    rows.append(
        {
            "tool": "ratio",
            "seconds": ratio(mine.get("seconds"), theirs.get("seconds")),
            "peak_delta_mb": ratio(mine.get("peak_delta_mb"), theirs.get("peak_delta_mb")),
        }
    )
    columns = [
        ("tool", "tool"),
        ("status", "status"),
        ("marginal_ll", "log p(x)"),
        ("seconds", "seconds"),
        ("peak_delta_mb", "peak above start (MB)"),
    ]
    print_table(rows, columns)
    write_csv(results_dir(a.quick) / "marginal_ll.csv", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
