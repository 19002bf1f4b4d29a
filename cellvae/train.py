"""The one training loop: optimiser, device, KL warm-up, validation, early stopping, progress.

Any module whose ``forward(tensors, kl_weight)`` returns a
:class:`~cellvae.module.LossOutput` trains here. The loop never touches AnnData, pandas or scipy:
minibatches come from :meth:`~cellvae._data.TensorData.batches` (tensor indexing; counts on disk
are read a window of cells at a time).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

try:  # notebook progress bars need ipywidgets; without it tqdm.auto only warns
    import ipywidgets  # noqa: F401
    from tqdm.auto import tqdm
except ImportError:
    from tqdm import tqdm

from . import _kernels
from ._data import BatchSampler, TensorData, seeded_generator
from ._registry import warn_user
from .module._base import check_choice, check_flags
from .nn import BF16WeightCopies, bf16_products

logger = logging.getLogger(__name__)

__all__ = [
    "Adam",
    "Plateau",
    "TrainConfig",
    "TrainingError",
    "default_max_epochs",
    "resolve_device",
    "resolve_precision",
    "train_module",
]


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` → CUDA when available, else CPU; ``"cpu"``, ``"cuda[:N]"`` or ``"mps"``.

    A device that torch knows but that is not available here, or that cannot hold a model's
    weights (``"meta"``), is refused before anything is moved to it.
    """
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(device, str | torch.device):
        raise TypeError(
            f"device must be 'auto', 'cpu', 'cuda[:N]', 'mps' or a torch.device, got {device!r}."
        )
    try:
        dev = torch.device(device)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(
            f"Unknown device {str(device)!r}: use 'auto' (CUDA when available, else CPU), "
            "'cpu', 'cuda', 'cuda:N' or 'mps'."
        )
    if (
        dev.type == "cuda"
        and not torch.cuda.is_available()
        or (dev.type == "mps" and not torch.backends.mps.is_available())
    ):
        raise ValueError(
            f"device={str(device)!r} was requested but it is not available; use 'cpu'."
        )
    return dev


PRECISIONS = ("auto", "32-true", "32", "bf16-mixed")


def _native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # another torch: no way to tell, so no bfloat16
        return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """``"auto"`` → ``"bf16-mixed"`` on a CPU with bfloat16 instructions, else ``"32-true"``.

    ``"32"`` is read as ``"32-true"`` (Lightning's names, which scvi-tools users pass to
    ``train``). Elsewhere (a CPU without those instructions emulates bfloat16 products, slower
    than float32; a GPU is left in float32 until measured there) ``"auto"`` keeps float32.
    """
    if precision == "auto":
        return "bf16-mixed" if device.type == "cpu" and _native_bf16() else "32-true"
    return "32-true" if precision == "32" else precision


def default_max_epochs(n_obs: int) -> int:
    """scvi-tools' rule: ``min(400, round(20000 / n_obs · 400))``, at least 1."""
    return max(1, min(400, round(20_000 / max(n_obs, 1) * 400)))


@dataclass
class TrainConfig:
    """Options of :func:`train_module` (the models' ``train`` methods expose the same names)."""

    max_epochs: int = 400
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-6
    eps: float = 0.01
    validation_size: float = 0.1
    kl_warmup_fraction: float | None = 0.75
    n_epochs_kl_warmup: int | None = None
    early_stopping: bool = False
    early_stopping_patience: int = 45
    early_stopping_min_delta: float = 0.0
    reduce_lr_on_plateau: bool = False
    lr_factor: float = 0.6
    lr_patience: int = 30
    lr_min: float = 0.0
    gradient_clip_val: float | None = None
    seed: int | None = 0
    device: str = "auto"
    progress_bar: bool = True
    eval_batch_size: int = 128  # validation: larger batches raise peak memory, not speed
    precision: str = "auto"

    def validate(self) -> None:
        """Raise a ValueError for options out of range, a TypeError for options of a wrong type."""
        integers = ("max_epochs", "batch_size", "seed", "n_epochs_kl_warmup", "lr_patience")
        integers += ("eval_batch_size", "early_stopping_patience")
        reals = ("lr", "weight_decay", "eps", "validation_size", "kl_warmup_fraction")
        reals += ("early_stopping_min_delta", "lr_factor", "lr_min", "gradient_clip_val")
        optional = {"seed", "n_epochs_kl_warmup", "kl_warmup_fraction", "gradient_clip_val"}
        for names, kind, what in (
            (integers, numbers.Integral, "an integer"),
            (reals, numbers.Real, "a number"),
        ):
            for name in names:
                value = getattr(self, name)
                if value is None and name in optional:
                    continue
                if isinstance(value, bool) or not isinstance(value, kind):
                    raise TypeError(f"{name} must be {what}, got {value!r}.")
        check_choice("precision", self.precision, PRECISIONS)
        check_flags(
            early_stopping=self.early_stopping,
            reduce_lr_on_plateau=self.reduce_lr_on_plateau,
            progress_bar=self.progress_bar,
        )
        if self.early_stopping_patience < 1:
            raise ValueError(
                f"early_stopping_patience must be at least 1, got {self.early_stopping_patience}."
            )
        if self.max_epochs < 1:
            raise ValueError(f"max_epochs must be at least 1, got {self.max_epochs}.")
        if self.eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be at least 1, got {self.eval_batch_size}.")
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:  # torch's seed range
            raise ValueError(f"seed must be a 64-bit integer or None, got {self.seed}.")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be at least 2 (batch norm), got {self.batch_size}.")
        for name in reals:
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"{name} must be finite, got {value!r}.")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}.")
        if self.kl_warmup_fraction is not None and not 0 <= self.kl_warmup_fraction <= 1:
            raise ValueError("kl_warmup_fraction must be in [0, 1] or None.")
        if not 0 < self.lr_factor < 1:
            raise ValueError(f"lr_factor must be in (0, 1), got {self.lr_factor}.")
        # 0 turns gradient clipping off (as in Lightning); a negative norm would flip the steps
        non_negative = ("weight_decay", "eps", "lr_min", "early_stopping_min_delta")
        non_negative += ("gradient_clip_val", "n_epochs_kl_warmup", "lr_patience")
        for name in non_negative:
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be at least 0, got {value}.")


class TrainingError(RuntimeError):
    """Training diverged: a non-finite loss or gradients. The weights stay finite."""


def _kl_weight(step: int, warmup_steps: int) -> float:
    return 1.0 if warmup_steps <= 0 else min(1.0, step / warmup_steps)


def _term_names(out) -> tuple[str, ...]:
    """Names of the per-cell terms of a module's output, in the order of :func:`_term_sums`."""
    return ("reconstruction", "kl_local", *out.extra)  # extra: e.g. TOTALVI's protein terms


@torch.no_grad()
def _term_sums(out, dest: torch.Tensor) -> None:
    """Sums over a minibatch's cells of the per-cell terms of a module's output, into ``dest``.

    Two operators, where a 0-d sum per term (each detached) took about ten, ~50 µs of an SCVI
    training step. ``dest`` is a row of a table allocated once per pass: small tensors kept
    from step to step, between the steps' large temporaries, fragmented the heap (SCVI at 100k
    cells peaked 42-61 MB above the data, 37-38 MB with the table).
    """
    torch.sum(torch.stack([out.reconstruction, out.kl_local, *out.extra.values()]), 1, out=dest)


def _term_table(out, n_rows: int, lead: int = 0) -> tuple[tuple[str, ...], torch.Tensor]:
    """The names of ``out``'s terms and an empty table of ``n_rows`` rows for their sums.

    Each row has ``lead`` columns first, then one per term (:func:`_term_sums` writes those).
    """
    names = _term_names(out)
    return names, out.loss.new_empty((n_rows, lead + len(names)))


def _with_elbo(names: tuple[str, ...], values: list[float]) -> dict[str, float]:
    """The terms by name, led by the negative ELBO (reconstruction + KL)."""
    terms = dict(zip(names, values, strict=True))
    return {"elbo": terms["reconstruction"] + terms["kl_local"], **terms}


class _Mode:
    """``module.train(mode)`` for a module tree that does not change: the flags set in one loop.

    ``nn.Module.train`` recurses through the tree and sets each flag through ``__setattr__``:
    ~100 µs a call for TOTALVAE's 61 submodules (3 µs here), three calls an epoch (a 500-cell
    data set's epoch is ~19 ms). Where a submodule overrides ``train``, its own method is
    called instead.
    """

    def __init__(self, module: nn.Module):
        self.module = module
        self.modules = list(module.modules())
        self.plain = all(type(m).train is nn.Module.train for m in self.modules)

    def __call__(self, mode: bool) -> None:
        if not self.plain:
            self.module.train(mode)
            return
        for m in self.modules:
            m.__dict__["training"] = mode


@torch.no_grad()
def evaluate(
    module: nn.Module,
    data: TensorData,
    indices: torch.Tensor,
    batch_size: int = 2048,
    set_mode: _Mode | None = None,
) -> dict[str, float]:
    """Per-cell averages of the negative ELBO and its terms over ``indices`` (eval mode)."""
    was_training = module.training
    set_mode = set_mode or module.train
    set_mode(False)
    names, table, n_batches = (), None, 0
    for batch in data.batches(indices, batch_size):
        out = module(batch, kl_weight=1.0)
        if table is None:
            names, table = _term_table(out, len(BatchSampler(indices, batch_size)))
        _term_sums(out, table[n_batches])
        n_batches += 1
    set_mode(was_training)
    if table is None:
        return {}
    n = max(len(indices), 1)
    return _with_elbo(names, [v / n for v in table[:n_batches].double().sum(0).tolist()])


class Adam:
    """Adam with L2 weight decay (``torch.optim.Adam`` semantics), in one fused kernel.

    A minimal optimiser of our own: ``torch.optim``'s base class imports ``torch._dynamo`` (and
    sympy) on first use, about 100 MB of memory and 2 s for nothing a plain loop needs. The update
    of float32 CPU parameters runs in the compiled kernels (:class:`cellvae._kernels.AdamState`: the
    check below and the update in one call, less than half the time of torch's two); elsewhere
    in torch's fused Adam kernel where it exists (CPU and CUDA, torch >= 2.4) and in
    ``torch._foreach_*`` operations otherwise. All give ``torch.optim.Adam``'s result (tested).

    A step whose gradients hold an inf or a NaN is skipped, as under ``torch.amp.GradScaler``:
    parameters, moments and step counts stay as they were, so the weights never turn non-finite.
    The check is one pass over the gradients and needs no host synchronisation on a GPU.

    Parameters
    ----------
    params
        Parameters to update (their ``.grad`` is read; a None gradient skips the parameter).
    lr, betas, eps, weight_decay
        As for :class:`torch.optim.Adam`.

    Examples
    --------
    >>> import torch
    >>> w = torch.nn.Parameter(torch.ones(3))
    >>> opt = Adam([w], lr=0.1)
    >>> w.grad = torch.ones(3)
    >>> float(opt.step())  # 1.0 when the step was skipped
    0.0
    >>> [round(v, 4) for v in w.tolist()]
    [0.9, 0.9, 0.9]
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        bf16_copies: BF16WeightCopies | None = None,
    ):
        self.params = list(params)
        self.bf16_copies = bf16_copies
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]
        # one step count per parameter, all views of one tensor: when every parameter has a
        # gradient (the usual case) the counts advance in one operation, where a list of 0-d
        # tensors costs two scalar conversions per parameter and step on the CPU
        device = self.params[0].device if self.params else None
        self._counts = torch.zeros(len(self.params), dtype=torch.float32, device=device)
        self.steps = list(self._counts.unbind())
        self._compiled: _kernels.AdamState | None = None
        self._compiled_key = None  # the storage of the parameters and copies it was built for

    def _compiled_ready(self, grads: list[torch.Tensor | None]) -> bool:
        """Whether this step runs in the compiled kernel (every parameter with a gradient).

        Its state is built again when a parameter's storage moved (``module.to``, ``p.data =``).
        """
        if not _kernels.available() or not all(
            g is not None and g.dtype == torch.float32 and g.is_contiguous() for g in grads
        ):
            return False
        copies = self.bf16_copies
        key = (tuple(p.data_ptr() for p in self.params), copies and copies.generation)
        if self._compiled_key != key:
            self._compiled_key = key
            self._compiled = _kernels.AdamState.build(
                self.params,
                self.exp_avg,
                self.exp_avg_sq,
                self.steps,
                None if copies is None else [copies.of(p) for p in self.params],
            )
        return self._compiled is not None

    @torch.no_grad()
    def step(self) -> torch.Tensor:
        """Update every parameter that has a gradient, unless a gradient is not finite.

        Returns a 0-d float tensor on the parameters' device: 1.0 when the step was skipped.
        """
        grads = [p.grad for p in self.params]
        if self._compiled_ready(grads):
            skipped = self._compiled.step(
                grads, lr=self.lr, betas=self.betas, eps=self.eps, wd=self.weight_decay
            )
            return torch.tensor(float(skipped))
        live = [i for i, g in enumerate(grads) if g is not None]
        if not live:
            return torch.zeros((), device=self.params[0].device if self.params else None)
        if self.bf16_copies is not None:  # torch's fused update leaves the versions as they were
            self.bf16_copies.invalidate()
        params = [self.params[i] for i in live]
        grads = [grads[i] for i in live]
        exp_avg = [self.exp_avg[i] for i in live]
        exp_avg_sq = [self.exp_avg_sq[i] for i in live]
        steps = [self.steps[i] for i in live]
        skip = _nonfinite(grads)
        if len(live) == len(self.params):
            self._counts.add_(1.0).sub_(skip)  # a skipped step does not count
        else:
            torch._foreach_add_(steps, 1.0)
            torch._foreach_sub_(steps, skip)
        beta1, beta2 = self.betas
        fused = getattr(torch, "_fused_adam_", None)
        if fused is not None and params[0].device.type in ("cpu", "cuda"):
            try:
                fused(
                    params, grads, exp_avg, exp_avg_sq, [], steps,
                    lr=self.lr, beta1=beta1, beta2=beta2, weight_decay=self.weight_decay,
                    eps=self.eps, amsgrad=False, maximize=False, found_inf=skip,
                )  # fmt: skip
                return skip
            except (RuntimeError, NotImplementedError):  # no fused kernel for this device
                pass
        if not skip:  # the fallback reads the flag on the host
            self._foreach_step(params, grads, exp_avg, exp_avg_sq, steps)
        return skip

    def _foreach_step(self, params, grads, exp_avg, exp_avg_sq, steps) -> None:
        beta1, beta2 = self.betas
        if self.weight_decay:
            grads = torch._foreach_add(grads, params, alpha=self.weight_decay)
        torch._foreach_lerp_(exp_avg, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sq, beta2)
        torch._foreach_addcmul_(exp_avg_sq, grads, grads, 1 - beta2)
        for p, m, v, t in zip(params, exp_avg, exp_avg_sq, steps):
            step = float(t)
            bias1, bias2 = 1 - beta1**step, 1 - beta2**step
            denom = (v.sqrt() / math.sqrt(bias2)).add_(self.eps)
            p.addcdiv_(m, denom, value=-self.lr / bias1)


def _nonfinite(tensors: list[torch.Tensor]) -> torch.Tensor:
    """0-d float tensor, 1.0 when any of ``tensors`` holds an inf or a NaN (no host sync)."""
    found = torch.zeros((), device=tensors[0].device)
    try:  # one fused pass (AMP's check, unscaling by 1 leaves the values unchanged)
        torch._amp_foreach_non_finite_check_and_unscale_(tensors, found, torch.ones_like(found))
    except (RuntimeError, NotImplementedError):  # no kernel for this device or dtype
        found = (~torch.stack(torch._foreach_norm(tensors)).isfinite().all()).float()
    return found


class Plateau:
    """Multiply the learning rate by ``factor`` after ``patience`` epochs without improvement.

    The rule of ``torch.optim.lr_scheduler.ReduceLROnPlateau(mode="min", threshold=0)``: an epoch
    improves when the monitored value is below the best so far; after more than ``patience``
    epochs without improvement the rate is reduced (not below ``min_lr``, and never raised: a
    ``min_lr`` above the rate leaves it as it is) and the count restarts.
    """

    def __init__(self, factor: float, patience: int, min_lr: float = 0.0):
        self.factor, self.patience, self.min_lr = factor, patience, min_lr
        self.best, self.bad_epochs = math.inf, 0

    def step(self, value: float, lr: float) -> float:
        """Record one epoch's monitored value; return the learning rate for the next epoch."""
        if value < self.best:
            self.best, self.bad_epochs = value, 0
            return lr
        self.bad_epochs += 1
        if self.bad_epochs > self.patience:
            self.bad_epochs = 0
            return min(lr, max(lr * self.factor, self.min_lr))
        return lr


def _epoch_means(rows: list[list[float]], sizes: list[int]) -> tuple[float, list[float], int]:
    """An epoch's loss and term means per cell over its applied steps, and the skipped count.

    One row per step: whether it was skipped, its loss (a mean over its cells) and its terms'
    sums over its cells; ``sizes`` the steps' cells. A skipped step (non-finite gradients)
    changed no weight, so its values, often NaN, are left out; with every step skipped the loss
    is NaN.
    """
    kept_cells, n_skipped, loss, totals = 0, 0, 0.0, [0.0] * (len(rows[0]) - 2)
    for (skip, step_loss, *values), n in zip(rows, sizes, strict=True):
        if skip:
            n_skipped += 1
            continue
        kept_cells += n
        loss += step_loss * n
        totals = [t + v for t, v in zip(totals, values, strict=True)]
    if not kept_cells:
        return math.nan, [math.nan] * len(totals), n_skipped
    return loss / kept_cells, [t / kept_cells for t in totals], n_skipped


def _keep_freed_memory_in_heap() -> None:
    """Let glibc's malloc keep a training step's freed temporaries for the next step.

    glibc returns memory at the top of its heap to the kernel once more than its trim threshold is
    free there: 128 kB to start, raised to twice the size of a block when a block it had given
    its own mapping (any above the mmap threshold) is freed (mallopt(3), "dynamic mmap
    threshold"). A training step allocates and frees dozens of ~1 MB temporaries; unless the
    process happened to free a large block before, the heap shrinks after each step and the next
    one takes a page fault for every 4 kB page it touches again: 250-1,200 faults per SCVI step
    at 128 cells x 2,000 genes, ~2 us each on a 2-core VM, 10-15% of the step. Allocating and
    freeing one untouched 16 MB block raises the thresholds to 16 / 32 MB, as in any process that
    once freed an array that size. No page of the block is touched, so the peak memory is
    unchanged; up to 32 MB freed at the top of the heap stay with the process until the next
    trim (:func:`_heap_trimmer`, every 100 steps). Other allocators ignore it.
    """
    del_me = torch.empty(16 << 20, dtype=torch.uint8)
    del del_me


# Steps between two returns of the heap's free pages to the kernel (_heap_trimmer).
_TRIM_EVERY = 100


def _heap_trimmer() -> Callable[[], object] | None:
    """The C library's ``malloc_trim(0)`` (glibc): the heap's free pages go back to the kernel.

    The training loop calls it after its first step and then every ``_TRIM_EVERY`` steps. Steps
    free their temporaries in a different order each time (the minibatches' sizes differ), so
    the heap fragments and its resident free pages grow: SCVI at 100k cells peaked 45-47 MB
    above the data after an epoch, with 20-24 MB of the heap free. With the trims the peak was
    37-39 MB. About half of the difference is free heap that training's own steps left, and
    half is free heap left before ``train()`` began (reading the data), which the first trim
    returns. One call takes ~2 ms, 20 µs a step. None where the C library has no
    ``malloc_trim`` (not glibc).
    """
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError, TypeError):  # not glibc; Windows takes no None
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return lambda: trim(0)


def check_not_inference_mode() -> None:
    """Refuse training inside ``torch.inference_mode()``: its tensors take no part in autograd."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "Training cannot run inside torch.inference_mode(): call train() outside that block."
        )


def train_module(
    module: nn.Module,
    data: TensorData,
    train_idx: torch.Tensor,
    val_idx: torch.Tensor,
    config: TrainConfig,
    history: dict[str, list] | None = None,
) -> dict[str, list]:
    """Fit ``module`` on ``data[train_idx]``; return the per-epoch history (appended to).

    A step whose gradients are not finite is skipped (:class:`Adam`). An epoch with such steps
    warns and leaves them out of its averages: an outlier minibatch early in training (totalVI
    on the benchmark's 2,000-gene ECCITE-seq subset, 1 seed in 20) costs one step, not the
    run. An epoch whose loss is not finite, or in which more than half of the steps were
    skipped, raises :class:`TrainingError`.

    The history has one entry per epoch for ``train_*`` (averages over the epoch's minibatches)
    and ``validation_*`` (a full pass in eval mode), where ``*`` is ``elbo`` (negative ELBO per
    cell), ``reconstruction`` and ``kl_local``, plus ``train_loss`` (with the KL weight of the
    epoch), ``kl_weight`` and ``lr``; modules that report more terms (TOTALVI's protein
    reconstruction and background KL) get ``train_*`` and ``validation_*`` entries for them too.

    With ``config.precision`` ``"bf16-mixed"`` (``"auto"`` on a CPU with bfloat16 instructions)
    the training steps' and validation's forward passes run inside
    :func:`cellvae.nn.bf16_products`: the decoders' hidden-to-genes products take bfloat16
    operands (Lightning's bf16-mixed validates under autocast too). Every getter runs in float32.
    """
    config.validate()
    check_not_inference_mode()
    device = resolve_device(config.device)
    precision = resolve_precision(config.precision, device)
    logger.info("Training in %s precision.", precision)
    bf16 = precision == "bf16-mixed"
    _keep_freed_memory_in_heap()
    trim = _heap_trimmer() if device.type == "cpu" else None
    history = history if history is not None else {}
    module.to(device)
    data = data.to(device)
    train_idx, val_idx = train_idx.cpu(), val_idx.to(device)
    gen = seeded_generator(config.seed)  # the minibatch order
    # data.batches yields this many minibatches per epoch, counts in memory or on disk
    steps_per_epoch = len(BatchSampler(train_idx, config.batch_size, shuffle=True))
    if config.n_epochs_kl_warmup is not None:
        warmup_steps = config.n_epochs_kl_warmup * steps_per_epoch
    elif config.kl_warmup_fraction:
        warmup_steps = math.ceil(config.kl_warmup_fraction * config.max_epochs * steps_per_epoch)
    else:
        warmup_steps = 0

    params = [p for p in module.parameters() if p.requires_grad]
    # a module's forward and backward with hand-written gradients, where it has one (float32)
    fused = None if bf16 else getattr(module, "training_step", None)
    module.zero_grad()  # gradients are freed after each step; the first step starts clean too
    # the bfloat16 products' weights, cast in the optimiser's update instead of each forward pass
    copies = BF16WeightCopies() if bf16 else None
    optimizer = Adam(
        params, lr=config.lr, weight_decay=config.weight_decay, eps=config.eps, bf16_copies=copies
    )
    plateau = (
        Plateau(config.lr_factor, config.lr_patience, config.lr_min)
        if config.reduce_lr_on_plateau
        else None
    )

    monitor_key = "validation_elbo" if len(val_idx) else "train_elbo"
    if not len(val_idx) and (config.early_stopping or config.reduce_lr_on_plateau):
        warn_user(
            "No validation cells (validation_size is 0 or rounds to 0 cells): early stopping "
            "and the learning-rate schedule monitor the training ELBO instead."
        )
    warned_validation = False
    best, bad_epochs = math.inf, 0
    # non-finite steps are skipped (Adam.step), so the weights need no copy; the batch-norm
    # statistics, updated by the forward pass itself, are restored from the last good epoch
    # (one foreach copy an epoch: walking named_buffers() and copying one by one took ~55 us)
    buffers = list(module.buffers())
    last_good_buffers = [b.detach().clone() for b in buffers]
    step = 0
    devices = [device.index or 0] if device.type == "cuda" else []
    using_copies = contextlib.nullcontext() if copies is None else copies.active()
    # gradients on, also inside the user's torch.no_grad() block
    with torch.random.fork_rng(devices=devices), using_copies, torch.enable_grad():
        if config.seed is not None:
            torch.manual_seed(int(config.seed))
        bar = tqdm(
            range(config.max_epochs),
            desc="Training",
            unit="epoch",
            disable=not config.progress_bar,
            dynamic_ncols=True,
        )
        set_mode = _Mode(module)
        for epoch in bar:
            set_mode(True)
            # one row per step (skipped, loss, term sums), read back once at the end of the
            # epoch (one host sync on a GPU)
            table, sizes, names = None, [], ()
            kl_weight = _kl_weight(step, warmup_steps)
            for batch in data.batches(train_idx, config.batch_size, shuffle=True, generator=gen):
                kl_weight = _kl_weight(step, warmup_steps)
                out = None if fused is None else fused(batch, kl_weight)
                if out is None:  # not covered by the module's hand-written step
                    with bf16_products(bf16):
                        out = module(batch, kl_weight=kl_weight)
                    out.loss.backward()
                if config.gradient_clip_val:
                    nn.utils.clip_grad_norm_(params, config.gradient_clip_val)
                skipped = optimizer.step()  # 1.0 when a gradient was not finite
                for p in params:  # freed before the next forward pass (module.zero_grad()
                    p.grad = None  # walks the module tree: ~50 µs a step)
                step += 1
                if trim is not None and step % _TRIM_EVERY == 1:
                    trim()
                if table is None:  # skipped, loss, then the terms' sums
                    names, table = _term_table(out, steps_per_epoch, lead=2)
                row = table[len(sizes)]
                torch.stack([skipped.to(row.device), out.loss.detach()], out=row[:2])
                _term_sums(out, row[2:])
                sizes.append(len(batch["batch"]))
            loss, means, n_skipped = _epoch_means(table[: len(sizes)].tolist(), sizes)
            if 2 * n_skipped > steps_per_epoch or not math.isfinite(loss):
                if buffers:
                    torch._foreach_copy_(buffers, last_good_buffers)
                raise TrainingError(
                    f"Training diverged in epoch {epoch + 1}: the loss was {loss:.4g} and "
                    f"{n_skipped} of {steps_per_epoch} steps had non-finite gradients. Those "
                    "steps were skipped, so the weights stay finite; the batch-norm statistics of "
                    "the last good epoch were restored. Try a lower lr, gradient_clip_val=1.0, or "
                    "check the data for extreme values."
                )
            if n_skipped:
                warn_user(
                    f"Epoch {epoch + 1}: {n_skipped} of {steps_per_epoch} training steps had "
                    "non-finite gradients and were skipped (the weights are unchanged by them; "
                    "the epoch's averages leave them out).",
                    RuntimeWarning,
                )
            done = len(history.get("epoch", ()))  # epochs recorded so far, by any train() call
            record = {
                "epoch": done,
                "train_loss": loss,
                **{f"train_{k}": v for k, v in _with_elbo(names, means).items()},
                "kl_weight": kl_weight,
                "lr": optimizer.lr,
            }
            if len(val_idx):  # in the training precision, as under Lightning's bf16-mixed
                with bf16_products(bf16):
                    val = evaluate(module, data, val_idx, config.eval_batch_size, set_mode)
                record.update({f"validation_{k}": v for k, v in val.items()})
                if not math.isfinite(val["elbo"]) and not warned_validation:
                    warned_validation = True
                    warn_user(
                        f"Epoch {epoch + 1}: the validation ELBO is {val['elbo']:.4g}, not "
                        "finite, while training goes on; the model may be diverging on these "
                        "cells. Try a lower lr or gradient_clip_val=1.0.",
                        RuntimeWarning,
                    )
            # every column keeps one entry per epoch, NaN where an epoch has no value (e.g. a
            # second train() call with another validation_size)
            for k in [*record, *(k for k in history if k not in record)]:
                history.setdefault(k, [math.nan] * done).append(record.get(k, math.nan))
            monitored = record[monitor_key]
            if buffers:
                torch._foreach_copy_(last_good_buffers, buffers)
            bar.set_postfix(
                {
                    k.replace("validation_", "val_"): f"{record[k]:.4g}"
                    for k in ("train_loss", monitor_key)
                }
            )
            if plateau is not None:
                optimizer.lr = plateau.step(monitored, optimizer.lr)
            if monitored < best - config.early_stopping_min_delta:
                best, bad_epochs = monitored, 0
            else:
                bad_epochs += 1
            if config.early_stopping and bad_epochs >= config.early_stopping_patience:
                logger.info(
                    "Early stopping at epoch %d: %s did not improve for %d epochs (best %.4f).",
                    epoch + 1,
                    monitor_key,
                    bad_epochs,
                    best,
                )
                break
        bar.close()
    return history
