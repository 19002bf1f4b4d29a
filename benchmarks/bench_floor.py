"""Where one SCVI training step's time goes, and the ceiling the matrix products set.

Issue 5 asks for SCVI training at >= 5x scvi-tools' throughput and estimates a floor of ~20 µs
per cell from ~250 GFLOP/s of float32 matrix multiply on these 2-core machines. This script
measures that floor instead of assuming it, side by side with both tools' training steps, on
the same minibatches of 128 cells and 2 threads:

1. the matrix-multiply rate of this machine (a 1,024^3 product and the network's own shapes);
2. the matrix products of one training step of the default network alone, replayed on
   preallocated tensors (forward and backward; cellvae's first layer reads the CSR batch, so
   its product is left out of cellvae's floor; scvi-tools' first layer is a dense product);
3. the fused Adam update of the default network's parameters;
4. one full training step of each tool's module (forward, loss, backward, Adam), without data
   loading: a lower bound of scvi-tools' ``train()`` step, which also densifies the minibatch
   in scipy and slices pandas;
5. the same two steps in bf16 mixed precision: cellvae's ``bf16_products`` (what
   ``train(precision="bf16-mixed")``, and ``"auto"`` on CPUs with AVX512-BF16 / AMX, run) and
   scvi-tools' forward pass under ``torch.autocast("cpu", torch.bfloat16)`` (what Lightning's
   ``precision="bf16-mixed"`` runs).

The "ceiling" column is how fast a step could run if everything but the matrix products and
the Adam update were free. Its ratio to scvi-tools' module step bounds the speed-up any
float32 implementation of the same network can reach on this machine.

    .venv/bin/python benchmarks/bench_floor.py              # 100k x 2,000 simulation (cached)
    .venv/bin/python benchmarks/bench_floor.py --n-obs 10000 --repeats 3   # quicker

Writes ``benchmarks/results/floor.csv`` (``results/quick/`` with ``--quick``). This is a script,
not a test.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import anndata as ad
import numpy as np
import torch
from _common import THREADS, init_child, print_table, results_dir, write_csv
from simulate import simulated

BATCH = 128
N_HIDDEN, N_LATENT, N_BATCH = 128, 10, 4


def timed(fn: Callable[[], None], n: int) -> float:
    """Mean seconds per call of ``fn`` over one block of ``n`` calls, after a short warm-up."""
    for _ in range(max(3, n // 10)):
        fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def gemm_rate(repeats: int) -> float:
    """GFLOP/s of one float32 1,024 x 1,024 x 1,024 product."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    return 2 * 1024**3 / statistics.median(timed(lambda: a @ b, 10) for _ in range(repeats)) / 1e9


def gemm_step(n_genes: int, dense_first_layer: bool):
    """The matrix products of one training step of the default SCVI network, on fixed tensors.

    Returns ``(step, flops)``. Forward: encoder layer (genes -> 128), the two 128 -> 10 heads of
    q(z), the decoder layer (10 + batches -> 128) and the two 128 -> genes heads (scale,
    dropout). Backward: a weight gradient for every layer and an input gradient for every layer
    but the first.
    """
    g, h, d, k = n_genes, N_HIDDEN, N_LATENT, N_LATENT + N_BATCH
    r = torch.randn
    x, w1, b1 = r(BATCH, g), r(g, h), r(h)
    hid, w_mu, b_mu = r(BATCH, h), r(h, d), r(d)
    z, w_dec, b_dec = r(BATCH, k), r(k, h), r(h)
    w_out, b_out, dy = r(h, g), r(g), r(BATCH, g)
    dz, dhid = r(BATCH, d), r(BATCH, h)
    products = []  # (function, flops)
    if dense_first_layer:
        products += [(lambda: torch.addmm(b1, x, w1), 2 * BATCH * g * h)]
        products += [(lambda: x.t() @ dhid, 2 * BATCH * g * h)]  # weight gradient only
    for _ in range(2):  # q(z) mean and variance heads
        products += [(lambda: torch.addmm(b_mu, hid, w_mu), 2 * BATCH * h * d)]
        products += [(lambda: hid.t() @ dz, 2 * BATCH * h * d)]
        products += [(lambda: dz @ w_mu.t(), 2 * BATCH * h * d)]
    products += [(lambda: torch.addmm(b_dec, z, w_dec), 2 * BATCH * k * h)]
    products += [(lambda: z.t() @ dhid, 2 * BATCH * k * h)]
    products += [(lambda: dhid @ w_dec.t(), 2 * BATCH * k * h)]
    for _ in range(2):  # scale and dropout output layers
        products += [(lambda: torch.addmm(b_out, hid, w_out), 2 * BATCH * h * g)]
        products += [(lambda: hid.t() @ dy, 2 * BATCH * h * g)]
        products += [(lambda: dy @ w_out.t(), 2 * BATCH * h * g)]
    flops = sum(f for _, f in products)

    def step():
        for fn, _ in products:
            fn()

    return step, flops


def minibatches(adata: ad.AnnData, n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.choice(adata.n_obs, BATCH, replace=False) for _ in range(n)]


def cellvae_step(adata: ad.AnnData, batches: list[np.ndarray], bf16: bool = False):
    """A step of cellvae's module: forward, loss, backward and Adam (as in ``train_module``).

    ``bf16``: the forward pass inside ``bf16_products``, as ``train(precision="bf16-mixed")``.
    """
    import cellvae
    from cellvae._data import TensorData
    from cellvae.nn import bf16_products
    from cellvae.train import Adam

    cellvae.pp.setup_anndata(adata, batch_key="batch")
    td = TensorData.from_adata(adata)
    model = cellvae.SCVI(adata)
    module = model._build_module()
    params = list(module.parameters())
    opt = Adam(params, lr=1e-3, eps=0.01, weight_decay=1e-6)
    data = [td[torch.from_numpy(b)] for b in batches]
    state = {"i": 0}

    def step():  # as train() steps: the hand-written step in float32
        batch = data[state["i"] % len(data)]
        module.zero_grad()
        out = None if bf16 else module.training_step(batch, 0.5)
        if out is None:
            with bf16_products(bf16):
                out = module(batch, kl_weight=0.5)
            out.loss.backward()
        opt.step()
        state["i"] += 1

    def adam():
        opt.step()

    step()  # gradients exist for the Adam-only timing
    return step, adam


def scvi_tools_step(adata: ad.AnnData, batches: list[np.ndarray], bf16: bool = False):
    """A step of scvi-tools' module on the same cells (dense minibatches, as its loader gives).

    ``bf16``: the forward pass under ``torch.autocast("cpu", torch.bfloat16)``, which is what
    Lightning's ``precision="bf16-mixed"`` does on the CPU.
    """
    from scvi.module import VAE

    module = VAE(n_input=adata.n_vars, n_batch=N_BATCH)
    opt = torch.optim.Adam(module.parameters(), lr=1e-3, eps=0.01, weight_decay=1e-6)
    codes = adata.obs["batch"].cat.codes.to_numpy()
    data = []
    for b in batches:
        x = torch.from_numpy(adata.X[np.sort(b)].toarray().astype(np.float32))
        batch = torch.from_numpy(codes[np.sort(b)].astype(np.int64)).unsqueeze(1)
        data.append({"X": x, "batch": batch, "labels": torch.zeros_like(batch)})
    state = {"i": 0}

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            _, _, losses = module(data[state["i"] % len(data)], loss_kwargs={"kl_weight": 0.5})
        opt.zero_grad(set_to_none=True)
        losses.loss.backward()
        opt.step()
        state["i"] += 1

    return step


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-obs", type=int, default=100_000, help="simulated cells (8%% nonzero)")
    p.add_argument("--steps", type=int, default=40, help="steps per timed block")
    p.add_argument("--repeats", type=int, default=7, help="timed blocks; the median is kept")
    p.add_argument("--threads", type=int, default=THREADS)
    p.add_argument("--quick", action="store_true", help="2,000 cells, short blocks (smoke run)")
    a = p.parse_args(argv)
    if a.quick:
        a.n_obs, a.steps, a.repeats = 2_000, 10, 2
    init_child(a.threads)
    adata = ad.read_h5ad(simulated(a.n_obs))
    batches = minibatches(adata, a.steps, seed=0)
    n, reps = a.steps, a.repeats

    peak = gemm_rate(reps)
    gemm_c, flops_c = gemm_step(adata.n_vars, dense_first_layer=False)
    gemm_s, _ = gemm_step(adata.n_vars, dense_first_layer=True)
    step_c, adam = cellvae_step(adata, batches)
    step_c16, _ = cellvae_step(adata, batches, bf16=True)
    try:
        step_s = scvi_tools_step(adata, batches)
        step_s16 = scvi_tools_step(adata, batches, bf16=True)
    except ImportError:  # the bench extra is not installed
        step_s = step_s16 = None

    # alternate the measurements so that a slow phase of the machine hits all of them
    keys = ("gemm_c", "gemm_s", "adam", "cellvae", "cellvae16", "scvi-tools", "scvi-tools16")
    t = {k: [] for k in keys}
    for _ in range(reps):
        t["gemm_c"].append(timed(gemm_c, n))
        t["gemm_s"].append(timed(gemm_s, n))
        t["adam"].append(timed(adam, n))
        t["cellvae"].append(timed(step_c, n))
        t["cellvae16"].append(timed(step_c16, n))
        if step_s is not None:
            t["scvi-tools"].append(timed(step_s, n))
            t["scvi-tools16"].append(timed(step_s16, n))
    ms = {k: statistics.median(v) * 1e3 if v else float("nan") for k, v in t.items()}
    floor_c, floor_s = ms["gemm_c"] + ms["adam"], ms["gemm_s"] + ms["adam"]
    ref = ms["scvi-tools"]

    def row(key, what, value_ms, note=""):
        return {
            "key": key,
            "what": what,
            "ms_per_step": round(value_ms, 3),
            "cells_per_s": round(BATCH / value_ms * 1e3),
            "scvi_tools_step_over_this": round(ref / value_ms, 2),
            "note": note,
        }

    rate_c = flops_c / ms["gemm_c"] / 1e6
    rows = [
        row("products_cellvae", "cellvae: matrix products", ms["gemm_c"], f"{rate_c:.0f} GFLOP/s"),
        row("adam_cellvae", "cellvae: Adam update", ms["adam"]),
        row("ceiling_cellvae", "cellvae: ceiling (products + Adam)", floor_c),
        row("step_cellvae", "cellvae: module step, measured", ms["cellvae"]),
        row("step16_cellvae", "cellvae: module step, bf16-mixed", ms["cellvae16"], "bf16 products"),
        row("ceiling_scvi-tools", "scvi-tools: ceiling", floor_s, "dense first layer"),
        row("step_scvi-tools", "scvi-tools: module step, measured", ref, "no data loading"),
        row(
            "step16_scvi-tools",
            "scvi-tools: module step, bf16-mixed",
            ms["scvi-tools16"],
            "autocast",
        ),
    ]
    columns = [
        ("what", "what"),
        ("ms_per_step", "ms / step"),
        ("cells_per_s", "cells/s"),
        ("scvi_tools_step_over_this", "scvi-tools step / this"),
        ("note", "note"),
    ]
    print(
        f"\n{a.n_obs:,} cells x {adata.n_vars:,} genes, batch {BATCH}, {a.threads} threads; "
        f"float32 matrix multiply: {peak:.0f} GFLOP/s at 1,024^3 on this machine"
    )
    print_table(rows, columns)
    extra = {"n_obs": a.n_obs, "threads": a.threads, "gemm_gflops_1024": round(peak, 1)}
    write_csv(results_dir(a.quick) / "floor.csv", [{**r, **extra} for r in rows])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
