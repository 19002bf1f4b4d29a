"""The training loop's own optimiser and learning-rate rule against torch.optim's."""

from __future__ import annotations

import platform
import subprocess
import sys

import numpy as np
import pytest
import torch

from cellvae import _kernels
from cellvae.train import Adam, Plateau


def _problem(seed: int):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(40, 7, generator=g), torch.randn(40, 3, generator=g)
    w = torch.randn(7, 3, generator=g)
    bias = torch.randn(3, generator=g)
    return a, b, w, bias


def _run(opt_cls, n_steps: int = 25, **kw):
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


PATHS = ["kernels", "fused", "foreach"]


def _use_path(monkeypatch, path: str) -> None:
    """Make :class:`Adam` take ``path``: the compiled kernels, torch's fused kernel, foreach."""
    if path == "kernels":
        if _kernels._lib is None:
            pytest.skip("kernels not built (test_built_where_required)")
        return
    monkeypatch.setattr(_kernels, "enabled", False)
    if path == "foreach":
        monkeypatch.delattr(torch, "_fused_adam_", raising=False)


@pytest.mark.parametrize("path", PATHS)
def test_adam_matches_torch_optim(monkeypatch, path):
    kw = {"lr": 0.05, "eps": 0.01, "weight_decay": 1e-2}
    _use_path(monkeypatch, path)
    ours = _run(Adam, **kw)
    monkeypatch.undo()
    ref = _run(torch.optim.Adam, **kw)
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert not torch.equal(ours[0], _problem(0)[2])  # it moved


def _split_between_threads(monkeypatch, threads, seed, extra_shapes=()):
    """Random tensors of odd sizes, which the kernel's ``threads`` cut at different places."""
    if _kernels._lib is None:
        pytest.skip("kernels not built (test_built_where_required)")
    monkeypatch.setattr(_kernels, "_MIN_PARALLEL", 1)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    g = torch.Generator().manual_seed(seed)
    shapes = [(37, 5), (1,), (200,), *extra_shapes, (64, 17), (5,)]
    return [torch.randn(s, generator=g) for s in shapes]


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_adam_kernel_matches_torch_on_tensors_split_between_threads(monkeypatch, threads):
    # many tensors of odd sizes, each cut at a different place by the threads' equal shares of
    # all values (_MIN_PARALLEL lowered so that the small problem runs on several threads); the
    # float32 update in torch.optim.Adam's order of operations, against torch.optim.Adam
    start = _split_between_threads(monkeypatch, threads, 3, [(3, 3, 3)])
    runs, opts = [], []
    for opt_cls in (Adam, torch.optim.Adam):
        params = [torch.nn.Parameter(w.clone()) for w in start]
        opts.append(opt_cls(params, lr=0.01, betas=(0.8, 0.99), eps=1e-3, weight_decay=0.1))
        for step in range(6):
            gg = torch.Generator().manual_seed(step)
            for p in params:
                p.grad = torch.randn(p.shape, generator=gg) * 10.0 ** (step - 3)
            opts[-1].step()
        runs.append(params)
    for p, q, w in zip(*runs, start):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        assert not torch.equal(p, w)
    assert [float(t) for t in opts[0].steps] == [6.0] * len(start)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_adam_skips_a_step_with_non_finite_gradients(monkeypatch, path, bad):
    """A poisoned step changes nothing: the run equals one where that step never happened."""
    _use_path(monkeypatch, path)
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


# ------------------------------------------------------------------ bf16 mixed precision
_TRIM_SCRIPT = """
import torch
from cellvae.train import _heap_trimmer, _keep_freed_memory_in_heap

def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024

_keep_freed_memory_in_heap()  # as in training: 1 MB blocks stay in the heap when freed
blocks = [torch.ones(256 * 1024) for _ in range(64)]
kept = blocks[1::2]  # every other block stays: the freed ones are holes, not the heap's top
del blocks
before = rss_mb()
_heap_trimmer()()
print(before - rss_mb())
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc_trim")
def test_heap_trimmer_returns_freed_holes_to_the_kernel():
    """32 freed 1 MB blocks between live ones stay resident until the trim hands them back."""
    cmd = [sys.executable, "-c", _TRIM_SCRIPT]
    assert float(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout) > 24


def test_training_trims_the_heap_after_the_first_step_and_then_periodically(monkeypatch):
    import cellvae
    from cellvae import train

    calls = []
    monkeypatch.setattr(train, "_heap_trimmer", lambda: lambda: calls.append(1))
    monkeypatch.setattr(train, "_TRIM_EVERY", 4)
    adata = cellvae.datasets.synthetic(200, 30, random_state=0)
    cellvae.SCVI.setup_anndata(adata)
    cellvae.SCVI(adata).train(max_epochs=5, batch_size=64, validation_size=0.1, progress_bar=False)
    assert len(calls) == 4  # 3 steps an epoch: after steps 1, 5, 9 and 13 of 15


def test_gene_linear_outside_bf16_products_is_nn_linear():
    from cellvae.nn import GeneLinear

    torch.manual_seed(0)
    layer, x = GeneLinear(16, 50), torch.randn(8, 16)
    plain = torch.nn.Linear(16, 50)
    plain.load_state_dict(layer.state_dict())  # same parameters and state dict
    assert torch.equal(layer(x), plain(x))


@pytest.mark.parametrize("shape", [(40, 96), (3, 5, 96)])
def test_bf16_products_match_float64_within_bfloat16_rounding(shape):
    # forward and all three gradients against float64, on random inputs: the products take
    # bfloat16 operands (8 significant bits, relative rounding 2^-9) and return bfloat16 values
    from cellvae.nn import GeneLinear, bf16_products

    g = torch.Generator().manual_seed(1)
    layer = GeneLinear(96, 300)
    x = torch.randn(*shape, generator=g, requires_grad=True)
    weights = torch.randn(*shape[:-1], 300, generator=g)  # a random upstream gradient
    with bf16_products():
        out = layer(x)
    (out * weights).sum().backward()
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, layer.weight, layer.bias))
    ref = torch.nn.functional.linear(x64, w64, b64)
    (ref * weights.double()).sum().backward()
    assert out.dtype == torch.float32 and out.shape == ref.shape
    for got, exp in [(out, ref), (x.grad, x64.grad), (layer.weight.grad, w64.grad)]:
        err = (got.double() - exp).abs().max() / exp.abs().max()
        assert 0 < err < 1e-2  # rounded (not float32), but only by bfloat16's rounding
    torch.testing.assert_close(layer.bias.grad, b64.grad.float())  # the bias stays float32


def test_gene_layers_reading_one_input_share_one_bf16_product():
    # gene_linears: the layers' outputs and every gradient against float64 (x's gradient sums
    # both layers'), a layer without bias, None entries kept in place; outside bf16_products
    # each layer runs on its own
    from cellvae.nn import GeneLinear, bf16_products, gene_linears

    g = torch.Generator().manual_seed(2)
    a, b = GeneLinear(64, 200), GeneLinear(64, 70, bias=False)
    x = torch.randn(30, 64, generator=g, requires_grad=True)
    up_a, up_b = torch.randn(30, 200, generator=g), torch.randn(30, 70, generator=g)
    with bf16_products():
        ya, none, yb = gene_linears(x, a, None, b)
    assert none is None and ya.shape == (30, 200) and yb.shape == (30, 70)
    ((ya * up_a).sum() + (yb * up_b).sum()).backward()
    params = (x, a.weight, a.bias, b.weight)
    x64, wa, ba, wb = (t.detach().double().requires_grad_() for t in params)
    ra, rb = torch.nn.functional.linear(x64, wa, ba), x64 @ wb.t()
    ((ra * up_a.double()).sum() + (rb * up_b.double()).sum()).backward()
    pairs = [(ya, ra), (yb, rb), (x.grad, x64.grad), (a.weight.grad, wa.grad)]
    for got, exp in [*pairs, (b.weight.grad, wb.grad)]:
        assert got.shape == exp.shape and got.dtype == torch.float32
        err = (got.double() - exp).abs().max() / exp.abs().max()
        assert 0 < err < 1e-2  # rounded (not float32), but only by bfloat16's rounding
    torch.testing.assert_close(a.bias.grad, ba.grad.float())
    with torch.no_grad():
        outs = gene_linears(x, a, None, b)
    assert torch.equal(outs[0], a(x)) and outs[1] is None and torch.equal(outs[2], b(x))


def test_wide_hidden_layers_take_bf16_products_narrow_ones_stay_float32():
    # FCLayers' hidden -> hidden layers at least _BF16_MIN_WIDTH wide both ways (totalVI's
    # 256 -> 256 encoder layer) take bfloat16 products inside bf16_products: output and gradients
    # against float64 (with the covariate's vector added); first and narrower layers stay float32
    from cellvae.nn import _BF16_MIN_WIDTH, FCLayers, bf16_products

    w = _BF16_MIN_WIDTH
    stack = FCLayers(w, w, n_cat_list=[3], n_layers=3, n_hidden=2 * w)  # w -> 2w -> 2w -> w
    narrow = FCLayers(w, w - 1, n_cat_list=[3], n_layers=2, n_hidden=w)
    assert [la.bf16 for la in stack.linears] == [False, True, True]
    assert [la.bf16 for la in narrow.linears] == [False, False]

    g = torch.Generator().manual_seed(3)
    wide, codes = stack.linears[1], torch.randint(3, (40,), generator=g)
    x = torch.randn(40, 2 * w, generator=g, requires_grad=True)
    up = torch.randn(40, 2 * w, generator=g)  # a random upstream gradient
    with bf16_products():
        out = wide(x, [codes])
    (out * up).sum().backward()
    params = (x, wide.weight, wide.bias, wide.embeddings[0].weight)
    x64, w64, b64, e64 = (t.detach().double().requires_grad_() for t in params)
    ref = x64 @ w64 + b64 + e64[codes]
    (ref * up.double()).sum().backward()
    for got, exp in [(out, ref), (x.grad, x64.grad), (wide.weight.grad, w64.grad)]:
        assert got.shape == exp.shape and got.dtype == torch.float32
        err = (got.double() - exp).abs().max() / exp.abs().max()
        assert 1e-5 < err < 1e-2  # bfloat16's rounding (float32's would be ~1e-7)
    torch.testing.assert_close(wide.bias.grad, b64.grad.float())
    torch.testing.assert_close(params[3].grad, e64.grad.float())

    first, x0 = stack.linears[0], torch.randn(40, w, generator=g)
    with bf16_products():
        got = first(x0, [codes])
    assert torch.equal(got, first(x0, [codes]))


@pytest.mark.skipif(_kernels._lib is None, reason="kernels not built")
def test_bf16_products_take_the_same_roundings_with_and_without_kernels(monkeypatch):
    # the compiled widening (outputs plus biases) and narrowing (incoming gradients, with the
    # biases' gradients summed) against torch's casts: outputs and the gradients of x and the
    # weights bit for bit, biases' gradients close (float32 sums in another order); for gene
    # layers sharing a product (one without bias) and FCLayers' wide layer, whose (n_in, n_out)
    # weight is cast as stored and gets a contiguous gradient
    from cellvae.nn import FCLayers, GeneLinear, bf16_products, gene_linears

    g = torch.Generator().manual_seed(4)
    a, b = GeneLinear(64, 200), GeneLinear(64, 70, bias=False)
    wide = FCLayers(128, 128, n_layers=3, n_hidden=256).linears[1]
    x0, h0 = torch.randn(30, 64, generator=g), torch.randn(30, 256, generator=g)
    ups = [torch.randn(30, n, generator=g) for n in (200, 70, 256)]
    params = [a.weight, a.bias, b.weight, wide.weight, wide.bias]
    results = []
    for enabled in (True, False):
        monkeypatch.setattr(_kernels, "enabled", enabled)
        x, h = x0.clone().requires_grad_(), h0.clone().requires_grad_()
        for p in params:
            p.grad = None
        with bf16_products():
            outs = [*gene_linears(x, a, b), wide(h, [])]
        sum((o * u).sum() for o, u in zip(outs, ups)).backward()
        results.append([*outs, x.grad, h.grad, *(p.grad for p in params)])
    assert wide.weight.shape == (256, 256) and wide.weight.grad.is_contiguous()
    got, ref = results
    for i, (u, v) in enumerate(zip(got, ref, strict=True)):
        if i in (6, 9):  # the biases' gradients
            torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(u, v), i
    # the (n_in, n_out) weight's layer: the gradients of h and of the weight are bfloat16
    # values, the roundings of the exact products of bfloat16 operands (float32 accumulation
    # may round an entry the other way)
    hb, ub, wb = (t.detach().bfloat16().double() for t in (h0, ups[2], wide.weight))
    for grad, exact in [(got[4], ub @ wb.t()), (got[8], hb.t() @ ub)]:
        assert torch.equal(grad, grad.bfloat16().float())
        assert (grad.bfloat16() != exact.bfloat16()).float().mean() < 0.01


def test_precision_option_and_auto_rule(monkeypatch):
    from cellvae import train
    from cellvae.train import TrainConfig, resolve_precision

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for native, expected in [(True, "bf16-mixed"), (False, "32-true")]:
        monkeypatch.setattr(train, "_native_bf16", lambda native=native: native)
        assert resolve_precision("auto", cpu) == expected
        assert resolve_precision("auto", cuda) == "32-true"  # not measured on GPUs yet
    assert resolve_precision("32", cpu) == "32-true"
    assert resolve_precision("bf16-mixed", cuda) == "bf16-mixed"
    with pytest.raises(ValueError, match="precision must be one of"):
        TrainConfig(precision="16-mixed").validate()


@pytest.mark.parametrize("precision", ["bf16-mixed", "32-true"])
def test_training_runs_the_gene_products_in_the_precision_asked(precision, monkeypatch):
    import cellvae
    from cellvae import nn as cnn

    calls = []
    original = cnn._BF16Linear.forward
    monkeypatch.setattr(
        cnn._BF16Linear, "forward", staticmethod(lambda *a: calls.append(1) or original(*a))
    )
    adata = cellvae.datasets.synthetic(300, 40)
    cellvae.SCVI.setup_anndata(adata, batch_key="batch")
    model = cellvae.SCVI(adata).train(max_epochs=2, precision=precision, progress_bar=False)
    # both gene heads (scale, dropout) in one product per training step and per validation
    # batch (Lightning's bf16-mixed validates under autocast too); none in the getters
    n_steps = 2 * -(-len(model.train_indices_) // 128)
    n_val = 2 * -(-len(model.validation_indices_) // 128)
    assert len(calls) == (n_steps + n_val if precision == "bf16-mixed" else 0)
    calls.clear()
    model.get_latent_representation(), model.get_normalized_expression()
    assert not calls


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_adam_kernel_writes_bf16_copies_of_the_updated_parameters(monkeypatch, threads):
    # after every update each copy holds its parameter's new values as Tensor.to(bfloat16)
    # rounds them, for tensors cut at different places by the threads' shares; parameters
    # without a copy, moments and step counts are those of a run without copies; a skipped
    # step writes no copy
    start = _split_between_threads(monkeypatch, threads, 5)
    runs = []
    for with_copies in (True, False):
        params = [torch.nn.Parameter(w.clone()) for w in start]
        opt = Adam(params, lr=0.01, weight_decay=0.1)
        copies = [torch.zeros_like(w, dtype=torch.bfloat16) for w in start]
        copies[1] = copies[4] = None
        state = _kernels.AdamState.build(
            params, opt.exp_avg, opt.exp_avg_sq, opt.steps, copies if with_copies else None
        )
        for step in range(5):
            gg = torch.Generator().manual_seed(step)
            grads = [torch.randn(p.shape, generator=gg) for p in params]
            if step == 2:
                grads[3][7, 3] = float("nan")
                before = [None if c is None else c.clone() for c in copies]
            assert state.step(grads, lr=0.01, betas=(0.9, 0.999), eps=1e-8, wd=0.1) == (step == 2)
            for p, c in zip(params, copies):
                if with_copies and c is not None:
                    assert torch.equal(c, p.detach().to(torch.bfloat16))
            if step == 2 and with_copies:
                assert all(c is None or torch.equal(c, b) for c, b in zip(copies, before))
        assert not with_copies or not torch.equal(copies[0], start[0].to(torch.bfloat16))
        runs.append([p.detach() for p in params] + opt.exp_avg + opt.exp_avg_sq + opt.steps)
    for x, y in zip(*runs):
        assert torch.equal(x, y)


def test_bf16_weight_copies_are_cast_again_after_any_other_change():
    # a block is the weights' bfloat16 cast, returned without casting again while their storage
    # and versions are those of its last cast: a change of the values that advances the version
    # (an in-place torch operation) makes it cast again; FCLayers' (n_in, n_out) weight keeps
    # its stored layout; weights not contiguous, or kept already with other weights, are not kept
    from cellvae.nn import BF16WeightCopies, GeneLinear

    torch.manual_seed(6)
    a, b = GeneLinear(16, 30), GeneLinear(16, 7)
    copies = BF16WeightCopies()
    block = copies.block([a.weight, b.weight], False)
    cast = torch.cat([a.weight, b.weight]).to(torch.bfloat16)
    assert torch.equal(block, cast) and copies.generation == 1
    assert copies.of(a.weight).data_ptr() == block.data_ptr()
    assert torch.equal(copies.of(b.weight), b.weight.to(torch.bfloat16))
    block.zero_()  # not cast again while the weights' versions are unchanged
    assert torch.equal(copies.block([a.weight, b.weight], False), torch.zeros_like(cast))
    with torch.no_grad():
        b.weight.mul_(2.0)
    again = copies.block([a.weight, b.weight], False)
    assert again.data_ptr() == block.data_ptr() and copies.generation == 1
    assert torch.equal(again, torch.cat([a.weight, b.weight]).to(torch.bfloat16))
    assert copies.block([b.weight], False) is None  # kept already with a's weight

    stored = torch.randn(16, 40)  # FCLayers stores (n_in, n_out) and passes its transpose
    got = copies.block([stored.t()], True)
    assert got.shape == (40, 16) and torch.equal(got, stored.t().to(torch.bfloat16))
    assert copies.of(stored).is_contiguous() and copies.generation == 2
    assert copies.block([torch.randn(16, 40).t()], False) is None  # not contiguous


@pytest.mark.parametrize("path", ["kernels", "fused"])
def test_training_with_bf16_weight_copies_is_bit_identical_to_casting(monkeypatch, path):
    # the copies written by the compiled update are what the forward pass would cast, and
    # torch's fused update (which leaves the weights' versions as they were) has them cast
    # again: bf16 training with them gives the history and latent space of training without
    # them, bit for bit; and the forward passes did take them
    import cellvae
    from cellvae import nn as cnn
    from cellvae import train

    _use_path(monkeypatch, path)

    adata = cellvae.datasets.synthetic(300, 60, random_state=0)
    cellvae.SCVI.setup_anndata(adata)
    used = []
    block = cnn.BF16WeightCopies.block
    monkeypatch.setattr(
        cnn.BF16WeightCopies, "block", lambda *a: used.append(1) or block(*a), raising=True
    )
    results = []
    for keep in (True, False):
        if not keep:
            monkeypatch.setattr(train, "BF16WeightCopies", lambda: None)
        model = cellvae.SCVI(adata, n_hidden=32, n_latent=4)
        model.train(3, batch_size=64, precision="bf16-mixed", seed=0, progress_bar=False)
        results.append((model.history_, model.get_latent_representation()))
        assert bool(used) == keep
        used.clear()
    (h1, z1), (h2, z2) = results
    assert h1["train_loss"] == h2["train_loss"] and h1["validation_elbo"] == h2["validation_elbo"]
    assert np.array_equal(z1, z2)


def test_bf16_mixed_training_reaches_the_float32_elbo():
    # same data, seed and epochs: the held-out ELBO of bf16-mixed training is that of float32
    # within 1% (benchmarks/README.md, session 17: within 0.05% at 10k cells, 100 epochs)
    import cellvae

    adata = cellvae.datasets.kang_ifnb()[:600]
    adata = adata[:, np.asarray(adata.X.sum(0)).ravel() > 0].copy()
    cellvae.SCVI.setup_anndata(adata, batch_key="stim")
    elbos = []
    for precision in ("32-true", "bf16-mixed"):
        model = cellvae.SCVI(adata, n_latent=5)
        model.train(max_epochs=15, precision=precision, seed=0, progress_bar=False)
        elbos.append(model.get_elbo(indices=model.validation_indices_))
    assert elbos[0] != elbos[1]  # the two trainings differ ...
    assert abs(elbos[1] - elbos[0]) < 0.01 * abs(elbos[0])  # ... by less than 1%


def test_mode_switch_sets_every_submodule_and_calls_overridden_train():
    # the training loop's train / eval switch sets the flag of every submodule in one loop, the
    # same as nn.Module.train; a tree with a submodule that overrides train() goes through it
    from cellvae.nn import FCLayers
    from cellvae.train import _Mode

    fc = FCLayers(6, 4, n_cat_list=[2], n_layers=2, n_hidden=5, dropout_rate=0.1)
    switch = _Mode(fc)
    assert switch.plain
    for mode in (False, True, False):
        switch(mode)
        assert [m.training for m in fc.modules()] == [mode] * len(list(fc.modules()))

    class Custom(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.calls = []

        def train(self, mode=True):
            self.calls.append(mode)
            return super().train(mode)

    custom = Custom()
    tree = torch.nn.Sequential(fc, custom)
    switch = _Mode(tree)
    assert not switch.plain
    switch(True)
    switch(False)
    assert custom.calls == [True, False]
    assert not any(m.training for m in tree.modules())


def test_train_options_out_of_range_are_rejected_before_training():
    from cellvae.train import TrainConfig

    TrainConfig(lr_factor=0.1, lr_patience=0, gradient_clip_val=0.0, eps=0.0).validate()
    bad = [
        (dict(lr_factor=-0.5), ValueError, r"lr_factor must be in \(0, 1\)"),
        (dict(lr_factor=1.0), ValueError, r"lr_factor must be in \(0, 1\)"),
        (dict(lr_patience=-3), ValueError, "lr_patience must be at least 0"),
        (dict(lr_patience=1.5), TypeError, "lr_patience must be an integer"),
        (dict(lr_min=-1.0), ValueError, "lr_min must be at least 0"),
        (dict(weight_decay=-1e-6), ValueError, "weight_decay must be at least 0"),
        (dict(eps=-0.01), ValueError, "eps must be at least 0"),
        (dict(early_stopping_min_delta=-1.0), ValueError, "early_stopping_min_delta must be"),
        (dict(gradient_clip_val=-1.0), ValueError, "gradient_clip_val must be at least 0"),
        (dict(n_epochs_kl_warmup=-2), ValueError, "n_epochs_kl_warmup must be at least 0"),
        (dict(lr=float("nan")), ValueError, "lr must be finite"),
        (dict(lr=float("inf")), ValueError, "lr must be finite"),
    ]
    for kwargs, error, message in bad:
        with pytest.raises(error, match=message):
            TrainConfig(**kwargs).validate()


@pytest.mark.parametrize("min_lr", [0.0, 0.3, 2.0])  # 2.0: above the rate itself
def test_plateau_never_raises_the_rate_as_torch(min_lr):
    rng = np.random.default_rng(int(min_lr * 10))
    values = np.cumsum(rng.normal(0, 1, 60)).tolist()  # a random walk: plateaus and gains
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    ref = torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, mode="min", factor=0.6, patience=1, threshold=0.0, min_lr=min_lr
    )
    ours, lr = Plateau(0.6, 1, min_lr), 1.0
    for v in values:
        ref.step(v)
        new = ours.step(v, lr)
        assert new <= lr  # a min_lr above the rate raised it 500-fold at the first plateau
        lr = new
        assert lr == pytest.approx(opt.param_groups[0]["lr"])
