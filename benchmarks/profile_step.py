"""Where an SCVI training step's time goes: its phases, and the part that does not scale.

Builds cellvae's SCVI module on ``bench_scvi.py``'s simulated counts (Kang-fitted, 2,000
genes, 8% nonzero or ``--density``, 4 batches; 128-cell minibatches) and times the training
loop's phases with ``perf_counter``: the minibatch fetch, the forward pass (with the encoder,
the decoder and the compiled likelihood inside it timed apart), the backward pass and the Adam
update. The same loop then runs on a tiny network (``cellvae.datasets.synthetic``: 20 genes,
8 hidden units) whose arithmetic is negligible, so its step time is the step's fixed cost:
Python, torch's dispatch of each operator and autograd's bookkeeping.

    .venv/bin/python benchmarks/profile_step.py [--hidden 128] [--n-obs 10000] [--epochs 3]
    .venv/bin/python benchmarks/profile_step.py --n-obs 100000 --density 0.18  # as the 1M set
    .venv/bin/python benchmarks/profile_step.py --autograd  # forward + backward, not training_step

The first epoch is warm-up and not counted. Prints a table (ms per step); writes nothing. This
is a script, not a test: on a shared VM, repeat it and compare medians.
"""

from __future__ import annotations

import argparse
import time

import anndata as ad
import torch
from _common import THREADS, init_child, print_table
from simulate import simulated

import cellvae
from cellvae import _kernels
from cellvae.train import Adam, _keep_freed_memory_in_heap


class Clock:
    """Seconds spent in wrapped callables, by name (wrappers replace the attributes)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def wrap(self, owner, attr: str, name: str) -> None:
        fn = getattr(owner, attr)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

        setattr(owner, attr, timed)


def training_parts(adata: ad.AnnData, n_hidden: int = 128):
    """SCVI's tensor data, module (training mode), trainable parameters and Adam, as train() has.

    glibc's heap thresholds are raised as ``train()`` raises them.
    """
    cellvae.SCVI.setup_anndata(adata, batch_key="batch")
    model = cellvae.SCVI(adata, n_hidden=n_hidden)
    data, _ = model._data(adata)
    module = model._build_module().train()
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = Adam(params, lr=1e-3)
    _keep_freed_memory_in_heap()
    return data, module, params, optimizer


def profile(adata: ad.AnnData, n_hidden: int, epochs: int, autograd: bool) -> dict[str, float]:
    """Milliseconds per step of each phase, over the epochs after the first.

    As ``train()`` steps: the module's hand-written ``training_step`` (forward and backward in
    one, the row "forward"), or with ``autograd`` its forward pass and ``loss.backward()``.
    """
    data, module, params, optimizer = training_parts(adata, n_hidden)
    clock = Clock()
    clock.wrap(module.z_encoder, "forward_kl", "  encoder")
    clock.wrap(module.decoder, "forward", "  decoder")
    clock.wrap(_kernels, "softmax_nb_zinb_log_prob_sum", "  likelihood kernel")
    phases = {"minibatch fetch": 0.0, "forward": 0.0, "backward": 0.0, "Adam": 0.0}
    fused = None if autograd else module.training_step
    steps = 0
    idx = torch.arange(adata.n_obs)
    for epoch in range(epochs):
        if epoch == 1:
            clock.seconds.clear()
        gen = torch.Generator().manual_seed(epoch)
        t0 = time.perf_counter()
        for batch in data.batches(idx, 128, shuffle=True, generator=gen):
            t1 = time.perf_counter()
            out = None if fused is None else fused(batch, 1.0)
            if out is None:
                out = module(batch, kl_weight=1.0)
            t2 = time.perf_counter()
            if out.loss.requires_grad:
                out.loss.backward()
            t3 = time.perf_counter()
            optimizer.step()
            for p in params:
                p.grad = None
            t4 = time.perf_counter()
            if epoch:
                steps += 1
                for key, dt in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                    phases[key] += dt
            t0 = time.perf_counter()
    ms = {k: 1e3 * v / steps for k, v in phases.items()}
    ms.update({k: 1e3 * v / steps for k, v in sorted(clock.seconds.items())})
    ms["step"] = sum(ms[k] for k in phases)
    return ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--n-obs", type=int, default=10_000, help="simulated cells")
    parser.add_argument("--density", type=float, default=0.08, help="nonzero fraction")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=THREADS)
    parser.add_argument(
        "--autograd", action="store_true", help="forward + loss.backward(), not training_step"
    )
    a = parser.parse_args()
    init_child(a.threads)
    data = ad.read_h5ad(simulated(a.n_obs, density=a.density))  # bench_scvi.py's, 2,000 genes
    full = profile(data, a.hidden, a.epochs, a.autograd)
    tiny_data = cellvae.datasets.synthetic(a.n_obs, 20, n_batches=4)
    tiny = profile(tiny_data, 8, a.epochs, a.autograd)
    order = ["minibatch fetch", "forward", "  encoder", "  decoder", "  likelihood kernel"]
    order += ["backward", "Adam", "step"]
    rows = [
        {"phase": k, "full": f"{full.get(k, 0.0):.2f}", "tiny": f"{tiny.get(k, 0.0):.2f}"}
        for k in order
    ]
    how = "forward + backward" if a.autograd else "training_step (its forward and backward)"
    print(f"SCVI training step, 128 cells, torch threads {a.threads}, {how}: ms per step")
    density = data.X.nnz / (data.n_obs * data.n_vars)
    print(f"full: {data.n_vars} genes ({density:.1%} nonzero), {a.hidden} hidden; "
          "tiny: 20 genes, 8 hidden (fixed cost)")  # fmt: skip
    print_table(rows, [("phase", "phase"), ("full", "full"), ("tiny", "tiny")])


if __name__ == "__main__":
    main()
