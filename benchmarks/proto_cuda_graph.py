"""Prototype, not yet run on a GPU: the SCVI training step replayed as one CUDA graph.

Why: on an H100 (benchmarks/README.md, "GPU") a step at batch size 128 costs 7-8 ms of host
time (246 kernel launches) for 0.94 ms of GPU work. A CUDA graph launches the whole step
(forward, backward, Adam) at once. It should bring the step near the 0.94 ms: about 6-8x
today's, and over 5x scvi-tools. That is a prediction, to be measured with this script.

How: a graph replays fixed shapes, but a minibatch's number of stored counts varies. The
minibatch is therefore gathered as usual (outside the graph, with its entry count summed on the
host, no sync) and copied into static buffers of a fixed ``capacity``. The capacity is the most
entries any ``batch_size`` cells can hold. The unused tail holds zeros at positions where the
minibatch stores nothing, which the likelihoods and the sparse first layer ignore (``--check``
verifies that, also on the CPU; zeros at a stored entry's position would not be ignored). The
KL weight is a device scalar filled before each replay. Adam (``cellvae.train.Adam``, fused,
with its step counts on the device) runs inside the graph. The default CUDA generator keeps
dropout random across replays.

    python benchmarks/proto_cuda_graph.py --check  # padded == unpadded loss, gradients (CPU too)
    python benchmarks/proto_cuda_graph.py          # on CUDA: eager vs graph step time, losses

Integrating it into ``cellvae.train`` (a ``cuda_graph`` option) is next if the timing holds.
"""

from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import torch
from profile_gpu_step import synthetic

import cellvae
from cellvae._data import BatchSampler, TensorData
from cellvae._sparse import CSRBatch
from cellvae.train import Adam


def capacity_of(data: TensorData, batch_size: int) -> int:
    """The most stored entries ``batch_size`` cells can have: the sum of the largest rows."""
    ptr = data._host_indptr if data._host_indptr is not None else data.indptr
    lengths = np.diff(ptr.cpu().numpy().astype(np.int64))
    return int(np.sort(lengths)[::-1][:batch_size].sum())


def padding(x: CSRBatch, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(row, col)`` of ``capacity − len(x.val)`` positions where ``x`` stores no entry.

    Zeros at such positions change nothing; at a stored entry's position they would (the
    likelihoods' gradients are written per position). The free positions come first in a
    stable sort of the occupancy map: no host synchronisation, since their number is known.
    """
    n_rows, n_cols = x.shape
    extra = capacity - len(x.val)
    if extra < 0:
        raise ValueError(f"{len(x.val)} entries do not fit a capacity of {capacity}.")
    occupied = torch.zeros(n_rows * n_cols, dtype=torch.int8, device=x.val.device)
    occupied.index_fill_(0, x.row * n_cols + x.col, 1)
    free = torch.argsort(occupied, stable=True)[:extra]
    return free // n_cols, free % n_cols


def pad(x: CSRBatch, capacity: int) -> CSRBatch:
    """``x`` with zeros at free positions up to ``capacity`` entries, appended after the last.

    The appended zeros fall in the last row's bag of the sparse first layer, where their weight
    0 adds nothing; the likelihoods place them by their own (row, col).
    """
    row, col = padding(x, capacity)
    return CSRBatch(
        torch.cat([x.row, row]),
        torch.cat([x.col, col]),
        torch.cat([x.val, x.val.new_zeros(len(row))]),
        x.offsets,
        x.shape,
    )


def check_padding(model, data: TensorData, batch_size: int, device: str) -> None:
    """The loss and every gradient are the same with a padded minibatch."""
    module = model.module.to(device).train()
    gen = torch.Generator().manual_seed(0)
    cap = capacity_of(data, batch_size)
    worst = 0.0
    sampler = BatchSampler(torch.arange(data.n_obs), batch_size, shuffle=True, generator=gen)
    for idx in list(sampler)[:20]:
        batch = data[idx]
        results = []
        for x in (batch["x"], pad(batch["x"], cap)):
            module.zero_grad()
            torch.manual_seed(1)  # the same dropout masks: they depend on dense shapes only
            out = module({**batch, "x": x}, kl_weight=0.5)
            out.loss.backward()
            grads = [p.grad.detach().clone() for p in module.parameters() if p.grad is not None]
            results.append((out.loss.detach(), grads))
        (l0, g0), (l1, g1) = results
        worst = max(worst, float((l0 - l1).abs() / l0.abs()))
        for a, b in zip(g0, g1, strict=True):
            scale = float(a.abs().max()) or 1.0
            worst = max(worst, float((a - b).abs().max()) / scale)
    print(f"padding to {cap:,} entries: largest relative difference {worst:.2e}")
    assert worst < 1e-5, worst


def graphed_steps(module, data, chunks, cap, kl, lr=1e-3):
    """Train ``module`` on ``chunks`` with the step captured as a CUDA graph; return losses."""
    device = data.device
    opt = Adam([p for p in module.parameters() if p.requires_grad], lr=lr, eps=0.01)
    first = data[chunks[0]]
    static = {**first, "x": pad(first["x"], cap)}
    static_kl = torch.full((), kl, device=device)
    batches = data._device_batches(chunks)  # entry counts summed on the host, no sync

    def load():
        b = next(batches)
        n = len(b["x"].val)
        x = static["x"]
        row, col = padding(b["x"], cap)
        x.row[:n].copy_(b["x"].row)
        x.row[n:].copy_(row)
        x.col[:n].copy_(b["x"].col)
        x.col[n:].copy_(col)
        x.val[:n].copy_(b["x"].val)
        x.val[n:].zero_()
        x.offsets.copy_(b["x"].offsets)
        for k, v in b.items():
            if k != "x":
                static[k].copy_(v)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up steps (real ones) before the capture
        for _ in range(3):
            load()
            module.zero_grad(set_to_none=True)
            module(static, kl_weight=static_kl).loss.backward()
            opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    module.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        out = module(static, kl_weight=static_kl)
        out.loss.backward()
        opt.step()
        loss = out.loss.detach()
    losses = []
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in chunks[3:]:
        load()
        graph.replay()
        losses.append(loss.clone())
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / max(len(chunks) - 3, 1)
    return seconds, torch.stack(losses).cpu()


def eager_steps(module, data, chunks, kl, lr=1e-3):
    """The same steps without the graph (the training loop's own order of work)."""
    opt = Adam([p for p in module.parameters() if p.requires_grad], lr=lr, eps=0.01)
    losses = []
    for i, batch in enumerate(data._device_batches(chunks)):
        if i == 3:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        out = module(batch, kl_weight=kl)
        out.loss.backward()
        opt.step()
        module.zero_grad(set_to_none=True)
        if i >= 3:
            losses.append(out.loss.detach())
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / max(len(chunks) - 3, 1)
    return seconds, torch.stack(losses).cpu()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cells", type=int, default=20_000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--check", action="store_true", help="padding check only")
    a = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    adata = synthetic(a.cells, 2_000, 0.08)
    cellvae.SCVI.setup_anndata(adata, batch_key="batch")
    model = cellvae.SCVI(adata, dropout_rate=0.0)  # no dropout: eager and graph comparable
    model.train(1, device=device, progress_bar=False, validation_size=0.0)
    data = TensorData.from_adata(adata).to(device)
    check_padding(model, data, a.batch_size, device)
    if a.check or device != "cuda":
        return
    gen = torch.Generator().manual_seed(0)
    sampler = BatchSampler(torch.arange(data.n_obs), a.batch_size, shuffle=True, generator=gen)
    chunks = [c for c in sampler if len(c) == a.batch_size][: a.steps + 3]
    cap = capacity_of(data, a.batch_size)
    start = copy.deepcopy(model.module.state_dict())
    model.module.load_state_dict(start)
    eager_s, eager_loss = eager_steps(model.module, data, chunks, 0.5)
    model.module.load_state_dict(start)
    graph_s, graph_loss = graphed_steps(model.module, data, chunks, cap, 0.5)
    diff = float(((eager_loss - graph_loss).abs() / eager_loss.abs()).max())
    print(f"batch {a.batch_size}, capacity {cap:,} entries, {len(chunks) - 3} timed steps")
    print(f"eager  {eager_s * 1e3:7.2f} ms/step  {a.batch_size / eager_s:9,.0f} cells/s")
    print(f"graph  {graph_s * 1e3:7.2f} ms/step  {a.batch_size / graph_s:9,.0f} cells/s")
    print(f"losses: largest relative difference eager vs graph {diff:.2e}")


if __name__ == "__main__":
    main()
