"""Run every benchmark, then print one cellvae / scvi-tools table and draw the plots.

    make bench                                        # full suite (.venv/bin/python run_all.py)
    .venv/bin/python benchmarks/run_all.py --quick    # smoke run on tiny data, minutes
    .venv/bin/python benchmarks/run_all.py --with-1m [--scvi-1m]   # + 1M cells, memory + backed
    .venv/bin/python benchmarks/run_all.py --report-only   # table + plots from existing CSVs

Each benchmark script runs as its own process and writes its CSV; this script then reads the
CSVs, prints the summary (ratios are cellvae / scvi-tools; the "better" column says which
direction is good) and writes ``summary.csv``, ``run_info.json``, ``throughput.png``,
``memory.png`` and ``scib.png`` next to them (``benchmarks/results/``, or
``benchmarks/results/quick/`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _common import (
    BENCH_DIR,
    THREADS,
    fmt,
    machine_info,
    print_table,
    ratio,
    read_csv,
    results_dir,
    thread_env,
    tool_versions,
    write_csv,
)

TOOLS = ("cellvae", "scvi-tools")
COLORS = {"cellvae": "#1f77b4", "scvi-tools": "#ff7f0e"}


def run(script: str, args: list[str], threads: int) -> int:
    cmd = [sys.executable, str(BENCH_DIR / script), *args]
    print(f"\n$ {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    rc = subprocess.call(cmd, env=thread_env(threads), cwd=BENCH_DIR.parent)
    print(f"({script} finished with code {rc} in {time.perf_counter() - t0:.0f} s)", flush=True)
    return rc


# --------------------------------------------------------------------------- summary rows
def _pair(rows, key, **match):
    """{tool: value} of ``key`` for the rows matching ``match`` (status ok only).

    A tool that ran more than once (``--repeats``) gets the median of its runs.
    """
    runs: dict[str, list] = {}
    for r in rows:
        if all(str(r.get(k)) == str(v) for k, v in match.items()) and r.get("status") == "ok":
            runs.setdefault(r["tool"], []).append(r.get(key))
    return {t: v[0] if len(v) == 1 else statistics.median(map(float, v)) for t, v in runs.items()}


def _spread(rows, key) -> str:
    """With repeated runs: how many, and the range of the cellvae / scvi-tools ratio per run."""
    by_rep: dict[Any, dict[str, float]] = {}
    for r in rows:
        if r.get("status") == "ok":
            by_rep.setdefault(r.get("repeat"), {})[r["tool"]] = r.get(key)
    ratios = [ratio(v.get("cellvae"), v.get("scvi-tools")) for v in by_rep.values()]
    ratios = [x for x in ratios if not math.isnan(x)]
    if len(ratios) < 2:
        return ""
    return (
        f"median of {len(ratios)} interleaved runs per tool; "
        f"ratio per run {min(ratios):.2f}-{max(ratios):.2f}"
    )


def _row(metric, dataset, values, better, unit=""):
    cv, st = values.get("cellvae", math.nan), values.get("scvi-tools", math.nan)
    return {
        "metric": metric,
        "dataset": dataset,
        "cellvae": cv,
        "scvi-tools": st,
        "cellvae / scvi-tools": ratio(cv, st),
        "better": better,
        "unit": unit,
    }


def _datasets(rows):
    seen = []
    for r in rows:
        if r.get("dataset") not in seen and isinstance(r.get("dataset"), str):
            seen.append(r["dataset"])
    return seen


def summarise(out_dir: Path) -> list[dict]:
    rows: list[dict] = []
    train = read_csv(out_dir / "scvi_train.csv")
    for d in _datasets(train):
        sub = [r for r in train if r["dataset"] == d]
        n = next((r.get("n_obs") for r in sub if r.get("status") == "ok"), "")
        label = f"{d} ({fmt(n)} cells)" if n != "" else d
        speed = _pair(sub, "cells_per_s_steady")
        one_epoch = all(math.isnan(v) for v in speed.values())
        if one_epoch:  # a single epoch has no steady state: all steps, epoch 1 included
            speed = _pair(sub, "cells_per_s_all")
        rows.append(_row("SCVI train throughput", label, speed, "higher", "cells/s"))
        spread = _spread(sub, "cells_per_s_all" if one_epoch else "cells_per_s_steady")
        if one_epoch:
            spread = "; ".join(filter(None, ["one epoch (first-epoch costs included)", spread]))
        rows[-1]["note"] = spread
        rows.append(
            _row(
                "SCVI train peak RSS above data", label, _pair(sub, "peak_delta_mb"), "lower", "MB"
            )
        )
        if isinstance(n, int) and n >= 1_000_000:  # the 1M target is about the whole process
            peak = _pair(sub, "ru_maxrss_mb")
            rows.append(_row("SCVI train process peak RSS", label, peak, "lower", "MB"))
        skipped = [r for r in sub if r.get("status") != "ok"]
        for r in skipped:
            rows[-1]["note"] = f"{r['tool']}: {r.get('status')} {r.get('error', '')}"[:120]
    infer = read_csv(out_dir / "scvi_inference.csv")
    for d in _datasets(infer):
        for task, name in (("latent", "latent"), ("normalized", "normalized expression")):
            sub = [r for r in infer if r["dataset"] == d and r["task"] == task]
            if not sub:
                continue
            rows.append(
                _row(f"SCVI {name} throughput", d, _pair(sub, "cells_per_s"), "higher", "cells/s")
                | {"note": _spread(sub, "cells_per_s")}
            )
            rows.append(
                _row(
                    f"SCVI {name} peak RSS above data",
                    d,
                    _pair(sub, "peak_delta_mb"),
                    "lower",
                    "MB",
                )
            )
    floor = {r["key"]: r for r in read_csv(out_dir / "floor.csv")}
    steps = (
        ("module only, no data loading", "step", "float32"),
        ("module only, bf16-mixed", "step16", "cellvae: bf16 products; scvi-tools: autocast"),
        ("ceiling", "ceiling", "float32 matrix products + Adam alone (bench_floor.py)"),
    )
    label = f"sim ({fmt(next(iter(floor.values()))['n_obs'])} cells)" if floor else ""
    for what, key, note in steps:
        ms = {t: floor[f"{key}_{t}"]["ms_per_step"] for t in TOOLS if f"{key}_{t}" in floor}
        if ms:
            row = _row(f"SCVI training step, {what}", label, ms, "lower", "ms / 128 cells")
            if note:
                row["note"] = note
            rows.append(row)
    quality = read_csv(out_dir / "scvi_quality.csv")
    for d in _datasets(quality):
        for warm in ("matched", "default"):
            sub = [r for r in quality if r["dataset"] == d and r.get("kl_warmup") == warm]
            if not sub:
                continue
            ep = sub[0].get("epochs")
            tag = f"{d}, {fmt(ep)} ep, {warm} warm-up"
            rows.append(
                _row("SCVI held-out -ELBO / cell", tag, _pair(sub, "heldout_neg_elbo"), "lower")
            )
            rows.append(
                _row(
                    "SCVI held-out reconstruction / cell",
                    tag,
                    _pair(sub, "heldout_reconstruction"),
                    "lower",
                )
            )
    scib = read_csv(out_dir / "scvi_scib.csv")
    for metric in ("Total", "Batch correction", "Bio conservation"):
        for warm in ("matched", "default"):
            vals = {}
            for r in scib:
                emb = str(r.get("embedding", ""))
                if r.get("metric") == metric and f"({warm} warm-up)" in emb:
                    vals[emb.split(" (")[0]] = r.get("value")
            if vals:
                d = scib[0].get("dataset", "")
                rows.append(_row(f"scib {metric}", f"{d}, {warm} warm-up", vals, "higher"))
    # quality_seeds.py: mean over seeds, same warm-up for both tools
    seeds = read_csv(out_dir / "scvi_quality_seeds.csv")
    for figure in ("scib Total", "held-out -ELBO / cell"):
        sub = [r for r in seeds if r["figure"] == figure and "(matched warm-up)" in r["embedding"]]
        vals = {r["embedding"].split(" (")[0]: r["mean"] for r in sub}
        if len(vals) == 2:
            n = min(int(r["n_seeds"]) for r in sub)
            sds = ", ".join(f"{r['embedding'].split(' (')[0]} sd {r['sd']:.3g}" for r in sub)
            better = "higher" if figure.startswith("scib") else "lower"
            row = _row(f"{figure} (mean of {n} seeds)", "sim10k, matched warm-up", vals, better)
            rows.append(row | {"note": f"quality_seeds.py; {sds}"})
    loader = read_csv(out_dir / "dataloader.csv")
    if loader:
        vals = {}
        key = next(
            (
                k
                for k in ("median_ms_per_batch", "ms_per_batch", "best_ms_per_batch")
                if k in loader[0]
            ),
            None,
        )
        ours = [r for r in loader if str(r["loader"]).startswith("cellvae")]
        theirs = [r for r in loader if not str(r["loader"]).startswith("cellvae")]
        for r in ours:
            vals = {"cellvae": r.get(key, math.nan) if key else math.nan}
            if theirs:
                vals["scvi-tools"] = theirs[0].get(key, math.nan) if key else math.nan
            kind = str(r["loader"]).partition(" ")[2] or "cellvae"
            rows.append(
                _row(
                    f"minibatch fetch time, {kind}",
                    f"{fmt(loader[0].get('n_obs'))} cells",
                    vals,
                    "lower",
                    "ms/batch",
                )
            )
    tv = read_csv(out_dir / "totalvi.csv")
    for d in _datasets(tv):
        sub = [r for r in tv if r["dataset"] == d]
        rows.append(
            _row(
                "TOTALVI train throughput", d, _pair(sub, "cells_per_s_steady"), "higher", "cells/s"
            )
            | {"note": _spread(sub, "cells_per_s_steady")}
        )
        rows.append(
            _row("TOTALVI train peak RSS above data", d, _pair(sub, "peak_delta_mb"), "lower", "MB")
        )
        for warm in ("matched", "default"):
            s2 = [r for r in sub if r.get("kl_warmup") == warm]
            if s2:
                tag = f"{d}, {fmt(s2[0].get('epochs'))} ep, {warm} warm-up"
                rows.append(
                    _row(
                        "TOTALVI held-out -ELBO / cell", tag, _pair(s2, "heldout_neg_elbo"), "lower"
                    )
                )
    if any(r.get("status") == "skipped" for r in tv):
        rows.append(
            {"metric": "TOTALVI", "dataset": "-", "note": "skipped: " + str(tv[0].get("error"))}
        )
    # cellvae only: SCVI from a backed h5ad (counts on disk) vs the same file in memory
    for r in read_csv(out_dir / "backed.csv"):
        if r.get("task") == "train" and r.get("status") == "ok":
            where = f"{r['dataset']}, {r['mode']}"
            for metric, key, better, unit in (
                ("SCVI train throughput", "cells_per_s", "higher", "cells/s"),
                ("SCVI train process peak RSS", "ru_maxrss_mb", "lower", "MB"),
            ):
                row = _row(metric, where, {"cellvae": float(r[key])}, better, unit)
                rows.append({**row, "note": "cellvae only (bench_backed.py)"})
    return rows + gpu_rows(out_dir / "gpu")


def gpu_rows(gpu_dir: Path) -> list[dict]:
    """Rows of the runs on a GPU (``run_gpu.sh`` writes ``gpu/``), each labelled with the GPU.

    Every ``scvi_train*.csv`` there (one per run: the 100k / Kang stage, the 1M one per tool,
    reruns) gives training throughput and GPU utilisation; inference and TOTALVI likewise.
    """
    rows: list[dict] = []
    tagged = [(p.stem, r) for p in sorted(gpu_dir.glob("scvi_train*.csv")) for r in read_csv(p)]
    for d in _datasets([r for _, r in tagged]):
        for stem in dict.fromkeys(t for t, r in tagged if r["dataset"] == d):
            sub = [r for t, r in tagged if t == stem and r["dataset"] == d]
            if "_1m_" in stem:  # the 1M stage runs each tool alone: pair both files
                sub = [r for t, r in tagged if "_1m_" in t and r["dataset"] == d]
                if stem.endswith("scvi-tools"):
                    continue
            where = f"{d}, {_gpu_of(sub)}" + (", rerun" if "after" in stem else "")
            speed = _pair(sub, "cells_per_s_steady")
            note = "epochs 2..E"
            if all(math.isnan(v) for v in speed.values()):
                speed, note = _pair(sub, "cells_per_s_all"), "one epoch, validation included"
            rows.append(_row("SCVI train throughput (GPU)", where, speed, "higher", "cells/s"))
            rows[-1]["note"] = f"{note}; {stem}.csv"
            rows.append(_row("GPU utilisation", where, _pair(sub, "gpu_util_mean"), "-", "%"))
    infer = read_csv(gpu_dir / "scvi_inference.csv")
    for d in _datasets(infer):
        for task in ("latent", "normalized"):
            sub = [r for r in infer if r["dataset"] == d and r["task"] == task]
            values = _pair(sub, "cells_per_s")
            label = f"{d}, {_gpu_of(sub)}"
            rows.append(_row(f"SCVI {task} throughput (GPU)", label, values, "higher", "cells/s"))
    tv = read_csv(gpu_dir / "totalvi.csv")
    for d in _datasets(tv):
        sub = [r for r in tv if r["dataset"] == d]
        speed = _pair(sub, "cells_per_s_steady")
        label = f"{d}, {_gpu_of(sub)}"
        rows.append(_row("TOTALVI train throughput (GPU)", label, speed, "higher", "cells/s"))
    return rows


def _gpu_of(rows) -> str:
    names = {str(r.get("gpu")) for r in rows if r.get("gpu")}
    return " / ".join(sorted(names)) or "GPU"


# --------------------------------------------------------------------------- plots
def _bars(ax, groups, values, log=False, ylabel=""):
    import numpy as np

    x = np.arange(len(groups))
    width = 0.38
    for i, tool in enumerate(TOOLS):
        vals = [values[g].get(tool, math.nan) for g in groups]
        bars = ax.bar(x + (i - 0.5) * width, vals, width, label=tool, color=COLORS[tool])
        for b, v in zip(bars, vals):
            if isinstance(v, float) and math.isnan(v):
                ax.annotate("n/a", (b.get_x() + width / 2, 0), ha="center", va="bottom", fontsize=7)
    for j, g in enumerate(groups):
        r = ratio(values[g].get("cellvae"), values[g].get("scvi-tools"))
        if not math.isnan(r):
            top = max(
                v for v in values[g].values() if isinstance(v, int | float) and not math.isnan(v)
            )
            ax.annotate(
                f"{r:.2g}x",
                (x[j], top),
                ha="center",
                va="bottom",
                fontsize=8,
                xytext=(0, 3),
                textcoords="offset points",
            )
    ax.set_xticks(x)
    ax.set_xticklabels(groups, rotation=20, ha="right", fontsize=8)
    if log:
        ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    ax.margins(y=0.15)


def _groups(out_dir: Path, key_train: str, key_infer: str):
    """{bar group: {tool: value}}; repeated runs give the median, as in the table."""
    runs: dict[str, tuple[str, list[dict]]] = {}  # group -> (key, rows)
    for r in read_csv(out_dir / "scvi_train.csv"):
        runs.setdefault(f"SCVI train\n{r['dataset']}", (key_train, []))[1].append(r)
    for r in read_csv(out_dir / "scvi_inference.csv"):
        runs.setdefault(f"SCVI {r['task']}\n{r['dataset']}", (key_infer, []))[1].append(r)
    for r in read_csv(out_dir / "totalvi.csv"):
        if r.get("kl_warmup") == "matched":
            runs.setdefault(f"TOTALVI train\n{r['dataset']}", (key_train, []))[1].append(r)
    groups = {}
    for g, (key, rows) in runs.items():
        values = _pair(rows, key)
        if values and all(math.isnan(v) for v in values.values()) and "steady" in key:
            values = _pair(rows, "cells_per_s_all")  # one epoch: no steady state (as the table)
        if values:
            groups[g] = values
    return groups


def plot(out_dir: Path, title_note: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for name, ktrain, kinfer, ylabel, log in (
        ("throughput", "cells_per_s_steady", "cells_per_s", "cells per second (log)", True),
        ("memory", "peak_delta_mb", "peak_delta_mb", "peak RSS above loaded data (MB)", False),
    ):
        groups = _groups(out_dir, ktrain, kinfer)
        if not groups:
            continue
        fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(groups) + 2), 4.5))
        _bars(ax, list(groups), groups, log=log, ylabel=ylabel)
        what = "higher is better" if name == "throughput" else "lower is better"
        ax.set_title(
            f"cellvae vs scvi-tools: {name} ({what}; label = cellvae / scvi-tools)\n{title_note}",
            fontsize=9,
        )
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    scib = [
        r for r in read_csv(out_dir / "scvi_scib.csv") if isinstance(r.get("value"), float | int)
    ]
    if scib:
        import numpy as np

        metrics = list(dict.fromkeys(r["metric"] for r in scib))
        embs = list(dict.fromkeys(r["embedding"] for r in scib))
        fig, ax = plt.subplots(figsize=(max(7, 0.9 * len(metrics) + 3), 4.8))
        width = 0.8 / len(embs)
        x = np.arange(len(metrics))
        cmap = plt.get_cmap("tab10")
        for i, emb in enumerate(embs):
            vals = [
                next(
                    (r["value"] for r in scib if r["embedding"] == emb and r["metric"] == m), np.nan
                )
                for m in metrics
            ]
            color = "#7f7f7f" if emb.startswith("PCA") else cmap(i)
            if emb.startswith("cellvae"):
                color = COLORS["cellvae"] if "matched" in emb else "#aec7e8"
            elif emb.startswith("scvi-tools"):
                color = COLORS["scvi-tools"] if "matched" in emb else "#ffbb78"
            ax.bar(x + (i - (len(embs) - 1) / 2) * width, vals, width, label=emb, color=color)
        ax.set_xticks(x)
        ax.set_xticklabels(metrics, rotation=30, ha="right", fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("score (higher is better)")
        method = scib[0].get("method", "")
        ax.set_title(
            f"scib-metrics on {scib[0].get('dataset', '')} ({method})\n{title_note}", fontsize=9
        )
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        path = out_dir / "scib.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    for p in written:
        print(f"wrote {p}")
    return written


# --------------------------------------------------------------------------- main
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run on tiny data")
    parser.add_argument("--with-1m", action="store_true", help="add cellvae on 1M x 2,000 (18%%)")
    parser.add_argument("--scvi-1m", action="store_true", help="also try scvi-tools on 1M")
    parser.add_argument(
        "--with-shapes",
        action="store_true",
        help="add bench_shapes.py: both tools with one model option changed at a time (~35 min)",
    )
    parser.add_argument(
        "--skip",
        nargs="*",
        default=[],
        choices=["dataloader", "floor", "scvi", "totalvi", "marginal_ll"],
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="training and inference runs per tool, in alternating order (medians reported)",
    )
    parser.add_argument("--threads", type=int, default=THREADS)
    parser.add_argument("--report-only", action="store_true", help="only table + plots from CSVs")
    a = parser.parse_args()
    out_dir = results_dir(a.quick)
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    info = {"started": started, "quick": a.quick, **machine_info(), "versions": tool_versions()}
    codes = {}
    if not a.report_only:
        common = ["--threads", str(a.threads)] + (["--quick"] if a.quick else [])
        if "dataloader" not in a.skip:
            dl = ["--threads", str(a.threads), "--out", str(out_dir / "dataloader.csv")]
            if a.quick:
                dl += ["--n-obs", "5000", "--epochs", "1"]
            codes["dataloader"] = run("bench_dataloader.py", dl, a.threads)
        if "floor" not in a.skip:
            codes["floor"] = run("bench_floor.py", common, a.threads)
        repeats = ["--repeats", str(a.repeats)]
        if "scvi" not in a.skip:
            extra = (["--with-1m"] if a.with_1m else []) + (["--scvi-1m"] if a.scvi_1m else [])
            codes["scvi"] = run("bench_scvi.py", common + repeats + extra, a.threads)
        if "totalvi" not in a.skip:
            codes["totalvi"] = run("bench_totalvi.py", common + repeats, a.threads)
        if "marginal_ll" not in a.skip:
            codes["marginal_ll"] = run("bench_marginal_ll.py", common, a.threads)
        if a.with_shapes:
            codes["shapes"] = run("bench_shapes.py", common, a.threads)
        if a.with_1m and not a.quick:
            codes["backed"] = run("bench_backed.py", ["--in-memory"], a.threads)
        info["exit_codes"] = codes
        info["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
        info["load_avg_1min_end"] = machine_info().get("load_avg_1min")
        (out_dir / "run_info.json").write_text(json.dumps(info, indent=2) + "\n")
    rows = summarise(out_dir)
    print(f"\n{'=' * 30} cellvae vs scvi-tools ({'quick' if a.quick else 'full'} run) {'=' * 30}")
    print(f"torch threads {a.threads}; {info['processor']}, {info['cpu_count']} CPUs")
    print(f"versions: {info['versions']}")
    print_table(
        rows,
        [
            ("metric", "metric"), ("dataset", "data"), ("cellvae", "cellvae"),
            ("scvi-tools", "scvi-tools"), ("cellvae / scvi-tools", "ratio"),
            ("better", "better"), ("unit", "unit"), ("note", "note"),
        ],
    )  # fmt: skip
    write_csv(out_dir / "summary.csv", rows)
    note = f"{'quick smoke run' if a.quick else 'full run'}, torch threads {a.threads}, {started}"
    plot(out_dir, note)
    return 0 if all(c == 0 for c in codes.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
