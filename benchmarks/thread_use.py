"""What each of the two threads does during SCVI training steps, sampled with Linux ``perf``.

Runs ``profile_step.py``'s loop (cellvae's SCVI module on ``bench_scvi.py``'s simulated 10k
cells, 128-cell minibatches, torch threads 2) in a child process under ``perf record``; the
samples are taken only during the timed steps (``perf``'s control FIFO enables them after a
warm-up epoch). For each thread it prints the share of its samples in each library: the main
thread's Python interpreter and torch's dispatch are the step's serial part, and the OpenMP
worker's samples in ``libgomp`` are time it spent waiting (spinning) for the next parallel
region, i.e. the share of the step in which the second core did no work. It also prints the
hardware counters of the same steps (``perf stat``): instructions stay within ~0.3% from run to
run where cycles and wall time move with the VM's load.

    .venv/bin/python benchmarks/thread_use.py [--steps 210] [--autograd]

Needs ``perf`` (Debian's linux-perf) with sampling allowed; prints a table, writes nothing
outside a temporary folder. A script, not a test.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def child(steps: int, ctl: str, autograd: bool) -> None:
    """The measured process: warm up one epoch, then time ``steps`` steps with sampling on.

    Each step as ``train()`` takes it (``training_step``), or with ``autograd`` as the module's
    forward pass and ``loss.backward()``.
    """
    import anndata as ad
    import torch
    from _common import init_child
    from profile_step import training_parts
    from simulate import simulated

    init_child(2)
    adata = ad.read_h5ad(simulated(10_000))  # bench_scvi.py's, 2,000 genes, 8% nonzero
    data, module, params, optimizer = training_parts(adata)
    idx = torch.arange(adata.n_obs)

    def run(n: int, epoch: int) -> int:
        gen = torch.Generator().manual_seed(epoch)
        done = 0
        for batch in data.batches(idx, 128, shuffle=True, generator=gen):
            if done == n:
                break
            if autograd or module.training_step(batch, 1.0) is None:
                module(batch, kl_weight=1.0).loss.backward()
            optimizer.step()
            for p in params:
                p.grad = None
            done += 1
        return done

    run(10**9, 0)  # warm-up epoch
    with open(ctl, "w") as fifo:
        fifo.write("enable\n")
        fifo.flush()
        t0, done, epoch = time.perf_counter(), 0, 1
        while done < steps:
            done += run(steps - done, epoch)
            epoch += 1
        wall = time.perf_counter() - t0
        fifo.write("disable\n")
        fifo.flush()
    print(f"CHILD {wall / steps * 1e3:.2f}")


def perf_run(args: list[str], tmp: Path, steps: int, autograd: bool) -> float:
    """Run the child under ``perf`` with ``args``; return its ms per step."""
    ctl = tmp / "ctl.fifo"
    if ctl.exists():
        ctl.unlink()
    os.mkfifo(ctl)
    cmd = ["perf", *args, "-D", "-1", "--control", f"fifo:{ctl}", "--"]
    cmd += [sys.executable, __file__, "--child", "--steps", str(steps), "--ctl", str(ctl)]
    cmd += ["--autograd"] if autograd else []
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    line = next(v for v in out.stdout.splitlines() if v.startswith("CHILD "))
    return float(line.split()[1])


def library(dso: str) -> str:
    name = Path(dso.strip("()")).name
    for key, label in (
        ("libgomp", "libgomp (OpenMP: waiting)"),
        ("libtorch_cpu", "libtorch_cpu (MKL products, torch operators)"),
        ("_ckernels", "cellvae kernels"),
        ("libmvec", "libmvec (kernels' exp / log)"),
        ("libpython", "Python interpreter"),
        ("libtorch_python", "torch's Python bindings"),
    ):
        if key in name:
            return label
    return "other (libc, c10, kernel, ...)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=210)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--ctl", help=argparse.SUPPRESS)
    p.add_argument(
        "--autograd", action="store_true", help="forward + loss.backward(), not training_step"
    )
    a = p.parse_args()
    if a.child:
        child(a.steps, a.ctl, a.autograd)
        return
    if shutil.which("perf") is None:
        sys.exit("perf is not installed (Debian: apt-get install linux-perf).")
    tmp = Path(tempfile.mkdtemp(prefix="cellvae_thread_use_"))
    try:
        data = tmp / "perf.data"
        ms = perf_run(["record", "-F", "2000", "-o", str(data)], tmp, a.steps, a.autograd)
        script = subprocess.run(
            ["perf", "script", "-i", str(data), "-F", "tid,ip,dso"],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        for row in script.splitlines():
            parts = row.split()
            if len(parts) >= 3:
                counts[parts[0]][library(parts[-1])] += 1
        stat = tmp / "stat.txt"
        ms_stat = perf_run(
            ["stat", "-x", ",", "-e", "instructions,cycles", "-o", str(stat)],
            tmp,
            a.steps,
            a.autograd,
        )
        counters = {}
        for row in stat.read_text().splitlines():
            fields = row.split(",")
            if len(fields) > 2 and fields[0].replace(".", "").isdigit():
                counters[fields[2]] = float(fields[0]) / a.steps
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    threads = sorted(counts, key=lambda t: -sum(counts[t].values()))[:2]
    names = ["main thread", "OpenMP worker"]
    how = "forward + loss.backward()" if a.autograd else "training_step"
    print(f"SCVI training step ({how}), 128 cells, 2 threads: {ms:.2f} ms per step")
    for name, tid in zip(names, threads):
        total = sum(counts[tid].values())
        print(f"\n{name} (tid {tid}, {total} samples): share of its samples")
        for lib, n in counts[tid].most_common():
            print(f"  {lib:48s} {100 * n / total:5.1f}%")
    print(f"\nper step, a second run ({ms_stat:.2f} ms per step):")
    for k, v in counters.items():
        print(f"  {k:14s} {v / 1e6:8.2f} million")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
