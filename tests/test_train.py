"""The training loop's own optimiser and learning-rate rule against torch.optim's."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest
import torch

from cellvae.train import Adam, Plateau


def _problem(seed: int):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(40, 7, generator=g), torch.randn(40, 3, generator=g)
    w = torch.randn(7, 3, generator=g)
    bias = torch.randn(3, generator=g)
    return a, b, w, bias


def _run(opt_cls, fused_path: bool, n_steps: int = 25, **kw):
    a, b, w, bias = _problem(0)
    params = [torch.nn.Parameter(w.clone()), torch.nn.Parameter(bias.clone())]
    opt = opt_cls(params, **kw)
    for i in range(n_steps):
        loss = ((a @ params[0] + params[1] - b) ** 2).mean()
        for p in params:
            p.grad = None
        loss.backward()
        if i % 5 == 3:
            params[1].grad = None  # a parameter without a gradient this step is skipped
        opt.step()
    return [p.detach() for p in params]


@pytest.mark.parametrize("fused", [True, False])
def test_adam_matches_torch_optim(monkeypatch, fused):
    kw = {"lr": 0.05, "eps": 0.01, "weight_decay": 1e-2}
    if not fused:  # force the foreach fallback
        monkeypatch.delattr(torch, "_fused_adam_", raising=False)
    ours = _run(Adam, fused, **kw)
    monkeypatch.undo()
    ref = _run(torch.optim.Adam, fused, **kw)
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert not torch.equal(ours[0], _problem(0)[2])  # it moved


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_adam_skips_a_step_with_non_finite_gradients(monkeypatch, fused, bad):
    """A poisoned step changes nothing: the run equals one where that step never happened."""
    if not fused:
        monkeypatch.delattr(torch, "_fused_adam_", raising=False)
    a, b, w, bias = _problem(1)
    runs = []
    for poison in (True, False):
        params = [torch.nn.Parameter(w.clone()), torch.nn.Parameter(bias.clone())]
        opt = Adam(params, lr=0.05, eps=0.01, weight_decay=1e-2)
        flags = []
        for i in range(8):
            if i == 3 and not poison:
                continue
            loss = ((a @ params[0] + params[1] - b) ** 2).mean()
            for p in params:
                p.grad = None
            loss.backward()
            if i == 3:
                params[0].grad[2, 1] = bad
            flags.append(float(opt.step()))
        assert flags == ([0.0] * 3 + [1.0] + [0.0] * 4 if poison else [0.0] * 7)
        runs.append([p.detach() for p in params] + opt.exp_avg + opt.exp_avg_sq + opt.steps)
    for x, y in zip(*runs):
        assert torch.equal(x, y)
    assert float(runs[0][-1]) == 7.0


def test_plateau_matches_reduce_lr_on_plateau():
    values = [5, 4, 4, 4.5, 4, 3.9, 3.9, 3.9, 3.9, 3.9, 3.8, 3.8, 3.8, 3.8, 3.8, 3.8]
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    ref = torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, mode="min", factor=0.5, patience=2, threshold=0.0, min_lr=0.2
    )
    ours, lr, seen = Plateau(0.5, 2, 0.2), 1.0, []
    for v in values:
        ref.step(v)
        lr = ours.step(v, lr)
        seen.append(lr)
        assert lr == pytest.approx(opt.param_groups[0]["lr"])
    assert min(seen) == 0.2 and len(set(seen)) > 2  # reduced several times, floored


def test_training_does_not_import_dynamo_scanpy_or_matplotlib():
    # torch.optim's base class pulls in torch._dynamo and sympy (~100 MB); our loop must not.
    # scanpy (~145 MB with numba and scikit-learn) and matplotlib (~31 MB) are imported by the
    # plotting functions only.

    code = (
        "import sys, torch, cellvae\n"
        "a = cellvae.datasets.synthetic(200, 30, n_batches=2, random_state=0)\n"
        "cellvae.SCVI.setup_anndata(a, batch_key='batch')\n"
        "cellvae.SCVI(a).train(max_epochs=2, progress_bar=False, device='cpu')\n"
        "mods = ('sympy', 'torch._dynamo', 'scanpy', 'matplotlib')\n"
        "print(*(m in sys.modules for m in mods))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False False False False"


_FAULTS_SCRIPT = """
import resource
import torch
from cellvae.train import _keep_freed_memory_in_heap
_keep_freed_memory_in_heap()
faults = []
for _ in range(30):  # like a training step: two dozen 1 MB temporaries, all freed at the end
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)
    temporaries = [torch.ones(256 * 1024) for _ in range(24)]
    del temporaries
print(sorted(b - a for a, b in zip(faults[5:], faults[6:]))[12])
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="tunes glibc's malloc")
def test_freed_temporaries_stay_in_the_heap():
    """In a fresh process, after ``_keep_freed_memory_in_heap`` a step-like burst of 1 MB
    temporaries touches no new page: the heap is not trimmed after each burst. Without the call
    glibc's thresholds depend on what the process freed before (here: 0 or ~6,100 faults per
    burst from one run to the next), so the test fails for most runs of a no-op version."""
    cmd = [sys.executable, "-c", _FAULTS_SCRIPT]
    assert int(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout) <= 10
