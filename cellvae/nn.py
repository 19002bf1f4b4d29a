"""Neural network building blocks: fully connected stacks, encoders and decoders.

Categorical covariates (batch, extra categories) are injected as an embedding added after each
Linear layer. That is the same function as concatenating a one-hot vector to the layer input
(``W [h; onehot(c)] = W_h h + W_c[:, c]``) without building the one-hot tensor every step.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterable, Iterator, Sequence
from types import SimpleNamespace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from . import _kernels
from ._sparse import CSRBatch, HStack, sparse_linear

__all__ = [
    "DecoderSCVI",
    "Dropout",
    "DecoderTOTALVI",
    "Encoder",
    "EncoderTOTALVI",
    "FCLayers",
    "BF16WeightCopies",
    "GeneLinear",
    "bf16_products",
    "gene_linears",
    "normal_heads",
    "parallel_stacks",
    "reparameterize",
]


def reparameterize(
    mean: torch.Tensor, var: torch.Tensor, n_samples: int | None = None
) -> torch.Tensor:
    """Draw ``mean + sqrt(var) · ε`` with ε ~ N(0, I) (the reparameterisation trick).

    With ``n_samples``, that many draws along a new leading axis.

    Examples
    --------
    >>> import torch
    >>> reparameterize(torch.zeros(2, 3), torch.ones(2, 3)).shape
    torch.Size([2, 3])
    >>> reparameterize(torch.zeros(2, 3), torch.ones(2, 3), n_samples=4).shape
    torch.Size([4, 2, 3])
    """
    if n_samples is None:
        return mean + var.sqrt() * torch.randn_like(mean)
    noise = torch.randn((n_samples, *mean.shape), dtype=mean.dtype, device=mean.device)
    return mean + var.sqrt() * noise


_BF16 = contextvars.ContextVar("cellvae_bf16_products", default=False)


@contextlib.contextmanager
def bf16_products(enabled: bool = True) -> Iterator[None]:
    """Run the products of every :class:`GeneLinear` called inside in bfloat16.

    The training loop's forward passes run inside it when ``precision`` is ``"bf16-mixed"``
    (see :func:`cellvae.train.train_module`); weights, optimiser state and every other operator
    stay float32, as in PyTorch's bf16 mixed precision.
    """
    token = _BF16.set(bool(enabled))
    try:
        yield
    finally:
        _BF16.reset(token)


_COPIES = contextvars.ContextVar("cellvae_bf16_weight_copies", default=None)


class BF16WeightCopies:
    """bfloat16 copies of the weights of :func:`bf16_products`, kept from one step to the next.

    Each bfloat16 product casts its weights: ~1 MB for SCVI's two 128 × 2,000 gene layers, which
    the likelihood has pushed out of the cache since the last update (a ~95 µs share of an
    SCVI step, ~155 µs of a totalVI one, measured by skipping the cast). The training loop
    keeps one of these active (:meth:`active`) and gives it to its :class:`cellvae.train.Adam`,
    whose compiled update writes the copies with the new weights while they are in cache
    (:class:`cellvae._kernels.AdamState`). A forward pass uses a copy while its weights have the
    storage and version they had when it was cast: an in-place change by a torch operator
    (``load_state_dict``, ``torch.nn.init``) advances the version and the weights are cast again.
    Whoever changes the weights otherwise must write the copies or call :meth:`invalidate`:
    ``torch._fused_adam_`` leaves the versions as they were (Adam's torch paths invalidate),
    and so do changes through ``.data``; the copies live only while the training loop runs,
    where nothing else changes the weights.
    """

    def __init__(self):
        # the data pointers of a call's weights -> [block, its part per weight, their versions]
        self._blocks: dict[tuple[int, ...], list] = {}
        self._copies: dict[int, torch.Tensor] = {}  # a weight's data pointer -> its copy
        self.generation = 0  # advanced at each new block: the optimiser then looks again

    @contextlib.contextmanager
    def active(self) -> Iterator[BF16WeightCopies]:
        """Use these copies in the bfloat16 products called inside."""
        token = _COPIES.set(self)
        try:
            yield self
        finally:
            _COPIES.reset(token)

    def invalidate(self) -> None:
        """Cast every block again when next used (its weights changed, versions or not)."""
        for entry in self._blocks.values():
            entry[2] = None

    def of(self, param: torch.Tensor) -> torch.Tensor | None:
        """The copy of ``param`` (bfloat16, the layout of its storage), or None."""
        return self._copies.get(param.data_ptr())

    def block(self, weights: Sequence[torch.Tensor], input_major: bool) -> torch.Tensor | None:
        """The ``(sum of n_out, n_in)`` bfloat16 block of ``weights``, cast where out of date.

        ``input_major``: one weight, given as the transpose of its contiguous storage (see
        :class:`_BF16Linear`). None where the weights cannot be kept: not contiguous as stored,
        or one of them kept already in a block with other weights.
        """
        key = tuple(w.data_ptr() for w in weights)
        stored = _as_stored(weights, input_major)
        entry = self._blocks.get(key)
        if entry is None:
            if any(k in self._copies for k in key) or not all(w.is_contiguous() for w in stored):
                return None
            entry = self._blocks[key] = [*_empty_block(stored), None]
            self._copies.update(zip(key, entry[1], strict=True))
            self.generation += 1
        block, parts, versions = *entry[:2], tuple(w._version for w in weights)
        if entry[2] != versions:
            _cast_into(parts, stored)
            entry[2] = versions
        return block.t() if input_major else block


def _as_stored(weights: Sequence[torch.Tensor], input_major: bool) -> list[torch.Tensor]:
    """The weights in the layout of their storage (``input_major``: one transposed weight)."""
    return [w.t() if input_major else w for w in weights]


def _empty_block(stored: Sequence[torch.Tensor]) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """An empty bfloat16 block of the ``stored`` weights stacked by rows, and its part of each."""
    rows = [w.shape[0] for w in stored]
    block = stored[0].new_empty((sum(rows), *stored[0].shape[1:]), dtype=torch.bfloat16)
    return block, block.split(rows)


def _cast_into(parts: Sequence[torch.Tensor], stored: Sequence[torch.Tensor]) -> None:
    """Each part of a block (:func:`_empty_block`) becomes its weight's bfloat16 cast."""
    with torch.no_grad():
        for part, w in zip(parts, stored, strict=True):
            part.copy_(w)


class _BF16Linear(torch.autograd.Function):
    """``x @ W_i.T + b_i`` for one or more layers reading the same ``x``, in bfloat16 products.

    Called as ``apply(x, W_1, b_1, W_2, b_2, ...)``; returns one float32 output per layer. The
    layers' weights are cast into one bfloat16 block, so each of the three products (forward, and
    both gradients) is one ``mm`` for all of them: SCVI's scale and zero-inflation layers read
    the same hidden units, and their backward took 629 µs per step as two products, 567 µs as one
    of twice the width (``benchmarks/README.md``, session 22). The products accumulate in float32
    and return bfloat16 values, which are widened to float32 (torch has no float32 output for
    bfloat16 products on the CPU); biases and their gradients stay float32. The weight gradients
    come back as row blocks of one tensor.

    One weight given as the transpose of a contiguous tensor (:class:`FCLayers` stores
    ``(n_in, n_out)``) is cast as it is stored and its gradient computed in that layout: a
    transposing copy and a transposed gradient, which autograd copies again, cost ~75 µs a step
    at 256 × 256. With the compiled kernels, the outputs are widened with their biases added in
    one pass (:func:`~cellvae._kernels.bf16_split_widen`), and the incoming gradients are
    narrowed into the bfloat16 block with the biases' gradients summed in the same pass
    (:func:`~cellvae._kernels.bf16_join_narrow`).
    """

    @staticmethod
    def forward(ctx, x, *params):
        weights, biases = params[0::2], params[1::2]
        sizes = [w.shape[0] for w in weights]
        xb = x.to(torch.bfloat16)
        ctx.input_major = len(weights) == 1 and _input_major(weights[0])
        copies = _COPIES.get()  # kept from the last step by the training loop, when it runs
        wb = None if copies is None else copies.block(weights, ctx.input_major)
        if wb is None:  # cast here: an input-major weight as stored, then viewed (n_out, n_in)
            stored = _as_stored(weights, ctx.input_major)
            wb, parts = _empty_block(stored)
            _cast_into(parts, stored)
            wb = wb.t() if ctx.input_major else wb
        ctx.save_for_backward(xb, wb)
        ctx.sizes = sizes
        out = torch.mm(xb, wb.t())
        if _kernels.takes(x, *biases) and all(b is None or b.is_contiguous() for b in biases):
            return tuple(_kernels.bf16_split_widen(out, sizes, biases))
        outs = []
        for part, b in zip(out.split(sizes, dim=1), biases, strict=True):
            part = part.to(torch.float32, memory_format=torch.contiguous_format)
            outs.append(part if b is None else part.add_(b))
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        xb, wb = ctx.saved_tensors
        needs = ctx.needs_input_grad
        bias_needs = needs[2::2]
        if _kernels.takes(*grads) and all(g.is_contiguous() for g in grads):
            g, bias_grads = _kernels.bf16_join_narrow(grads, bias_needs)
        else:
            g = xb.new_empty((xb.shape[0], wb.shape[0]))
            for block, grad in zip(g.split(ctx.sizes, dim=1), grads, strict=True):
                block.copy_(grad)
            bias_grads = [grad.sum(0) if need else None for grad, need in zip(grads, bias_needs)]
        grad_x = torch.mm(g, wb).float() if needs[0] else None
        grad_w = [None] * len(grads)
        if ctx.input_major and needs[1]:
            grad_w = [torch.mm(xb.t(), g).float().t()]  # contiguous as the weight is stored
        elif any(needs[1::2]):
            grad_w = torch.mm(g.t(), xb).float().split(ctx.sizes)
        params = []
        for i, (gw, gb) in enumerate(zip(grad_w, bias_grads, strict=True)):
            params += [gw if needs[1 + 2 * i] else None, gb]
        return grad_x, *params


def _input_major(w: torch.Tensor) -> bool:
    """Whether ``w`` is the transpose of a contiguous 2-D tensor (and not contiguous itself)."""
    return w.dim() == 2 and not w.is_contiguous() and w.t().is_contiguous()


def gene_linears(x: torch.Tensor, *layers: nn.Linear | None) -> list[torch.Tensor | None]:
    """``layer(x)`` for each layer (None for None): one bfloat16 product for all of them.

    Inside :func:`bf16_products`, when every layer given is a :class:`GeneLinear`, their
    weights are cast into one block and multiplied at once (:class:`_BF16Linear`); otherwise
    each layer runs on its own.

    Examples
    --------
    >>> import torch
    >>> a, b = GeneLinear(4, 3), GeneLinear(4, 5)
    >>> x = torch.randn(2, 4)
    >>> with bf16_products():
    ...     ya, none, yb = gene_linears(x, a, None, b)
    >>> ya.shape, none, yb.shape
    (torch.Size([2, 3]), None, torch.Size([2, 5]))
    """
    used = [layer for layer in layers if layer is not None]
    if not _BF16.get() or not used or not all(isinstance(la, GeneLinear) for la in used):
        return [None if layer is None else layer(x) for layer in layers]
    flat = x.reshape(-1, x.shape[-1])
    params = [p for layer in used for p in (layer.weight, layer.bias)]
    outs = iter(_BF16Linear.apply(flat, *params))
    return [None if layer is None else next(outs).reshape(*x.shape[:-1], -1) for layer in layers]


class GeneLinear(nn.Linear):
    """A decoder's hidden-to-genes layer: products in bfloat16 inside :func:`bf16_products`.

    These layers (hidden × genes weights) hold most of a training step's arithmetic: at 128
    cells, 128 hidden units and 2,000 genes, their six products took 2.1 ms of a 5.4 ms step in
    float32 and 0.6 ms in bfloat16 on a CPU with AVX512-BF16 (``benchmarks/README.md``,
    session 17). Outside the context it is a plain :class:`~torch.nn.Linear`, with the same
    parameters and state dict. Layers that read the same input run as one product with
    :func:`gene_linears`.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ weight.T + bias``, with bfloat16 products inside :func:`bf16_products`."""
        if not _BF16.get():
            return F.linear(x, self.weight, self.bias)
        (out,) = gene_linears(x, self)
        return out


class Dropout(nn.Module):
    """Inverted dropout whose CPU mask costs 16 random bits per entry.

    Each entry is zeroed with probability ``p`` and the others are scaled by ``1 / (1 − p)``, as
    :class:`torch.nn.Dropout`. On CPU, torch's Bernoulli sampler draws a full random number per
    entry (about 10 ns each here, 12% of a TOTALVI training step); this module draws 64-bit
    integers and compares each of their four 16-bit lanes with a threshold instead (about 2 ns an
    entry with ``randint``, 0.2 ns with the compiled kernels: :meth:`lanes`), so ``p`` is rounded
    to a multiple of 2^-16 (at most 8·10^-6 away, and at most 1 − 2^-16) and the scaling uses
    that rounded rate. Other devices use :func:`torch.nn.functional.dropout`. The bits come from
    torch's default generator, so ``torch.manual_seed`` fixes the masks.

    Examples
    --------
    >>> import torch
    >>> drop = Dropout(0.25).train()
    >>> y = drop(torch.ones(1000, 100))
    >>> sorted(set(y.unique().tolist()))
    [0.0, 1.3333333730697632]
    """

    def __init__(self, p: float = 0.5):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"Dropout probability must be in [0, 1), got {p}.")
        self.p = p
        # the rate actually used: steps / 2^16, below 1 (which would drop every entry)
        steps = min(round(p * 65536), 65535)
        self._threshold = steps - 32768  # keep a uniform int16 at or above it
        self._scale = 65536 / (65536 - steps)

    def extra_repr(self) -> str:
        """``p=...`` in the module's repr."""
        return f"p={self.p}"

    def draw_seed(self) -> int:
        """The 64-bit seed that :meth:`lanes` draws from torch's default generator (compiled)."""
        return int(torch.randint(-(2**63), 2**63 - 1, ()))

    def lanes(self, shape: torch.Size) -> torch.Tensor:
        """Random int16 values of ``shape``: keep the entries where one is ``>= _threshold``.

        With the compiled kernels, SplitMix64 from one 64-bit draw of torch's default generator
        (:func:`cellvae._kernels.random_lanes`: 3 µs for 128 × 128 values, where torch's
        ``randint`` takes 22 µs and 52 µs for 256 × 256); otherwise four values per 64-bit
        ``randint`` draw. Either way ``torch.manual_seed`` fixes them. The fused hidden layer
        (:class:`_BatchNormReLUDropout`) draws its masks here too, so both draw the same ones.
        """
        if _kernels.available():
            return _kernels.random_lanes(tuple(shape), self.draw_seed())
        n = math.prod(shape)
        words = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64)
        return words.view(torch.int16)[:n].view(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` with entries dropped and the rest scaled (``x`` itself in eval mode)."""
        if not self.training or self.p == 0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, training=True)
        lanes = self.lanes(x.shape)
        # a float mask of 0 and 1 / (1 - p) (x * bool would convert the mask to float in the
        # forward and again in the backward pass), made with float arithmetic: the integer lanes
        # clamped to [t − 1, t] minus t − 1 are 1 where lane >= t and 0 elsewhere. Bit-identical
        # to torch.where(lane >= t, scale, 0) and half its time (256 x 256: 70 -> 33 µs). Lanes
        # reach ±2^15, exact in float32 / float64 but not in float16 / bfloat16, so those work in
        # float32.
        t = self._threshold
        exact = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
        mask = lanes.to(exact).clamp_(t - 1, t).sub_(t - 1).mul_(self._scale)
        return x * mask.to(x.dtype)


class _BatchNormReLUDropout(torch.autograd.Function):
    """Batch norm in training mode, ReLU and dropout of a hidden layer in one compiled pass.

    In torch the block is about twelve operators and four autograd nodes: 115 µs forward and
    backward at 128 × 128 on 2 threads, most of it dispatch; 84 µs with the compiled kernels
    (:func:`cellvae._kernels.bn_relu_drop_forward` and ``_backward``, ~9 µs each). The dropout
    masks are those of :meth:`Dropout.lanes`, made inside the kernel from the same seed
    (:meth:`Dropout.draw_seed`), so the random stream is the one :class:`Dropout` draws. The
    backward pass recomputes the normalised values from the saved input; an entry passed the
    ReLU and the dropout where its output is positive.

    The layer's covariate vectors (``tables``, one ``(n_cat, H)`` embedding weight per code tensor
    of ``codes``) are added to ``y`` inside the kernels, and their gradients summed there, where
    torch's embedding, add and embedding backward cost ~50 µs a layer: a 20 → 256 layer at 256
    cells with one covariate, forward and backward, 254 → 230 µs (206 µs without the covariate;
    benchmarks/README.md, session 24).
    """

    @staticmethod
    def forward(ctx, y, weight, bias, bn, seed, threshold, scale, codes, *tables):
        y = y.contiguous()
        covariates = list(zip(tables, codes, strict=True))
        out, mean, invstd = _kernels.bn_relu_drop_forward(
            y, weight, bias, bn.running_mean, bn.running_var, bn.momentum, bn.eps,
            None, threshold, scale, covariates, seed=seed,
        )  # fmt: skip
        ctx.save_for_backward(y, out, weight, mean, invstd, *tables, *codes)
        ctx.scale, ctx.n_cov = scale, len(tables)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        y, out, weight, mean, invstd, *rest = ctx.saved_tensors
        tables, codes = rest[: ctx.n_cov], rest[ctx.n_cov :]
        dy, dweight, dbias, *dtables = _kernels.bn_relu_drop_backward(
            y, out, weight, mean, invstd, ctx.scale, grad_out, list(zip(tables, codes))
        )
        return dy, dweight, dbias, None, None, None, None, None, *dtables


def bn_fusable(bn: nn.Module) -> bool:
    """Whether the compiled batch norm → ReLU → dropout kernels can stand for ``bn`` in training.

    Affine, with running statistics and a momentum (what the kernels read and update).
    """
    return bn.affine and bn.running_mean is not None and bn.momentum is not None


def dropout_masks(drop: Dropout | None) -> tuple[int | None, int, float]:
    """``(seed, threshold, scale)`` of the kernels' dropout: the masks :meth:`Dropout.lanes` draws.

    Draws the seed from torch's default generator; ``(None, 0, 1.0)`` (no dropout) where
    ``drop`` is None, in eval mode or of rate 0.
    """
    if drop is None or not drop.training or drop.p == 0:
        return None, 0, 1.0
    return drop.draw_seed(), drop._threshold, drop._scale


def _fuses(bn: nn.Module, x: torch.Tensor, covariates) -> bool:
    """Whether :class:`_BatchNormReLUDropout` applies to ``bn`` on a minibatch like ``x``."""
    return (
        bn.training
        and isinstance(x, torch.Tensor)
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and x.dim() == 2
        and x.shape[0] > 1
        and bn_fusable(bn)
        and _kernels.available()
        and all(
            t.dtype == torch.float32 and t.is_contiguous() and c.shape == x.shape[:1]
            for t, c in covariates
        )
    )


def _bn_relu_drop(y, gamma, beta, bn, drop, covariates):
    """Apply :class:`_BatchNormReLUDropout` with ``drop``'s masks (or none)."""
    seed, threshold, scale = dropout_masks(drop)
    codes = tuple(c.long().contiguous() for _, c in covariates)
    tables = [t for t, _ in covariates]
    return _BatchNormReLUDropout.apply(y, gamma, beta, bn, seed, threshold, scale, codes, *tables)


def _fused_post(
    post: nn.Sequential,
    y: torch.Tensor,
    covariates: Sequence[tuple[torch.Tensor, torch.Tensor]] = (),
) -> torch.Tensor | None:
    """``post(y + Σ table[codes])`` for a BatchNorm1d → ReLU (→ Dropout) block, compiled.

    ``covariates`` are ``(embedding weight, codes)`` pairs. None where the kernels do not apply:
    batch norm not in training mode (or without running statistics), an input that is not a
    float32 CPU matrix of more than one row, codes that are not one per row (torch's own error
    then stays), or no compiled kernels.
    """
    bn = post[0]
    if not _fuses(bn, y, covariates):
        return None
    bn.num_batches_tracked.add_(1)
    return _bn_relu_drop(y, bn.weight, bn.bias, bn, post[2] if len(post) > 2 else None, covariates)


def join_layers(stacks: Sequence[FCLayers]) -> tuple[SimpleNamespace, list]:
    """Stacks of one layer each as one layer of their widths side by side.

    Returns a stand-in for an :class:`FCLayers` of that one layer (``cat_keep``, ``linears``,
    ``post``), holding the stacks' weights, biases, covariate tables, batch-norm parameters and
    running statistics joined along their last dimension (its dropout the first stack's), and
    the ``(joined, parts)`` pairs: :func:`restore_statistics` copies the joined running
    statistics back into each stack's batch norm. Joined in the caller's grad mode: inside
    autograd, gradients reach each stack's parameters through the joins.
    """
    lins = [s.linears[0] for s in stacks]
    posts = [s.post[0] for s in stacks]
    bns = [p[0] for p in posts]
    pairs = []

    def joined(parts) -> torch.Tensor:
        parts = list(parts)
        out = torch.cat(parts, dim=-1)
        pairs.append((out, parts))
        return out

    tables = [
        SimpleNamespace(weight=joined(lin.embeddings[j].weight for lin in lins))
        for j in range(len(lins[0].embeddings))
    ]
    linear = SimpleNamespace(
        weight=joined(lin.weight for lin in lins),
        bias=joined(lin.bias for lin in lins),
        embeddings=tables,
    )
    bn = SimpleNamespace(
        weight=joined(bn.weight for bn in bns),
        bias=joined(bn.bias for bn in bns),
        running_mean=joined(bn.running_mean for bn in bns),
        running_var=joined(bn.running_var for bn in bns),
        momentum=bns[0].momentum,
        eps=bns[0].eps,
    )
    post = [bn, None, posts[0][2]] if len(posts[0]) > 2 else [bn]
    stand_in = SimpleNamespace(cat_keep=stacks[0].cat_keep, linears=[linear], post=[post])
    return stand_in, pairs


def restore_statistics(pairs: list) -> None:
    """Copy the joined running statistics of :func:`join_layers` into each batch norm's."""
    for joined, parts in pairs:
        if isinstance(parts[0], nn.Parameter):
            continue
        with torch.no_grad():
            torch._foreach_copy_(parts, list(joined.split([p.shape[-1] for p in parts], dim=-1)))


def _side_by_side(
    stacks: Sequence[FCLayers], x: torch.Tensor, cat_list: Sequence[torch.Tensor]
) -> list[torch.Tensor] | None:
    """:func:`parallel_stacks` as one wider layer; None where that does not apply."""
    first = stacks[0]
    # only one layer of batch norm -> ReLU (-> dropout) each: without batch norm, or with layer
    # norm, the post-blocks have other modules (and no momentum to compare)
    if not all(s._fusable and len(s.linears) == 1 for s in stacks):
        return None
    layers = [s.linears[0] for s in stacks]
    posts = [s.post[0] for s in stacks]
    form = {
        (tuple(s.cat_keep), len(lin.embeddings), lin.bias is not None,
         len(p), p[0].momentum, p[0].eps, (p[2].p, p[2].training) if len(p) > 2 else None)
        for s, lin, p in zip(stacks, layers, posts)
    }  # fmt: skip
    if len(form) > 1:
        return None
    cats = [cat_list[i] for i in first.cat_keep if i < len(cat_list)][: len(layers[0].embeddings)]
    codes = [c.view(-1) for c in cats]
    bns = [p[0] for p in posts]
    if layers[0].bias is None or not all(
        _fuses(bn, x, [(e.weight, c) for e, c in zip(lin.embeddings, codes)])
        for bn, lin in zip(bns, layers)
    ):
        return None
    joined, pairs = join_layers(stacks)
    lin, post = joined.linears[0], joined.post[0]
    y = torch.addmm(lin.bias, x, lin.weight)
    tables = [e.weight for e in lin.embeddings]
    drop = post[2] if len(post) > 2 else None
    out = _bn_relu_drop(y, post[0].weight, post[0].bias, post[0], drop, list(zip(tables, codes)))
    restore_statistics(pairs)  # each batch norm's running statistics, as if it had run alone
    with torch.no_grad():
        torch._foreach_add_([bn.num_batches_tracked for bn in bns], 1)
    return list(out.split([bn.num_features for bn in bns], dim=1))


def parallel_stacks(
    stacks: Sequence[FCLayers], x: torch.Tensor, *cat_list: torch.Tensor
) -> list[torch.Tensor]:
    """``[stack(x, *cat_list) for stack in stacks]``, in one pass where the stacks allow it.

    Stacks of one layer each, of the same form, reading the same input are one layer of their
    widths side by side: batch norm, ReLU and dropout act on each column alone. In training on
    the CPU with the compiled kernels, their weights are joined for one product and one compiled
    batch norm, ReLU and dropout pass (the running statistics written back to each stack's batch
    norm), in place of one of each per stack; elsewhere each stack runs on its own. The dropout
    masks are drawn once for all the columns, so they differ from those of the stacks run one
    after the other (the same distribution).

    Examples
    --------
    >>> import torch
    >>> stacks = [FCLayers(10, 16, n_cat_list=[2]), FCLayers(10, 8, n_cat_list=[2])]
    >>> x, batch = torch.randn(6, 10), torch.tensor([0, 1, 0, 1, 0, 1])
    >>> [h.shape for h in parallel_stacks(stacks, x, batch)]
    [torch.Size([6, 16]), torch.Size([6, 8])]
    """
    out = _side_by_side(stacks, x, cat_list) if len(stacks) > 1 else None
    return out if out is not None else [s(x, *cat_list) for s in stacks]


# Inside bf16_products, FCLayers' hidden -> hidden layers at least this wide both ways take
# bfloat16 products: totalVI's 256 -> 256 encoder layer, forward and backward, 648 -> 455 us
# (benchmarks/README.md, session 23). Narrower layers (the decoders' latent -> hidden, 20 -> 256)
# spent more on the casts than the products saved; first layers (the counts) stay float32.
_BF16_MIN_WIDTH = 128


class _CovariateLinear(nn.Module):
    """A linear layer plus one learned vector per category of each covariate.

    The weight is stored input-major, ``(n_in, n_out)``, so that a sparse input (a
    :class:`~cellvae._sparse.CSRBatch` of counts) multiplies it by gathering rows
    (:func:`~cellvae._sparse.sparse_linear`); a dense input uses one ``addmm``, in bfloat16
    products inside :func:`bf16_products` for a layer built with ``bf16=True``. Initialised like
    :class:`torch.nn.Linear` on ``[h; one-hot]``.
    """

    def __init__(
        self,
        n_in: int,
        n_out: int,
        n_cat_list: Sequence[int],
        bias: bool = True,
        bf16: bool = False,
    ):
        super().__init__()
        self.bf16 = bf16
        bound = 1.0 / math.sqrt(n_in + sum(n_cat_list))  # like nn.Linear on [h; one-hot]
        self.weight = nn.Parameter(torch.empty(n_in, n_out).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(n_out).uniform_(-bound, bound)) if bias else None
        self.embeddings = nn.ModuleList()
        for n_cat in n_cat_list:
            emb = nn.Embedding(n_cat, n_out)
            nn.init.uniform_(emb.weight, -bound, bound)
            self.embeddings.append(emb)

    def forward(
        self, x: torch.Tensor | CSRBatch | HStack, cats: Sequence[torch.Tensor]
    ) -> torch.Tensor:
        return self.add_covariates(self.product(x), cats)

    def product(self, x: torch.Tensor | CSRBatch | HStack) -> torch.Tensor:
        """``x W + b``, without the covariates' vectors."""
        if isinstance(x, CSRBatch | HStack):  # [counts | dense]: each part meets its weight rows
            return sparse_linear(x, self.weight, self.bias)
        if self.bf16 and _BF16.get() and x.dim() == 2:
            (out,) = _BF16Linear.apply(x, self.weight.t(), self.bias)
            return out
        if self.bias is not None:
            if x.dim() == 2:
                return torch.addmm(self.bias, x, self.weight)
            return x @ self.weight + self.bias
        return x @ self.weight

    def add_covariates(self, y: torch.Tensor, cats: Sequence[torch.Tensor]) -> torch.Tensor:
        """``y`` plus each covariate's vector of each cell's category."""
        for emb, c in zip(self.embeddings, cats):
            y = y + emb(c.view(-1))
        return y


class FCLayers(nn.Module):
    """Linear → BatchNorm / LayerNorm → ReLU → Dropout, repeated, with covariates injected.

    Parameters
    ----------
    n_in, n_out
        Input and output sizes.
    n_cat_list
        Number of categories of each categorical covariate; entries ≤ 1 are ignored.
    n_layers
        Number of layers (the first maps ``n_in → n_hidden``, the last ``→ n_out``).
    n_hidden
        Width of the hidden layers.
    dropout_rate
        Dropout probability after each layer (0 disables dropout).
    use_batch_norm, use_layer_norm
        Normalisation after each Linear (batch norm with momentum 0.01, eps 1e-3; layer norm
        without affine parameters).
    use_activation
        Apply ReLU after each layer.
    bias
        Bias in the Linear layers.
    inject_covariates
        Inject covariates into every layer (True) or only the first.

    Examples
    --------
    >>> import torch
    >>> fc = FCLayers(20, 8, n_cat_list=[3], n_layers=2, n_hidden=16)
    >>> fc(torch.randn(4, 20), torch.tensor([0, 1, 2, 1])).shape
    torch.Size([4, 8])
    """

    def __init__(
        self,
        n_in: int,
        n_out: int,
        n_cat_list: Iterable[int] | None = None,
        n_layers: int = 1,
        n_hidden: int = 128,
        dropout_rate: float = 0.1,
        use_batch_norm: bool = True,
        use_layer_norm: bool = False,
        use_activation: bool = True,
        bias: bool = True,
        inject_covariates: bool = True,
    ):
        super().__init__()
        # keep the positions of the covariates that carry information
        self.cat_keep = [i for i, n in enumerate(n_cat_list or []) if n > 1]
        cats = [n for n in (n_cat_list or []) if n > 1]
        sizes = [n_in] + [n_hidden] * (n_layers - 1) + [n_out]
        self.linears = nn.ModuleList()
        self.post = nn.ModuleList()
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layer_cats = cats if (i == 0 or inject_covariates) else []
            bf16 = i > 0 and min(a, b) >= _BF16_MIN_WIDTH
            self.linears.append(_CovariateLinear(a, b, layer_cats, bias=bias, bf16=bf16))
            post: list[nn.Module] = []
            if use_batch_norm:
                post.append(nn.BatchNorm1d(b, momentum=0.01, eps=1e-3))
            if use_layer_norm:
                post.append(nn.LayerNorm(b, elementwise_affine=False))
            if use_activation:
                post.append(nn.ReLU())
            if dropout_rate != 0:  # Dropout checks the range: a negative rate is an error
                post.append(Dropout(dropout_rate))
            self.post.append(nn.Sequential(*post))
        # BatchNorm1d → ReLU (→ Dropout) runs in one compiled pass in training (_fused_post)
        self._fusable = use_batch_norm and use_activation and not use_layer_norm

    def forward(self, x: torch.Tensor | CSRBatch | HStack, *cat_list: torch.Tensor) -> torch.Tensor:
        """Apply the layers to ``x`` with one code tensor per covariate in ``cat_list``.

        ``x`` may be a :class:`~cellvae._sparse.CSRBatch` or an :class:`~cellvae._sparse.HStack`
        of one and dense columns: the first layer reads the stored entries without building the
        dense matrix.
        """
        cats = [cat_list[i] for i in self.cat_keep if i < len(cat_list)]
        for linear, post in zip(self.linears, self.post):
            y, layer_cats = linear.product(x), cats[: len(linear.embeddings)]
            x = None
            if self._fusable:  # the covariates' vectors are added inside the kernel
                covariates = [(e.weight, c.view(-1)) for e, c in zip(linear.embeddings, layer_cats)]
                x = _fused_post(post, y, covariates)
            if x is None:
                x = post(linear.add_covariates(y, layer_cats))
        return x


class Encoder(nn.Module):
    """Encode data into the mean and variance of a diagonal Gaussian, and sample from it.

    Parameters
    ----------
    n_input, n_output
        Input size and latent size.
    n_cat_list
        Categories of each covariate injected into the layers (None for none).
    n_layers, n_hidden, dropout_rate, use_batch_norm, use_layer_norm, inject_covariates
        Passed to :class:`FCLayers`.
    distribution
        ``"normal"`` or ``"ln"`` (logistic normal: the softmax of the normal sample).
    var_eps
        Added to the variance for numerical stability.
    var_activation
        Maps the raw variance output to positive values (default ``torch.exp``).

    Returns
    -------
    ``forward`` returns ``(q_m, q_v, latent)``.

    Examples
    --------
    >>> import torch
    >>> enc = Encoder(50, 10)
    >>> q_m, q_v, z = enc(torch.randn(8, 50))
    >>> q_m.shape, bool((q_v > 0).all())
    (torch.Size([8, 10]), True)
    """

    def __init__(
        self,
        n_input: int,
        n_output: int,
        n_cat_list: Iterable[int] | None = None,
        n_layers: int = 1,
        n_hidden: int = 128,
        dropout_rate: float = 0.1,
        distribution: Literal["normal", "ln"] = "normal",
        var_eps: float = 1e-4,
        var_activation=None,
        use_batch_norm: bool = True,
        use_layer_norm: bool = False,
        inject_covariates: bool = True,
    ):
        super().__init__()
        self.distribution = distribution
        self.var_eps = var_eps
        self.var_activation = torch.exp if var_activation is None else var_activation
        self.encoder = FCLayers(
            n_input,
            n_hidden,
            n_cat_list=n_cat_list,
            n_layers=n_layers,
            n_hidden=n_hidden,
            dropout_rate=dropout_rate,
            use_batch_norm=use_batch_norm,
            use_layer_norm=use_layer_norm,
            inject_covariates=inject_covariates,
        )
        self.mean_encoder = nn.Linear(n_hidden, n_output)
        self.var_encoder = nn.Linear(n_hidden, n_output)

    def z_transformation(self, untran_z: torch.Tensor) -> torch.Tensor:
        """Map a normal sample to the latent space (softmax for ``"ln"``)."""
        return F.softmax(untran_z, dim=-1) if self.distribution == "ln" else untran_z

    def forward(self, x: torch.Tensor, *cat_list: torch.Tensor):
        """Return ``(q_m, q_v, latent)`` for input ``x`` and covariate codes ``cat_list``."""
        return self.forward_kl(x, *cat_list)[:3]

    def forward_kl(self, x: torch.Tensor, *cat_list: torch.Tensor):
        """:meth:`forward`'s ``(q_m, q_v, latent)`` and, when computed with them, the KL.

        With the compiled kernels (float32 CPU, ``exp`` variances) the heads, the sample and
        KL(q(z | x) ‖ N(0, I)) per cell (of the normal sample, before any ``"ln"`` softmax) are
        one autograd node (:func:`normal_heads`), the KL returned as a fourth value; elsewhere it
        is None and the caller computes it. The sample's noise is drawn from torch's default
        generator as :func:`reparameterize` draws it, so both give the same ``latent``.
        """
        q = self.encoder(x, *cat_list)
        if self.var_activation is torch.exp:
            heads = (self.mean_encoder, self.var_encoder)
            q_m, q_v, untran, kl = normal_heads(q, *heads, self.var_eps)
        else:
            q_m = self.mean_encoder(q)
            q_v = self.var_activation(self.var_encoder(q)) + self.var_eps
            untran, kl = reparameterize(q_m, q_v), None
        return q_m, q_v, self.z_transformation(untran), kl


def normal_heads(
    q: torch.Tensor, mean: nn.Linear, var: nn.Linear, var_eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """q(z | x) = N(q_m, q_v) from hidden units ``q``: ``(q_m, q_v, sample, kl)``.

    ``q_m = mean(q)``, ``q_v = exp(var(q)) + var_eps`` and a sample ``q_m + sqrt(q_v) · ε``,
    ε drawn from torch's default generator (as :func:`reparameterize`). With the compiled kernels
    (2-D float32 CPU tensors, layers with biases) the four are one autograd node
    (:class:`_NormalSample`) and ``kl`` is KL(q ‖ N(0, I)) per cell; elsewhere it is None, for
    the caller to compute.
    """
    heads = (mean.weight, mean.bias, var.weight, var.bias)
    if q.dim() == 2 and all(h is not None for h in heads) and _kernels.takes(q, *heads):
        noise = torch.randn(q.shape[0], mean.out_features, dtype=q.dtype)  # float32, as q
        return _NormalSample.apply(q, *heads, noise, var_eps)
    q_m = mean(q)
    q_v = torch.exp(var(q)) + var_eps
    return q_m, q_v, reparameterize(q_m, q_v), None


class _NormalSample(torch.autograd.Function):
    """An encoder's mean and variance heads, its sample and KL(q ‖ N(0, I)) as one node.

    ``apply(q, w_m, b_m, w_v, b_v, noise, var_eps)`` returns ``(q_m, q_v, z, kl)`` with
    ``q_m = q w_mᵀ + b_m``, ``q_v = exp(q w_vᵀ + b_v) + var_eps``, ``z = q_m + sqrt(q_v) ·
    noise`` and ``kl`` per row. Both heads are one product; the elementwise work, forward and
    backward, is one compiled call each (:func:`cellvae._kernels.normal_sample_forward`) where
    the torch code runs ~12 operators forward and as many autograd nodes backward, on (128, 10)
    tensors in an SCVI step: ~4 µs each, mostly dispatch.
    """

    @staticmethod
    def forward(ctx, q, w_m, b_m, w_v, b_v, noise, var_eps):
        w, b = torch.cat([w_m, w_v]), torch.cat([b_m, b_v])
        mu = torch.addmm(b, q, w.t())
        ctx.set_materialize_grads(False)  # outputs without a gradient send None
        ctx.save_for_backward(q, w, mu, noise)
        ctx.var_eps = var_eps
        return _kernels.normal_sample_forward(mu, noise, var_eps)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        q, w, mu, noise = ctx.saved_tensors
        grads = [None if g is None else g.contiguous() for g in grads]
        d = _kernels.normal_sample_backward(mu, noise, ctx.var_eps, grads)
        n_lat, needs = noise.shape[1], ctx.needs_input_grad
        dq = torch.mm(d, w) if needs[0] else None
        dw = torch.mm(d.t(), q) if needs[1] or needs[3] else None
        db = d.sum(0) if needs[2] or needs[4] else None

        def part(t, i):  # the mean head's rows (inputs 1, 2), the variance head's (3, 4)
            return None if t is None or not needs[i] else t[:n_lat] if i < 3 else t[n_lat:]

        return dq, part(dw, 1), part(db, 2), part(dw, 3), part(db, 4), None, None


class DecoderSCVI(nn.Module):
    """Decode a latent sample into the parameters of the count distribution of each gene.

    Parameters
    ----------
    n_input
        Latent size (plus any continuous covariates concatenated to ``z``).
    n_output
        Number of genes.
    n_cat_list
        Categories of each covariate injected into the layers (batch first).
    n_layers, n_hidden
        Depth and width of the hidden stack.
    inject_covariates
        Inject covariates into every hidden layer (True) or only the first.
    use_batch_norm, use_layer_norm
        Normalisation in the hidden layers.
    scale_activation
        ``"softmax"`` (gene proportions summing to 1) or ``"softplus"`` (unnormalised, used with
        size factors).
    gene_cell_dispersion
        Build the output layer of ``px_r`` (needed only with ``dispersion="gene-cell"``).
    zero_inflation
        Build the output layer of ``px_dropout`` (needed only by the ZINB likelihood). A
        layer that is not built costs no parameters, optimiser state or matrix products;
        its output is None.

    Examples
    --------
    >>> import torch
    >>> dec = DecoderSCVI(10, 100, n_cat_list=[2])
    >>> z, lib, b = torch.randn(4, 10), torch.full((4, 1), 7.0), torch.tensor([0, 1, 0, 1])
    >>> px_scale, px_r, px_rate, px_dropout = dec("gene", z, lib, b)
    >>> px_scale.shape, px_r is None, bool(torch.allclose(px_scale.sum(-1), torch.ones(4)))
    (torch.Size([4, 100]), True, True)
    """

    def __init__(
        self,
        n_input: int,
        n_output: int,
        n_cat_list: Iterable[int] | None = None,
        n_layers: int = 1,
        n_hidden: int = 128,
        inject_covariates: bool = True,
        use_batch_norm: bool = False,
        use_layer_norm: bool = False,
        scale_activation: Literal["softmax", "softplus"] = "softmax",
        *,
        gene_cell_dispersion: bool = True,
        zero_inflation: bool = True,
    ):
        super().__init__()
        if scale_activation not in ("softmax", "softplus"):
            raise ValueError(
                f"scale_activation must be 'softmax' or 'softplus', got {scale_activation!r}."
            )
        self.scale_activation = scale_activation
        self.px_decoder = FCLayers(
            n_input,
            n_hidden,
            n_cat_list=n_cat_list,
            n_layers=n_layers,
            n_hidden=n_hidden,
            dropout_rate=0.0,
            use_batch_norm=use_batch_norm,
            use_layer_norm=use_layer_norm,
            inject_covariates=inject_covariates,
        )
        self.px_scale_decoder = GeneLinear(n_hidden, n_output)
        self.px_r_decoder = GeneLinear(n_hidden, n_output) if gene_cell_dispersion else None
        self.px_dropout_decoder = GeneLinear(n_hidden, n_output) if zero_inflation else None

    @staticmethod
    def _head(
        layer: nn.Linear | None, h: torch.Tensor, gene_idx: torch.Tensor | None
    ) -> torch.Tensor | None:
        if layer is None:  # an output layer the decoder was built without
            return None
        if gene_idx is None:
            return layer(h)
        return F.linear(h, layer.weight[gene_idx], layer.bias[gene_idx])

    def _activate(self, logits: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``px_scale`` of all genes from the scale layer's output."""
        if self.scale_activation == "softplus":
            return F.softplus(logits)  # scale() copies it into out
        return torch.softmax(logits, dim=-1, out=out)

    def _scale(
        self, h: torch.Tensor, gene_idx: torch.Tensor | None, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        if gene_idx is None:
            return self._activate(self.px_scale_decoder(h), out)
        if self.scale_activation == "softplus":
            return F.softplus(self._head(self.px_scale_decoder, h, gene_idx))
        logits = self.px_scale_decoder(h)
        log_norm = torch.logsumexp(logits, dim=-1, keepdim=True)
        return torch.exp(logits[:, gene_idx] - log_norm)

    def scale(
        self,
        z: torch.Tensor,
        *cat_list: torch.Tensor,
        gene_idx: torch.Tensor | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Only ``px_scale`` (normalised expression): the other output layers are skipped.

        With ``out`` (cells × genes, or × ``gene_idx``), the result is written there and
        returned: a getter's output rows, without a temporary and a copy.
        """
        value = self._scale(self.px_decoder(z, *cat_list), gene_idx, out)
        if out is not None and value.data_ptr() != out.data_ptr():
            value = out.copy_(value)
        return value

    def forward(
        self,
        dispersion: str,
        z: torch.Tensor,
        library: torch.Tensor,
        *cat_list: torch.Tensor,
        gene_idx: torch.Tensor | None = None,
        scale_logits: bool = False,
    ):
        """Return ``(px_scale, px_r, px_rate, px_dropout)``.

        ``px_r`` is None unless ``dispersion`` is ``"gene-cell"``; ``px_dropout`` is None when
        the decoder was built without ``zero_inflation``.

        ``library`` is the log library size (cells × 1). ``gene_idx`` restricts the outputs to
        those genes: only their rows of the output layers are computed (with softmax, the
        normaliser still needs every gene's logit). ``scale_logits=True`` (softmax activation,
        all genes) returns the logits of ``px_scale`` in its place and None for ``px_rate``, for
        a likelihood that applies the softmax itself (``scale_logits`` of
        :class:`~cellvae.distributions.NegativeBinomial`).
        """
        if dispersion == "gene-cell" and self.px_r_decoder is None:
            raise ValueError(
                "dispersion='gene-cell' needs a decoder built with gene_cell_dispersion=True."
            )
        if scale_logits and (self.scale_activation != "softmax" or gene_idx is not None):
            raise ValueError("scale_logits needs the softmax activation and all genes.")
        h = self.px_decoder(z, *cat_list)
        r_layer = self.px_r_decoder if dispersion == "gene-cell" else None
        if gene_idx is None:  # the output layers in one product (bfloat16 training steps)
            logits, px_dropout, px_r = gene_linears(
                h, self.px_scale_decoder, self.px_dropout_decoder, r_layer
            )
            if scale_logits:
                return logits, px_r, None, px_dropout
            px_scale = self._activate(logits)
        else:
            px_dropout = self._head(self.px_dropout_decoder, h, gene_idx)
            px_r = self._head(r_layer, h, gene_idx)
            px_scale = self._scale(h, gene_idx)
        px_rate = torch.exp(library) * px_scale
        return px_scale, px_r, px_rate, px_dropout


# ---------------------------------------------------------------------- totalVI
_LOG_LIBRARY_MAX = 15.0  # exp(15) ≈ 3.3 million counts: far above any real library size


class EncoderTOTALVI(nn.Module):
    """Encode RNA and protein counts into q(z | x, y) and the gene library q(ℓ | x, y).

    The input is the concatenation ``[log1p(x), log1p(y)]`` (plus continuous covariates, if
    any), dense or as an :class:`~cellvae._sparse.HStack` that keeps the counts sparse. A
    stack of :class:`FCLayers` gives the mean and variance of ``z``; a one-layer stack gives
    those of the log library size ``ℓ``. The library is ``exp`` of its normal sample, with
    the log clamped at 15 so a wild sample early in training cannot overflow. A model that uses
    the observed library builds no library stack (``latent_library=False``).

    Parameters
    ----------
    n_input
        Input size (genes + proteins + continuous covariates).
    n_output
        Latent size.
    n_cat_list
        Categories of each covariate injected into the layers (batch first); None for none.
    n_layers, n_hidden
        Depth and width of the ``z`` stack (the library stack has one layer).
    dropout_rate
        Dropout after each hidden layer.
    distribution
        ``"ln"`` (logistic normal: ``z`` is the softmax of the normal sample) or ``"normal"``.
    use_batch_norm, use_layer_norm
        Normalisation in the hidden layers.
    latent_library
        Build and run the library stack. Without it (the observed library is used instead)
        ``ql_m``, ``ql_v`` and the ``"l"`` entries are None: that stack is as wide as the
        first layer of the ``z`` stack.

    Returns
    -------
    ``forward`` returns ``(qz_m, qz_v, ql_m, ql_v, latent, untran_latent)``: means and variances
    of z and of the log library, then dicts with ``"z"`` and ``"l"``: the transformed latent and
    library (``latent["l"] = exp(clamped log library)``) and the untransformed normal samples.

    Examples
    --------
    >>> import torch
    >>> enc = EncoderTOTALVI(60, 10, n_cat_list=[2])
    >>> data, batch = torch.rand(8, 60), torch.randint(2, (8,))
    >>> qz_m, qz_v, ql_m, ql_v, latent, untran = enc(data, batch)
    >>> qz_m.shape, ql_m.shape, latent["z"].shape, latent["l"].shape
    (torch.Size([8, 10]), torch.Size([8, 1]), torch.Size([8, 10]), torch.Size([8, 1]))
    >>> bool(torch.allclose(latent["z"].sum(-1), torch.ones(8)))  # logistic normal
    True
    """

    var_eps = 1e-4  # added to the variances of q(z) and q(ℓ)

    def __init__(
        self,
        n_input: int,
        n_output: int,
        n_cat_list: Iterable[int] | None = None,
        n_layers: int = 2,
        n_hidden: int = 256,
        dropout_rate: float = 0.1,
        distribution: Literal["ln", "normal"] = "ln",
        use_batch_norm: bool = True,
        use_layer_norm: bool = False,
        latent_library: bool = True,
    ):
        super().__init__()
        if distribution not in ("ln", "normal"):
            raise ValueError(f"distribution must be 'ln' or 'normal', got {distribution!r}.")
        self.distribution = distribution
        common = {
            "n_cat_list": n_cat_list,
            "n_hidden": n_hidden,
            "dropout_rate": dropout_rate,
            "use_batch_norm": use_batch_norm,
            "use_layer_norm": use_layer_norm,
        }
        self.encoder = FCLayers(n_input, n_hidden, n_layers=n_layers, **common)
        self.z_mean_encoder = nn.Linear(n_hidden, n_output)
        self.z_var_encoder = nn.Linear(n_hidden, n_output)
        self.latent_library = latent_library
        if latent_library:
            self.l_encoder = FCLayers(n_input, n_hidden, n_layers=1, **common)
            self.l_mean_encoder = nn.Linear(n_hidden, 1)
            self.l_var_encoder = nn.Linear(n_hidden, 1)
        else:  # weights saved by versions that built the stack regardless still load
            self.register_load_state_dict_pre_hook(_drop_library_stack)

    def z_transformation(self, untran_z: torch.Tensor) -> torch.Tensor:
        """Map a normal sample to the latent space (softmax for ``"ln"``)."""
        return F.softmax(untran_z, dim=-1) if self.distribution == "ln" else untran_z

    def reparameterize_transformation(
        self, mu: torch.Tensor, var: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw ``untran_z ~ N(mu, var)`` and return ``(untran_z, z_transformation(untran_z))``.

        Examples
        --------
        >>> import torch
        >>> enc = EncoderTOTALVI(5, 3, distribution="normal")
        >>> untran, z = enc.reparameterize_transformation(torch.zeros(2, 3), torch.ones(2, 3))
        >>> bool(torch.equal(untran, z))
        True
        """
        untran_z = reparameterize(mu, var)
        return untran_z, self.z_transformation(untran_z)

    def forward(self, data: torch.Tensor | HStack, *cat_list: torch.Tensor):
        """Return ``(qz_m, qz_v, ql_m, ql_v, latent, untran_latent)`` for ``data``.

        ``data`` is dense, or an :class:`~cellvae._sparse.HStack` of the CSR ``log1p`` counts
        and the dense protein (and covariate) columns, which the first layers read sparsely.
        """
        return self.forward_kl(data, *cat_list)[:6]

    def forward_kl(self, data: torch.Tensor | HStack, *cat_list: torch.Tensor):
        """:meth:`forward`'s six values and KL(q(z | x, y) ‖ N(0, I)) per cell, or None.

        The KL comes with the heads and the sample from one compiled node where
        :func:`normal_heads` runs one (float32 CPU); elsewhere it is None.
        """
        q = self.encoder(data, *cat_list)
        qz_m, qz_v, untran_z, kl_z = normal_heads(
            q, self.z_mean_encoder, self.z_var_encoder, self.var_eps
        )
        z = self.z_transformation(untran_z)
        if not self.latent_library:
            return qz_m, qz_v, None, None, {"z": z, "l": None}, {"z": untran_z, "l": None}, kl_z
        ql = self.l_encoder(data, *cat_list)
        ql_m, ql_v, untran_l, _ = normal_heads(
            ql, self.l_mean_encoder, self.l_var_encoder, self.var_eps
        )
        library = torch.exp(untran_l.clamp(max=_LOG_LIBRARY_MAX))
        latent, untran = {"z": z, "l": library}, {"z": untran_z, "l": untran_l}
        return qz_m, qz_v, ql_m, ql_v, latent, untran, kl_z


def _drop_library_stack(module, state_dict, prefix, *args) -> None:
    """Drop the library stack's weights from ``state_dict`` (an encoder built without one)."""
    for key in [k for k in state_dict if k.startswith(prefix + "l_")]:
        del state_dict[key]


class CovariateVectors(nn.Module):
    """One learned vector per category of each covariate, added to a layer's output.

    A linear layer on ``[h; one-hot covariates]`` is ``W h + b`` plus, for each covariate, the
    weight column of the cell's category: this module is that second part, for an output layer
    whose ``W h + b`` is computed elsewhere (a :class:`GeneLinear`'s fused product). Covariates
    with one category have no vector, as in :class:`FCLayers`; initialised like
    :class:`torch.nn.Linear` on ``[h; one-hot]`` with ``n_in`` inputs in ``h``.
    """

    def __init__(self, n_in: int, n_out: int, n_cat_list: Iterable[int] | None = None):
        super().__init__()
        n_cat_list = list(n_cat_list or [])
        self.cat_keep = [i for i, n in enumerate(n_cat_list) if n > 1]
        cats = [n_cat_list[i] for i in self.cat_keep]
        bound = 1.0 / math.sqrt(n_in + sum(cats))
        self.embeddings = nn.ModuleList()
        for n_cat in cats:
            emb = nn.Embedding(n_cat, n_out)
            nn.init.uniform_(emb.weight, -bound, bound)
            self.embeddings.append(emb)

    def forward(self, y: torch.Tensor, *cat_list: torch.Tensor) -> torch.Tensor:
        """``y`` (cells × n_out, or samples × cells × n_out) plus each cell's vectors."""
        for emb, i in zip(self.embeddings, self.cat_keep):
            y = y + emb(cat_list[i].view(-1))
        return y


class DecoderTOTALVI(nn.Module):
    """Decode a latent sample into gene parameters and the protein background / foreground.

    Four small stacks read ``z`` (with the covariates injected): one for the genes, one for
    the protein background, one for the foreground scale and one for the mixing logits (run
    side by side by :func:`parallel_stacks`). Each output head sees ``[h, z]`` (the stack's
    output and ``z`` itself) and the covariates (:class:`CovariateVectors`), as scvi-tools'
    heads do. The genes' zero-inflation head reads the mixing stack, as in scvi-tools.

    * Genes: ``scale = softmax(W [h, z])`` (or softplus), ``rate = library · scale``, and
      zero-inflation logits ``dropout``.
    * Protein background: ``log β ~ N(α, σ)`` per cell and protein with ``α`` =
      ``back_alpha`` and ``σ`` = ``back_beta`` ``= softplus(·) + 1e-8`` (scvi-tools ≥ 1.2; an
      exponential before); the background rate is
      ``exp`` of a sample (with ``sample_background=False``, its mean ``exp(α + σ²/2)``).
    * Protein foreground: ``rate_fore = rate_back · fore_scale`` with ``fore_scale = 1 +
      ReLU(·) + 1e-8 ≥ 1``.
    * ``mixing``: logit of the probability that a protein count is background.

    Parameters
    ----------
    n_input
        Latent size (plus continuous covariates concatenated to ``z``).
    n_output_genes, n_output_proteins
        Number of genes and of proteins.
    n_cat_list
        Categories of each covariate injected into the layers (batch first).
    n_layers, n_hidden
        Depth and width of each stack.
    dropout_rate
        Dropout in the stacks.
    use_batch_norm, use_layer_norm
        Normalisation in the stacks.
    scale_activation
        ``"softmax"`` (gene proportions) or ``"softplus"`` (unnormalised, with size factors).
    zero_inflation
        Build the genes' zero-inflation output layer (only the ZINB likelihood uses it; the
        negative binomial default then has no such parameters or optimiser state).

    Returns
    -------
    ``forward`` returns ``(px, py, log_pro_back_mean)``: ``px`` has ``"scale"``, ``"rate"`` and
    ``"dropout"`` (None with ``compute_dropout=False``); ``py`` has ``"back_alpha"``,
    ``"back_beta"``, ``"fore_scale"``, ``"mixing"``, ``"rate_back"`` and ``"rate_fore"``;
    ``log_pro_back_mean`` is the per-cell sample of ``log β``.

    Examples
    --------
    >>> import torch
    >>> dec = DecoderTOTALVI(10, 100, 7, n_cat_list=[2])
    >>> z, lib, b = torch.randn(4, 10), torch.full((4, 1), 1000.0), torch.tensor([0, 1, 0, 1])
    >>> px, py, log_back = dec(z, lib, b)
    >>> px["rate"].shape, py["rate_fore"].shape, log_back.shape
    (torch.Size([4, 100]), torch.Size([4, 7]), torch.Size([4, 7]))
    >>> bool((py["rate_fore"] >= py["rate_back"]).all())
    True
    """

    def __init__(
        self,
        n_input: int,
        n_output_genes: int,
        n_output_proteins: int,
        n_cat_list: Iterable[int] | None = None,
        n_layers: int = 1,
        n_hidden: int = 256,
        dropout_rate: float = 0.0,
        use_batch_norm: bool = True,
        use_layer_norm: bool = False,
        scale_activation: Literal["softmax", "softplus"] = "softmax",
        *,
        zero_inflation: bool = True,
    ):
        super().__init__()
        if scale_activation not in ("softmax", "softplus"):
            raise ValueError(
                f"scale_activation must be 'softmax' or 'softplus', got {scale_activation!r}."
            )
        self.scale_activation = scale_activation

        def stack() -> FCLayers:
            return FCLayers(
                n_input,
                n_hidden,
                n_cat_list=n_cat_list,
                n_layers=n_layers,
                n_hidden=n_hidden,
                dropout_rate=dropout_rate,
                use_batch_norm=use_batch_norm,
                use_layer_norm=use_layer_norm,
            )

        n_cat = n_hidden + n_input
        self.px_decoder = stack()
        self.px_scale_decoder = GeneLinear(n_cat, n_output_genes)
        self.px_dropout_decoder = GeneLinear(n_cat, n_output_genes) if zero_inflation else None
        self.py_back_decoder = stack()
        self.py_back_alpha = nn.Linear(n_cat, n_output_proteins)
        self.py_back_beta = nn.Linear(n_cat, n_output_proteins)
        self.py_fore_decoder = stack()
        self.py_fore_scale = nn.Linear(n_cat, n_output_proteins)
        self.py_mixing_decoder = stack()
        self.py_mixing = nn.Linear(n_cat, n_output_proteins)
        # each head's covariate vectors, by the head's name
        genes = ("px_scale", "px_dropout") if zero_inflation else ("px_scale",)
        proteins = ("back_alpha", "back_beta", "fore_scale", "mixing")
        heads = dict.fromkeys(genes, n_output_genes) | dict.fromkeys(proteins, n_output_proteins)
        self.head_covariates = nn.ModuleDict(
            {name: CovariateVectors(n_cat, n_out, n_cat_list) for name, n_out in heads.items()}
        )

    def forward(
        self,
        z: torch.Tensor,
        library_gene: torch.Tensor,
        *cat_list: torch.Tensor,
        sample_background: bool = True,
        compute_dropout: bool = True,
        scale_logits: bool = False,
    ):
        """Return ``(px, py, log_pro_back_mean)``; ``library_gene`` is on the count scale.

        ``sample_background=False`` uses the mean of ``β``, ``exp(α + σ²/2)``, instead of a
        sample (for deterministic getters); ``compute_dropout=False`` skips the
        zero-inflation head. ``scale_logits=True`` (softmax activation) puts the logits of
        ``scale`` in ``px["scale_logits"]`` and None in ``px["scale"]`` and ``px["rate"]``, for a
        likelihood that applies the softmax itself.
        """
        if compute_dropout and self.px_dropout_decoder is None:
            raise ValueError("compute_dropout needs a decoder built with zero_inflation=True.")
        if scale_logits and self.scale_activation != "softmax":
            raise ValueError("scale_logits needs the softmax activation.")
        h, h_back, h_fore, h_mix = parallel_stacks(
            [self.px_decoder, self.py_back_decoder, self.py_fore_decoder, self.py_mixing_decoder],
            z,
            *cat_list,
        )

        def cov(name: str, y: torch.Tensor) -> torch.Tensor:  # a head's covariate vectors added
            return self.head_covariates[name](y, *cat_list)

        hz_mix = torch.cat([h_mix, z], dim=-1)
        (logits,) = gene_linears(torch.cat([h, z], dim=-1), self.px_scale_decoder)
        logits = cov("px_scale", logits)
        dropout = None
        if compute_dropout:
            (dropout,) = gene_linears(hz_mix, self.px_dropout_decoder)
            dropout = cov("px_dropout", dropout)
        px = {"dropout": dropout}
        if scale_logits:
            px.update(scale_logits=logits, scale=None, rate=None)
        else:
            if self.scale_activation == "softmax":
                scale = torch.softmax(logits, dim=-1)
            else:
                scale = F.softplus(logits)
            px.update(scale=scale, rate=library_gene * scale)

        hz = torch.cat([h_back, z], dim=-1)
        back_alpha = cov("back_alpha", self.py_back_alpha(hz))
        back_beta = F.softplus(cov("back_beta", self.py_back_beta(hz))) + 1e-8
        if sample_background:
            log_pro_back_mean = back_alpha + back_beta * torch.randn_like(back_alpha)
        else:  # the log of the log-normal mean: what the samples average to
            log_pro_back_mean = back_alpha + back_beta**2 / 2
        # a background rate beyond e^60 (~1e26 counts) means nothing for data, and past e^88 it is
        # inf in float32, which made the likelihood NaN (one outlier cell drove back_beta to
        # ~400): clamped there, with no gradient through the clamped entries
        rate_back = torch.exp(log_pro_back_mean.clamp(max=60.0))

        hz = torch.cat([h_fore, z], dim=-1)
        fore_scale = F.relu(cov("fore_scale", self.py_fore_scale(hz))) + 1.0 + 1e-8
        py = {
            "back_alpha": back_alpha,
            "back_beta": back_beta,
            "fore_scale": fore_scale,
            "mixing": cov("mixing", self.py_mixing(hz_mix)),
            "rate_back": rate_back,
            "rate_fore": rate_back * fore_scale,
        }
        return px, py, log_pro_back_mean
