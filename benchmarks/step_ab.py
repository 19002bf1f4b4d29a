"""The hand-written training step against forward + autograd, step by step on the same minibatches.

Two copies of the same module (SCVI's on ``bench_scvi.py``'s simulated 10k cells, 128-cell
minibatches; or totalVI's on ``bench_totalvi.py``'s citesim data, 256-cell minibatches, with
its hyper-parameters) train side by side: for each minibatch one copy takes the module's
``training_step`` (gradients written by hand) and the other its forward pass and
``loss.backward()``, in alternating order, each followed by the Adam update as in ``train()``.
The VM's speed drifts by ±30% within minutes; alternating step by step, both paths see the same
drift, so the ratio of each pair of step times is stable where their absolute values are not.
The first epoch is warm-up and not counted. Prints the median step time of each path and the
median and mean of the per-step ratio.

    .venv/bin/python benchmarks/step_ab.py --model totalvi [--epochs 3] [--n-obs 8000]
    .venv/bin/python benchmarks/step_ab.py --model scvi

A script, not a test; writes nothing.
"""

from __future__ import annotations

import argparse
import copy
import time

import anndata as ad
import numpy as np
import torch
from _common import THREADS, init_child
from bench_totalvi import HPARAMS, PROTEIN_KEY
from simulate import simulated, simulated_cite

import cellvae
from cellvae.train import Adam, _keep_freed_memory_in_heap


def build(model: str, n_obs: int):
    """The tensor data and the training-mode module, as ``train()`` has them."""
    if model == "scvi":
        adata = ad.read_h5ad(simulated(n_obs))
        cellvae.SCVI.setup_anndata(adata, batch_key="batch")
        fitted = cellvae.SCVI(adata)
    else:
        adata = ad.read_h5ad(simulated_cite(20_000))[:n_obs].copy()
        cellvae.TOTALVI.setup_anndata(
            adata, protein_expression_obsm_key=PROTEIN_KEY, batch_key="batch"
        )
        fitted = cellvae.TOTALVI(adata, **HPARAMS)
    data, _ = fitted._data(adata)
    return adata.n_obs, data, fitted._build_module().train()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=("scvi", "totalvi"), default="totalvi")
    parser.add_argument("--n-obs", type=int, default=None, help="cells (10,000 / 8,000)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=THREADS)
    a = parser.parse_args()
    init_child(a.threads)
    n_obs = a.n_obs or (10_000 if a.model == "scvi" else 8_000)
    batch_size = 128 if a.model == "scvi" else 256
    n_obs, data, hand = build(a.model, n_obs)
    auto = copy.deepcopy(hand)
    paths = []
    for module in (hand, auto):
        params = [p for p in module.parameters() if p.requires_grad]
        paths.append((module, params, Adam(params, lr=1e-3)))
    _keep_freed_memory_in_heap()
    times: list[list[float]] = [[], []]
    idx = torch.arange(n_obs)
    for epoch in range(a.epochs):
        gen = torch.Generator().manual_seed(epoch)
        for i, batch in enumerate(data.batches(idx, batch_size, shuffle=True, generator=gen)):
            for which in (0, 1) if i % 2 else (1, 0):
                module, params, optimizer = paths[which]
                t0 = time.perf_counter()
                out = module.training_step(batch, 1.0) if which == 0 else None
                if out is None:
                    out = module(batch, kl_weight=1.0)
                    out.loss.backward()
                optimizer.step()
                for p in params:
                    p.grad = None
                if epoch:
                    times[which].append(time.perf_counter() - t0)
    hand_s, auto_s = np.array(times[0]), np.array(times[1])
    ratio = hand_s / auto_s
    print(f"{a.model}: {len(ratio)} steps of {batch_size} cells, torch threads {a.threads}")
    print(f"hand-written step: median {1e3 * np.median(hand_s):.2f} ms")
    print(f"forward + backward: median {1e3 * np.median(auto_s):.2f} ms")
    print(f"per-step ratio: median {np.median(ratio):.3f}, mean {ratio.mean():.3f}")


if __name__ == "__main__":
    main()
