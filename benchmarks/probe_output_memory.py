"""How much of normalised-expression time is writing the output? (cellvae only, 100k cells)

Trains SCVI for one epoch on the simulated 100k × 2,000 set, then, twice: allocates and fills an
array the size of the output (the cost of first-touching 763 MB), computes the normalised
expression of all cells at once, and of the same cells in 5 chunks of 20k.

    .venv/bin/python benchmarks/probe_output_memory.py [path/to/sim_100000.h5ad]
"""

import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import torch

import cellvae

torch.set_num_threads(2)
default = Path(__file__).resolve().parent / "results" / "sim_100000.h5ad"
adata = ad.read_h5ad(sys.argv[1] if len(sys.argv) > 1 else default)
n = adata.n_obs
cellvae.SCVI.setup_anndata(adata, batch_key="batch")
model = cellvae.SCVI(adata).train(1, progress_bar=False, device="cpu", validation_size=0.0)
for _ in range(2):
    t = time.perf_counter()
    bare = np.empty(adata.shape, np.float32)
    bare.fill(1.0)
    t_fill = time.perf_counter() - t
    del bare
    t = time.perf_counter()
    out = model.get_normalized_expression(return_numpy=True)
    t_all = time.perf_counter() - t
    del out
    t = time.perf_counter()
    for start in range(0, n, n // 5):
        out = model.get_normalized_expression(
            return_numpy=True, indices=np.arange(start, min(n, start + n // 5))
        )
        del out
    t_chunks = time.perf_counter() - t
    print(
        f"allocate + fill {adata.shape}: {t_fill:.2f} s | normalised, all cells: {t_all:.2f} s "
        f"({n / t_all:,.0f} cells/s) | in 5 chunks: {t_chunks:.2f} s ({n / t_chunks:,.0f} cells/s)"
    )
