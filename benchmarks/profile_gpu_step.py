"""Where a cellvae SCVI training step spends its time on a GPU: torch.profiler over one epoch.

On the H100 of session 14 (benchmarks/README.md, "GPU") the GPU was busy 17-22% of the time
at batch size 128: the step is bound by the host (Python and the launch of each kernel). This
script counts, per training step, the kernel launches, the host-device synchronisations and
copies, and prints the operators that take the most host time, then the step time at several
batch sizes (a host-bound step takes about the same time whatever the batch size).

    python benchmarks/profile_gpu_step.py               # CUDA when available, else CPU
    python benchmarks/profile_gpu_step.py --cells 5000  # smaller
    python benchmarks/profile_gpu_step.py --syncs       # only where the step waits for the GPU
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from _common import EpochClock

import cellvae
from cellvae.module import VAE


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
    """Seconds per training step of ``epochs`` epochs without validation, and the step count."""
    with EpochClock(VAE) as clock:  # a timestamp per training step, module built or not
        t0 = time.perf_counter()
        model.train(
            epochs, batch_size=batch_size, validation_size=0.0, device=device, progress_bar=False
        )
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    return seconds / max(len(clock.times), 1), len(clock.times)


def sync_sites(model, device: str, n_steps: int = 20) -> None:
    """Print where the training step makes the host wait for the GPU, with counts per step.

    torch's sync debug mode warns at every synchronising operation; the warning's call stack,
    cut to cellvae's frames, names the line.
    """
    import traceback
    import warnings
    from collections import Counter

    sites: Counter[str] = Counter()
    steps = []

    package = f"{os.sep}cellvae{os.sep}"

    class Enough(Exception):
        pass

    def record(message, category, filename, lineno, file=None, line=None):
        frames = [f for f in traceback.extract_stack() if package in f.filename][::-1][:3]
        where = " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in frames)
        sites[where or f"{filename}:{lineno}"] += 1

    def count(module, args):
        if module.training:
            steps.append(1)
            if len(steps) > n_steps:
                raise Enough

    handle = model.module.register_forward_pre_hook(count)
    show = warnings.showwarning
    warnings.showwarning = record
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            model.train(1, batch_size=128, validation_size=0.0, device=device, progress_bar=False)
    except Enough:
        pass
    finally:
        torch.cuda.set_sync_debug_mode("default")
        warnings.showwarning = show
        handle.remove()
    print(f"host-device synchronisations in {n_steps} training steps, by place:")
    for where, n in sites.most_common():
        print(f"  {n / n_steps:5.2f} per step  {where}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cells", type=int, default=20_000)
    parser.add_argument("--genes", type=int, default=2_000)
    parser.add_argument("--density", type=float, default=0.08)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 512, 2048])
    parser.add_argument("--syncs", action="store_true", help="only list the synchronisations")
    a = parser.parse_args()
    adata = synthetic(a.cells, a.genes, a.density)
    cellvae.SCVI.setup_anndata(adata, batch_key="batch")
    model = cellvae.SCVI(adata)
    steps_of(model, a.device, 128)  # warm-up: builds the module, CUDA context, kernels
    if a.syncs:
        sync_sites(model, a.device)
        return

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
    if a.device.startswith("cuda"):
        sync_sites(model, a.device)


if __name__ == "__main__":
    main()
