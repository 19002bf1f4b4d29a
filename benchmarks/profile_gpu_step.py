"""Where a cellvae SCVI training step spends its time on a GPU: torch.profiler over one epoch.

On the H100 of session 14 (benchmarks/README.md, "GPU") the GPU was busy 17-22% of the time
at batch size 128: the step is bound by the host (Python and the launch of each kernel). This
script counts, per training step, the kernel launches, the host-device synchronisations and
copies, and prints the operators that take the most host time, then the step time at several
batch sizes (a host-bound step takes about the same time whatever the batch size).

    python benchmarks/profile_gpu_step.py               # CUDA when available, else CPU
    python benchmarks/profile_gpu_step.py --cells 5000  # smaller
"""

from __future__ import annotations

import argparse
import time

import torch

import cellvae


def synthetic(n_cells: int, n_genes: int, density: float, seed: int = 0):
    """Counts with about ``density`` nonzeros and 4 batches (the simulation's shape, made fast)."""
    import anndata as ad
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    X = sp.random(n_cells, n_genes, density=density, format="csr", random_state=rng, dtype=None)
    X.data = rng.poisson(3.0, X.nnz).astype(np.float32) + 1
    obs = pd.DataFrame({"batch": rng.choice(list("abcd"), n_cells)}, index=map(str, range(n_cells)))
    return ad.AnnData(X.astype(np.float32), obs=obs)


def steps_of(model, device, batch_size, epochs=1) -> tuple[float, int]:
    """Seconds per training step of ``epochs`` epochs without validation (after a warm-up)."""
    steps = []

    def count(module, args):
        if module.training:
            steps.append(time.perf_counter())

    handle = model.module.register_forward_pre_hook(count) if model.is_trained_ else None
    t0 = time.perf_counter()
    model.train(
        epochs, batch_size=batch_size, validation_size=0.0, device=device, progress_bar=False
    )
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    if handle is not None:
        handle.remove()
    return seconds / max(len(steps), 1), len(steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cells", type=int, default=20_000)
    parser.add_argument("--genes", type=int, default=2_000)
    parser.add_argument("--density", type=float, default=0.08)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 512, 2048])
    a = parser.parse_args()
    adata = synthetic(a.cells, a.genes, a.density)
    cellvae.SCVI.setup_anndata(adata, batch_key="batch")
    model = cellvae.SCVI(adata)
    steps_of(model, a.device, 128)  # warm-up: builds the module, CUDA context, kernels

    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if a.device.startswith("cuda"):
        activities.append(ProfilerActivity.CUDA)
    n_steps = []
    with profile(activities=activities) as prof:
        n_steps.append(steps_of(model, a.device, 128)[1])
    events = prof.key_averages()
    per_step = max(n_steps[0], 1)
    runtime = ("cudaLaunchKernel", "cudaStreamSynchronize", "cudaMemcpyAsync")
    print(f"{per_step} steps of 128 cells on {a.device}; per step:")
    for name in runtime:
        count = sum(e.count for e in events if e.key == name)
        if count:
            print(f"  {name:24s} {count / per_step:8.1f}")
    print(events.table(sort_by="self_cpu_time_total", row_limit=25))

    print("batch size  s/step  cells/s")
    for bs in a.batch_sizes:
        seconds, n = steps_of(model, a.device, bs)
        print(f"{bs:10d}  {seconds * 1e3:6.2f} ms  {bs / seconds:9,.0f}  ({n} steps)")


if __name__ == "__main__":
    main()
