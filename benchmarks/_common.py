"""Shared helpers of the benchmark scripts: threads, timing, peak memory, child processes, tables.

Every measurement runs in its own fresh Python process (``run_child``), so that peak RSS
belongs to that one (tool, dataset, task) and nothing else: no model, import or cache of an
earlier measurement is resident. Inside the child, ``Measure`` resets the kernel's peak-RSS
counter (``/proc/self/clear_refs``), records the current RSS as the baseline, runs the task and
reads the peak back (``VmHWM``); where the reset is not possible it polls RSS every 10 ms
instead. Both the absolute peak and the peak above the baseline are reported, plus
``ru_maxrss`` (the whole child's lifetime peak, data loading included).

This module imports neither cellvae nor scvi-tools, so that a child imports only its own tool.
"""

from __future__ import annotations

import csv
import gc
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
RESULTS = BENCH_DIR / "results"
QUICK_RESULTS = RESULTS / "quick"
THREADS = 2
SEED = 0
MB = 1024.0 * 1024.0


def results_dir(quick: bool) -> Path:
    """Where CSV / PNG go: ``results/`` for full runs, ``results/quick/`` for smoke runs."""
    path = QUICK_RESULTS if quick else RESULTS
    path.mkdir(parents=True, exist_ok=True)
    return path


# --------------------------------------------------------------------------- child set-up
def thread_env(threads: int = THREADS) -> dict[str, str]:
    """Environment of a child process: BLAS / OpenMP pools limited to ``threads``."""
    env = dict(os.environ)
    for key in (
        "OMP_NUM_THREADS",
        "MKL_NUM_THREADS",
        "OPENBLAS_NUM_THREADS",
        "NUMEXPR_NUM_THREADS",
        "VECLIB_MAXIMUM_THREADS",
    ):
        env[key] = str(threads)
    env["PYTHONWARNINGS"] = "ignore"
    env.setdefault("TQDM_DISABLE", "1")
    env.setdefault("MPLBACKEND", "Agg")
    # the children import helpers from this folder whatever their working directory
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(BENCH_DIR), env.get("PYTHONPATH")) if p)
    return env


def init_child(threads: int = THREADS) -> None:
    """Call first in a child: torch threads, quiet warnings and loggers."""
    import logging

    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set
        pass
    warnings.filterwarnings("ignore")
    for name in ("scvi", "lightning", "lightning.pytorch", "pytorch_lightning", "cellvae"):
        logging.getLogger(name).setLevel(logging.ERROR)


def machine_info() -> dict[str, Any]:
    """A short description of where the numbers come from."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": THREADS,
    }
    try:
        info["load_avg_1min"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    return info


# --------------------------------------------------------------------------- memory
def _proc_status_kb(field: str, pid: int | str = "self") -> float | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return float(line.split()[1])
    except OSError:
        return None
    return None


def current_rss_mb(pid: int | None = None) -> float:
    """Resident set size now (MiB) of this process or of ``pid``."""
    kb = _proc_status_kb("VmRSS", pid or "self")
    if kb is not None:
        return kb / 1024.0
    try:
        import psutil

        return psutil.Process(pid or os.getpid()).memory_info().rss / MB
    except Exception:
        return math.nan


def ru_maxrss_mb() -> float:
    """Lifetime peak RSS of this process (MiB), from getrusage."""
    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return value / MB if sys.platform == "darwin" else value / 1024.0


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process; False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return _proc_status_kb("VmHWM") is not None
    except OSError:
        return False


class Measure:
    """Context manager timing a block and recording its peak RSS.

    After the block: ``seconds``, ``baseline_mb`` (RSS at entry, after ``gc.collect``),
    ``peak_mb`` (absolute peak RSS during the block) and ``peak_delta_mb`` (peak − baseline),
    ``method`` (``"VmHWM"`` when the kernel counter could be reset, else ``"poll-10ms"``).
    """

    def __init__(self, poll_interval: float = 0.01):
        self.poll_interval = poll_interval
        self._stop = threading.Event()
        self._polled = 0.0
        self._thread: threading.Thread | None = None

    def _poll(self) -> None:
        while not self._stop.is_set():
            self._polled = max(self._polled, current_rss_mb())
            self._stop.wait(self.poll_interval)

    def __enter__(self) -> Measure:
        gc.collect()
        self.baseline_mb = current_rss_mb()
        self.method = "VmHWM" if _reset_peak() else "poll-10ms"
        if self.method != "VmHWM":
            self._polled = self.baseline_mb
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self._t0
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak_mb = max(self._polled, current_rss_mb())
        else:
            self.peak_mb = (_proc_status_kb("VmHWM") or math.nan) / 1024.0
        self.peak_delta_mb = self.peak_mb - self.baseline_mb

    def record(self, prefix: str = "") -> dict[str, Any]:
        """The measurement as a flat dict (keys prefixed with ``prefix``)."""
        return {
            f"{prefix}seconds": self.seconds,
            f"{prefix}baseline_mb": self.baseline_mb,
            f"{prefix}peak_mb": self.peak_mb,
            f"{prefix}peak_delta_mb": self.peak_delta_mb,
            f"{prefix}mem_method": self.method,
        }


# --------------------------------------------------------------------------- GPU
def precision_of(tool: str, model, options: dict, device: str) -> str:
    """The precision a trained model's last ``train()`` ran in (Lightning's names)."""
    if tool != "cellvae":
        return str(model.trainer.precision)
    from cellvae.train import resolve_device, resolve_precision

    return resolve_precision(options.get("precision", "auto"), resolve_device(device))


def accelerator_of(device: str) -> str:
    """scvi-tools' (Lightning's) ``accelerator`` for a torch device string."""
    return "gpu" if device.startswith("cuda") else "cpu"


class GpuMonitor:
    """GPU utilisation and memory while a block runs; does nothing for a CPU device.

    A thread reads NVML every ``interval`` seconds: utilisation (the percentage of the last
    sample period during which a kernel ran; NVML's own period, 1/6 s to 1 s) and the memory
    used on the device by all processes. At exit the block's work is synchronised and torch's
    peak allocated / reserved memory read. ``record(since=t)`` averages the utilisation over the
    samples taken after ``time.perf_counter() == t`` (e.g. the start of the second epoch), and
    over all samples. Without ``pynvml`` it falls back to ``nvidia-smi`` queries.
    """

    def __init__(self, device: str, interval: float = 0.1):
        self.active = device.startswith("cuda")
        self.interval = interval
        self.samples: list[tuple[float, float, float]] = []  # (t, util %, used MiB)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _reader(self) -> Callable[[], tuple[float, float]]:
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)

            def read() -> tuple[float, float]:
                util = pynvml.nvmlDeviceGetUtilizationRates(handle).gpu
                return float(util), pynvml.nvmlDeviceGetMemoryInfo(handle).used / MB

            return read
        except Exception:  # no pynvml: one nvidia-smi call per sample (~30 ms)

            def read() -> tuple[float, float]:
                out = subprocess.run(
                    [
                        "nvidia-smi",
                        "--query-gpu=utilization.gpu,memory.used",
                        "--format=csv,noheader,nounits",
                        "--id=0",
                    ],
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout
                util, used = out.strip().splitlines()[0].split(",")
                return float(util), float(used)

            return read

    def _poll(self, read: Callable[[], tuple[float, float]]) -> None:
        while not self._stop.is_set():
            try:
                util, used = read()
            except Exception:
                return
            self.samples.append((time.perf_counter(), util, used))
            self._stop.wait(self.interval)

    def __enter__(self) -> GpuMonitor:
        if self.active:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._thread = threading.Thread(target=self._poll, args=(self._reader(),), daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.active:
            import torch

            torch.cuda.synchronize()
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            self.peak_allocated_mb = torch.cuda.max_memory_allocated() / MB
            self.peak_reserved_mb = torch.cuda.max_memory_reserved() / MB
            self.name = torch.cuda.get_device_name()

    def record(self, since: float | None = None, prefix: str = "") -> dict[str, Any]:
        """The utilisation (mean %, all samples and those after ``since``) and peak memory."""
        if not self.active:
            return {}

        def mean_util(rows) -> float:
            return sum(r[1] for r in rows) / len(rows) if rows else math.nan

        later = [r for r in self.samples if since is not None and r[0] >= since]
        return {
            f"{prefix}gpu": self.name,
            f"{prefix}gpu_util_mean": mean_util(self.samples),
            f"{prefix}gpu_util_steady": mean_util(later),
            f"{prefix}gpu_samples": len(self.samples),
            f"{prefix}gpu_allocated_peak_mb": self.peak_allocated_mb,
            f"{prefix}gpu_reserved_peak_mb": self.peak_reserved_mb,
            f"{prefix}gpu_used_peak_mb": max((r[2] for r in self.samples), default=math.nan),
        }


# --------------------------------------------------------------------------- epoch timing
class EpochClock:
    """Timestamps of every training-mode forward call of the top-level module.

    Tool-neutral: a global forward pre-hook waits for the first call of a module of class
    ``module_cls`` (cellvae builds its module inside ``train``), then moves to a hook on that
    instance only, so the other modules pay nothing. Epoch boundaries follow from the number of
    training steps per epoch; ``summary`` gives the steady-state throughput over all epochs but
    the first (the warm-up epoch) and the first epoch's duration.
    """

    def __init__(self, module_cls: type):
        self.module_cls = module_cls
        self.times: list[float] = []
        self._handles: list[Any] = []
        self.end: float | None = None

    def _record(self, module, args) -> None:
        if module.training:
            self.times.append(time.perf_counter())

    def _global(self, module, args) -> None:
        if isinstance(module, self.module_cls) and self._global_handle is not None:
            self._record(module, args)
            self._handles.append(module.register_forward_pre_hook(self._record))
            self._global_handle.remove()
            self._global_handle = None

    def __enter__(self) -> EpochClock:
        from torch.nn.modules.module import register_module_forward_pre_hook

        self._global_handle = register_module_forward_pre_hook(self._global)
        return self

    def __exit__(self, *exc) -> None:
        self.end = time.perf_counter()
        if self._global_handle is not None:
            self._global_handle.remove()
            self._global_handle = None
        for h in self._handles:
            h.remove()

    def steady_start(self, n_epochs: int) -> float | None:
        """The time the second epoch began (None with one epoch or an uneven step count)."""
        if n_epochs < 2 or not self.times or len(self.times) % n_epochs:
            return None
        return self.times[len(self.times) // n_epochs]

    def summary(self, n_epochs: int, n_train_cells: int) -> dict[str, Any]:
        """Per-epoch figures; NaN where the step count does not split evenly into epochs."""
        out: dict[str, Any] = {
            "train_steps": len(self.times),
            "first_epoch_s": math.nan,
            "steady_epoch_s": math.nan,
            "cells_per_s_steady": math.nan,
        }
        if n_epochs < 1 or not self.times or len(self.times) % n_epochs or self.end is None:
            return out
        spe = len(self.times) // n_epochs
        out["steps_per_epoch"] = spe
        if n_epochs == 1:
            out["first_epoch_s"] = self.end - self.times[0]
            return out
        start2 = self.times[spe]
        out["first_epoch_s"] = start2 - self.times[0]
        steady = (self.end - start2) / (n_epochs - 1)
        out["steady_epoch_s"] = steady
        out["cells_per_s_steady"] = n_train_cells / steady
        return out


# --------------------------------------------------------------------------- child processes
def run_child(
    script: Path,
    args: Sequence[str],
    *,
    timeout_s: float = 3600.0,
    mem_limit_gb: float | None = None,
    threads: int = THREADS,
    label: str = "",
) -> dict[str, Any]:
    """Run ``python script --child-json OUT *args`` in a fresh process; return its JSON record.

    The parent watches the child: past ``timeout_s`` seconds or ``mem_limit_gb`` of RSS it is
    killed and the record says so (``status`` = ``"timeout"`` / ``"memory-limit"``); a crash
    gives ``status`` = ``"error"`` with the last lines of its stderr.
    """
    fd, out_path = tempfile.mkstemp(prefix="cvbench-", suffix=".json")
    os.close(fd)
    err_fd, err_path = tempfile.mkstemp(prefix="cvbench-", suffix=".log")
    workdir = tempfile.mkdtemp(prefix="cvbench-cwd-")  # lightning / scvi-tools may write logs
    cmd = [sys.executable, str(script), "--child-json", out_path, *map(str, args)]
    t0 = time.perf_counter()
    peak_rss = 0.0
    status = "ok"
    with os.fdopen(err_fd, "w") as err:
        proc = subprocess.Popen(
            cmd, stdout=err, stderr=subprocess.STDOUT, env=thread_env(threads), cwd=workdir
        )
        while True:
            try:
                proc.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                pass
            rss = current_rss_mb(proc.pid)
            if not math.isnan(rss):
                peak_rss = max(peak_rss, rss)
            if time.perf_counter() - t0 > timeout_s:
                status = "timeout"
            elif mem_limit_gb is not None and rss > mem_limit_gb * 1024:
                status = "memory-limit"
            if status != "ok":
                proc.kill()
                proc.wait()
                break
    wall = time.perf_counter() - t0
    record: dict[str, Any] = {}
    try:
        text = Path(out_path).read_text()
        if text.strip():
            record = json.loads(text)
    except (OSError, json.JSONDecodeError):
        record = {}
    log = Path(err_path).read_text(errors="replace")
    for p in (out_path, err_path):
        try:
            os.unlink(p)
        except OSError:
            pass
    shutil.rmtree(workdir, ignore_errors=True)
    if status == "ok" and proc.returncode != 0:
        status = "error"
    if status == "ok" and not record:
        status = "error"
    record.setdefault("status", status)
    if status != "ok":
        record["status"] = status
        tail = [ln for ln in log.strip().splitlines() if ln.strip()][-6:]
        record["error"] = " | ".join(tail)[-600:]
        if status == "timeout":
            record["error"] = f"killed after {timeout_s:.0f} s"
        elif status == "memory-limit":
            record["error"] = f"killed above {mem_limit_gb} GB RSS"
    record["child_wall_s"] = wall
    record["child_rss_polled_mb"] = peak_rss
    tag = f"[{label}] " if label else ""
    if record["status"] == "ok":
        print(f"  {tag}ok in {wall:.1f} s", flush=True)
    else:
        print(f"  {tag}{record['status']}: {record.get('error', '')}", flush=True)
    return record


def write_child_result(path: str, record: dict[str, Any]) -> None:
    """Child side: write the record (with ru_maxrss) as JSON for the parent."""
    record = dict(record)
    record.setdefault("status", "ok")
    record["ru_maxrss_mb"] = ru_maxrss_mb()
    Path(path).write_text(json.dumps(record, default=_json_default))


def _json_default(obj):
    try:
        import numpy as np

        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
    except ImportError:
        pass
    return str(obj)


# --------------------------------------------------------------------------- tables
def write_csv(path: Path, rows: Iterable[dict[str, Any]], columns: Sequence[str] | None = None):
    """Write dict rows (union of keys, first-seen order unless ``columns``) to ``path``."""
    rows = list(rows)
    if columns is None:
        columns = []
        for r in rows:
            for k in r:
                if k not in columns:
                    columns.append(k)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: _fmt_csv(r.get(k)) for k in columns})
    print(f"wrote {path}")


def _fmt_csv(v):
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return "" if v is None else v


def read_csv(path: Path) -> list[dict[str, Any]]:
    """Rows of a CSV written by ``write_csv`` with numbers parsed back."""
    if not path.exists():
        return []
    with open(path, newline="") as fh:
        return [{k: _parse(v) for k, v in r.items()} for r in csv.DictReader(fh)]


def _parse(v: str):
    if v == "":
        return math.nan
    try:
        f = float(v)
    except ValueError:
        return v
    return int(f) if f.is_integer() and "." not in v and "e" not in v.lower() else f


def fmt(v: Any, digits: int = 3) -> str:
    """Number for a console table: NaN as '-', big numbers with thousands separators."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, int | float):
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.{digits}g}"
    return str(v)


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """Print rows as an aligned text table; ``columns`` = (key, header). Returns the text."""
    cells = [[h for _, h in columns]] + [[fmt(r.get(k)) for k, _ in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = []
    for j, row in enumerate(cells):
        lines.append(
            "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
        )
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def ratio(a: Any, b: Any) -> float:
    """a / b, NaN when either is missing or b is 0."""
    try:
        a, b = float(a), float(b)
    except (TypeError, ValueError):
        return math.nan
    if math.isnan(a) or math.isnan(b) or b == 0:
        return math.nan
    return a / b


def interleaved(tools: Sequence[str], repeats: int) -> list[tuple[int, str]]:
    """``(repeat, tool)`` runs, the tool order reversed every other repeat (A B, B A, A B, …).

    This VM's speed drifts by ±20% over minutes; alternating the order gives each tool the same
    share of fast and slow moments, and the medians over repeats are what the summary reports.

    >>> interleaved(["a", "b"], 2)
    [(0, 'a'), (0, 'b'), (1, 'b'), (1, 'a')]
    """
    return [(r, t) for r in range(repeats) for t in (tools if r % 2 == 0 else tools[::-1])]


def tool_versions() -> dict[str, str]:
    """Versions of the packages involved (importlib.metadata, nothing imported)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("cellvae", "scvi-tools", "torch", "anndata", "scib-metrics", "jax"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def call_quietly(fn: Callable, *args, **kwargs):
    """Call ``fn`` with warnings silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)
