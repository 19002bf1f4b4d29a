"""SCVI training away from the default model: cellvae vs scvi-tools, one option at a time.

``bench_scvi.py`` measures the issue's default architecture (2,000 genes, 128 hidden, 10
latent, 1 layer, ZINB, per-gene dispersion, batch 128). Users change these, and a compiled
fast path that covers only the default would leave them on a slower one. This script trains
both tools with one option changed at a time, in a fresh process each (torch on 2 threads),
with the same data, split, epochs and options, and prints the throughput ratio per option:

    .venv/bin/python benchmarks/bench_shapes.py                 # all options, ~25 min
    .venv/bin/python benchmarks/bench_shapes.py --only default nb n_hidden=256 --repeats 2
    .venv/bin/python benchmarks/bench_shapes.py --quick         # 2 options, tiny data

Data: ``bench_scvi.py``'s simulated 10k cells (2,000 genes, 8% nonzero, 4 batches), and the
shipped Kang matrix with all its 9,015 genes for the gene-count row. Throughput is over the
epochs after the first (the warm-up epoch), as in ``bench_scvi.py``. Writes
``results/shapes.csv`` (``results/quick/`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import (
    SEED,
    THREADS,
    EpochClock,
    Measure,
    interleaved,
    print_table,
    results_dir,
    run_child,
    tool_versions,
    write_child_result,
    write_csv,
)
from bench_scvi import VALIDATION_SIZE, make_split, n_obs_of, scvi_train_kwargs

SCRIPT = Path(__file__).resolve()
TOOLS = ("cellvae", "scvi-tools")

# name -> (data set, epochs, setup_anndata options, model options, train options). Every
# option is spelt the same in both tools. "batch32" is a 32-category batch column made in the
# child from the cell's position (the same for both tools).
OPTIONS: dict[str, tuple[str, int, dict, dict, dict]] = {
    "default": ("sim10k", 3, {}, {}, {}),
    "9,015 genes (Kang, all genes)": ("kang_full", 8, {}, {}, {}),
    "n_hidden=256": ("sim10k", 3, {}, {"n_hidden": 256}, {}),
    "n_latent=30": ("sim10k", 3, {}, {"n_latent": 30}, {}),
    "n_layers=2": ("sim10k", 3, {}, {"n_layers": 2}, {}),
    "gene_likelihood=nb": ("sim10k", 3, {}, {"gene_likelihood": "nb"}, {}),
    "gene_likelihood=poisson": ("sim10k", 3, {}, {"gene_likelihood": "poisson"}, {}),
    "dispersion=gene-batch": ("sim10k", 3, {}, {"dispersion": "gene-batch"}, {}),
    "dispersion=gene-cell": ("sim10k", 3, {}, {"dispersion": "gene-cell"}, {}),
    "use_observed_lib_size=False": ("sim10k", 3, {}, {"use_observed_lib_size": False}, {}),
    "latent_distribution=ln": ("sim10k", 3, {}, {"latent_distribution": "ln"}, {}),
    "32 batches": ("sim10k", 3, {"batch_key": "batch32"}, {}, {}),
    "covariates (1 categorical, 1 continuous)": (
        "sim10k",
        3,
        {"categorical_covariate_keys": ["cov_cat"], "continuous_covariate_keys": ["cov_cont"]},
        {},
        {},
    ),
    "batch_size=512": ("sim10k", 6, {}, {}, {"batch_size": 512}),
    # TOTALVI on the CITE-seq-shaped 20k cells (4 batches), bench_totalvi.py's settings
    "TOTALVI default": ("citesim20k", 3, {}, {}, {}),
    "TOTALVI gene_dispersion=gene-batch": (
        "citesim20k",
        3,
        {},
        {"gene_dispersion": "gene-batch"},
        {},
    ),
    "TOTALVI protein_dispersion=protein-batch": (
        "citesim20k",
        3,
        {},
        {"protein_dispersion": "protein-batch"},
        {},
    ),
    "TOTALVI gene_likelihood=zinb": ("citesim20k", 3, {}, {"gene_likelihood": "zinb"}, {}),
    "TOTALVI use_observed_lib_size=False": (
        "citesim20k",
        3,
        {},
        {"use_observed_lib_size": False},
        {},
    ),
}
QUICK = ("default", "gene_likelihood=nb")


def dataset_path(name: str, quick: bool) -> Path:
    """The cached ``.h5ad`` of a data set (made on first use)."""
    from simulate import dataset_path as simulated_path

    if quick:  # 2,000 cells, CITE-seq-shaped for the TOTALVI rows
        return simulated_path("citesim2k" if name.startswith("citesim") else "sim2k")
    if name == "kang_full":
        path = results_dir(False) / "kang_full.h5ad"
        if not path.exists():
            import cellvae

            cellvae.datasets.kang_ifnb().write_h5ad(path)  # obs["batch"]: ctrl / stim
        return path
    return simulated_path(name)


def add_columns(adata) -> None:
    """The extra ``obs`` columns some options register (deterministic, same for both tools)."""
    import pandas as pd

    n = adata.n_obs
    rng = np.random.default_rng(0)
    codes = np.arange(n) % 32
    adata.obs["batch32"] = pd.Categorical([f"b{c}" for c in codes])
    adata.obs["cov_cat"] = pd.Categorical(rng.choice(["a", "b", "c"], size=n))
    adata.obs["cov_cont"] = rng.normal(size=n).astype(np.float32)


def child_train(a) -> dict[str, Any]:
    """Train one tool with one option; throughput over the epochs after the first."""
    import anndata as ad

    data, epochs, setup_kw, model_kw, train_kw = OPTIONS[a.option]
    epochs = a.epochs or epochs
    adata = ad.read_h5ad(a.data)
    add_columns(adata)
    split = np.load(a.split)
    train, val = split["train"], split["val"]
    setup = {"batch_key": "batch", **setup_kw}
    batch_size = train_kw.get("batch_size", 128)
    name, module_name = "SCVI", "VAE"
    if a.option.startswith("TOTALVI"):  # bench_totalvi.py's set-up, batch size and options
        from bench_totalvi import BATCH_SIZE, HPARAMS, PROTEIN_KEY

        name, module_name = "TOTALVI", "TOTALVAE"
        setup["protein_expression_obsm_key"] = PROTEIN_KEY
        model_kw = {**HPARAMS, **model_kw}
        batch_size = train_kw.get("batch_size", BATCH_SIZE)
    rec: dict[str, Any] = {"n_obs": adata.n_obs, "n_vars": adata.n_vars, "epochs": epochs}
    if a.tool == "cellvae":
        import cellvae
        import cellvae.module

        with Measure() as m:
            getattr(cellvae, name).setup_anndata(adata, **setup)
            model = getattr(cellvae, name)(adata, **model_kw)
            with EpochClock(getattr(cellvae.module, module_name)) as clock:
                model.train(
                    epochs,
                    batch_size=batch_size,
                    validation_size=VALIDATION_SIZE,
                    seed=a.seed,
                    progress_bar=False,
                    early_stopping=False,
                )
        rec["final_val_neg_elbo"] = float(model.history_["validation_elbo"][-1])
    else:
        import scvi

        scvi.settings.seed = a.seed
        kwargs = scvi_train_kwargs(epochs, batch_size, train, val)
        if name == "TOTALVI":  # its train() takes the split directly (as in bench_totalvi.py)
            kwargs["external_indexing"] = kwargs.pop("datasplitter_kwargs")["external_indexing"]
            kwargs.pop("check_val_every_n_epoch")
        with Measure() as m:
            getattr(scvi.model, name).setup_anndata(adata, **setup)
            model = getattr(scvi.model, name)(adata, **model_kw)
            with EpochClock(getattr(scvi.module, module_name)) as clock:
                model.train(**kwargs)
        rec["final_val_neg_elbo"] = float(model.history["elbo_validation"].iloc[-1, 0])
    rec.update(m.record())
    rec.update(clock.summary(epochs, len(train)))
    return rec


def parent(a) -> int:
    out_dir = results_dir(a.quick) if a.out_dir is None else a.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    names = list(QUICK if a.quick and not a.only else a.only or OPTIONS)
    unknown = [n for n in names if n not in OPTIONS]
    if unknown:
        raise SystemExit(f"unknown options {unknown}; choose from {list(OPTIONS)}")
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="cvshapes-"))
    for name in names:
        data = dataset_path(OPTIONS[name][0], a.quick)
        n_obs = n_obs_of(data)
        split_path = tmp / f"split_{n_obs}.npz"
        if not split_path.exists():
            make_split(split_path, n_obs, a.seed)  # bench_scvi.py's 10% validation split
        print(f"== {name} ({data.name})", flush=True)
        for rep, tool in interleaved(a.tools, a.repeats):
            args = ["--task", "train", "--tool", tool, "--option", name, "--data", data]
            args += ["--split", split_path, "--seed", a.seed]
            if a.epochs or a.quick:
                args += ["--epochs", a.epochs or 2]
            rec = run_child(SCRIPT, args, threads=a.threads, label=f"{tool} #{rep}")
            rows.append({"option": name, "tool": tool, "repeat": rep, "data": data.name, **rec})
    shutil.rmtree(tmp, ignore_errors=True)
    table = summarise(rows)
    write_csv(out_dir / "shapes.csv", rows)
    write_csv(out_dir / "shapes_summary.csv", table)
    (out_dir / "shapes_versions.json").write_text(json.dumps(tool_versions(), indent=1))
    print(f"\nTraining with one option changed, torch threads {a.threads}: cells/s")
    print_table(
        table,
        [
            ("option", "option"),
            ("cellvae", "cellvae"),
            ("scvi-tools", "scvi-tools"),
            ("ratio", "ratio"),
            ("ratios", "per run"),
            ("elbo", "val -ELBO (cv / scvi)"),
        ],
    )
    return 0 if all(r.get("status") == "ok" for r in rows) else 1


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per option: median throughput per tool, ratio of medians, per-run ratios."""
    table = []
    for name in dict.fromkeys(r["option"] for r in rows):
        mine = [r for r in rows if r["option"] == name and r.get("status") == "ok"]
        speed = {t: [r["cells_per_s_steady"] for r in mine if r["tool"] == t] for t in TOOLS}
        elbo = {t: [r["final_val_neg_elbo"] for r in mine if r["tool"] == t] for t in TOOLS}
        med = {t: float(np.median(v)) if v else float("nan") for t, v in speed.items()}
        per_run = [c / s for c, s in zip(speed["cellvae"], speed["scvi-tools"], strict=False)]
        table.append(
            {
                "option": name,
                "cellvae": f"{med['cellvae']:,.0f}",
                "scvi-tools": f"{med['scvi-tools']:,.0f}",
                "ratio": f"{med['cellvae'] / med['scvi-tools']:.2f}",
                "ratios": " ".join(f"{r:.2f}" for r in per_run),
                "elbo": " / ".join(f"{np.median(elbo[t]):.1f}" if elbo[t] else "-" for t in TOOLS),
            }
        )
    return table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 options on 2k cells")
    parser.add_argument("--only", nargs="+", default=None, help="option names (default: all)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per tool, interleaved")
    parser.add_argument("--tools", nargs="+", default=list(TOOLS), choices=TOOLS)
    parser.add_argument("--epochs", type=int, default=None, help="override the epochs")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--threads", type=int, default=THREADS)
    parser.add_argument("--out-dir", type=Path, default=None, help="default benchmarks/results")
    parser.add_argument("--child-json", help=argparse.SUPPRESS)
    parser.add_argument("--task", help=argparse.SUPPRESS)
    parser.add_argument("--tool", help=argparse.SUPPRESS)
    parser.add_argument("--option", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--split", help=argparse.SUPPRESS)
    a = parser.parse_args(argv)
    if a.child_json:
        from _common import init_child

        init_child(a.threads)
        t0 = time.perf_counter()
        rec = child_train(a)
        rec["child_s"] = time.perf_counter() - t0
        write_child_result(a.child_json, rec)
        return 0
    return parent(a)


if __name__ == "__main__":
    sys.exit(main())
