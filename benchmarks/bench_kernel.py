"""The compiled NB / ZINB likelihood alone: time and minor page faults per call, 1 and 2 threads.

A minibatch of 128 cells x 2,000 genes with 8% nonzero counts (mu ~ lognormal(0, 1.5), theta
~ lognormal(0, 1) per gene, dropout logits ~ N(0, 1), counts 1-19: the ranges of training) is
passed to ``cellvae._kernels.nb_zinb_log_prob_sum`` in a loop: the ZINB and the NB with
gradients (as in a training step), the ZINB without (as in the getters), and the dense pass
alone (no nonzeros). Each call's minor page faults are counted with ``getrusage``.

The process allocates nothing large before the loop, on purpose: until a process has freed a
large block, glibc serves blocks above 128 KB by ``mmap``. Session 16 found the kernel
allocating and freeing its ~1.6 MB scratch at each call, faulting its pages in again every time
(this script at 9e717cb: 3.1 ms and 1,118 faults per ZINB call with gradients; after the fix,
1.2-1.6 ms and none).
``train()`` was not affected: its loop raises glibc's thresholds before the first step.

    .venv/bin/python benchmarks/bench_kernel.py

Prints a table; writes nothing. This is a script, not a test.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import numpy as np
import torch
from _common import THREADS, print_table


def per_call(fn, n: int) -> tuple[float, float]:
    """Milliseconds and minor page faults per call of ``fn`` (median of 5 blocks of ``n``)."""
    for _ in range(5):
        fn()
    times, faults = [], []
    for _ in range(5):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        times.append((time.perf_counter() - t0) / n * 1e3)
        faults.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / n)
    return statistics.median(times), statistics.median(faults)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=50, help="calls per timed block")
    parser.add_argument("--quick", action="store_true", help="10 calls per timed block")
    a = parser.parse_args(argv)
    if a.quick:
        a.calls = 10
    from cellvae import _kernels

    if not _kernels.available():
        print("The compiled kernels are not built here (or CELLVAE_NO_KERNELS is set).")
        return 1
    rng = np.random.default_rng(0)
    n_cells, n_genes = 128, 2000
    mu = torch.from_numpy(np.exp(rng.normal(0, 1.5, (n_cells, n_genes))).astype(np.float32))
    theta = torch.from_numpy(np.exp(rng.normal(0, 1, n_genes)).astype(np.float32))
    pi = torch.from_numpy(rng.normal(0, 1, (n_cells, n_genes)).astype(np.float32))
    r, c = np.nonzero(rng.random((n_cells, n_genes)) < 0.08)
    row, col = torch.from_numpy(r.astype(np.int64)), torch.from_numpy(c.astype(np.int64))
    val = torch.from_numpy(rng.integers(1, 20, len(r)).astype(np.float32))
    none = torch.empty(0, dtype=torch.long)

    def call(p, rw, cl, v, grad):
        return lambda: _kernels.nb_zinb_log_prob_sum(mu, theta, p, v, rw, cl, 1e-8, grad)

    cases = [
        ("ZINB with gradients", call(pi, row, col, val, True)),
        ("NB with gradients", call(None, row, col, val, True)),
        ("ZINB, no gradients", call(pi, row, col, val, False)),
        ("ZINB dense pass alone, with gradients", call(pi, none, none, torch.empty(0), True)),
    ]
    rows = []
    for what, fn in cases:
        row = {"what": what}
        for n_threads in (1, THREADS):
            torch.set_num_threads(n_threads)
            ms, faults = per_call(fn, a.calls)
            row[f"ms{n_threads}"], row[f"f{n_threads}"] = f"{ms:.3f}", f"{faults:.1f}"
        rows.append(row)
    print(f"{n_cells} cells x {n_genes:,} genes, {len(r):,} nonzeros")
    columns = [("what", "kernel call")]
    for n in (1, THREADS):
        columns += [(f"ms{n}", f"ms / call, {n} thr."), (f"f{n}", f"faults / call, {n} thr.")]
    print_table(rows, columns)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
