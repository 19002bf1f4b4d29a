"""TOTALVI: cellvae vs scvi-tools — epoch throughput, peak memory and held-out ELBO.

Same protocol as ``bench_scvi.py``: one fresh process per (tool, data set), torch on 2 threads,
the same data, the same hyper-parameters (20 latent, 256 hidden, 2-layer encoder, dropout 0.2,
NB genes, Adam lr 4e-3, batch 256, LR reduction on plateau: both tools' defaults; plus
``HPARAMS``, scvi-tools' module defaults passed to both because cellvae's differ: observed
library size, decoder dropout 0.2), the same
train / validation split, the same number of epochs, no early stopping (fixed epochs), the KL
warm-up linear over the first 75% of the steps for both (``--kl-warmup default`` keeps each
tool's own: cellvae 75% of the epochs, scvi-tools 0.75 · n_cells steps).

Data: the shipped ECCITE-seq PBMC (500 cells, 2,000 HVGs, 49 proteins, one batch) and a
larger CITE-seq-shaped simulation fitted to it (``citesim20k``: 20,000 cells, 2 batches).

    .venv/bin/python benchmarks/bench_totalvi.py --quick
    .venv/bin/python benchmarks/bench_totalvi.py
    .venv/bin/python benchmarks/bench_totalvi.py --datasets eccite citesim100k --epochs 5

Writes ``totalvi.csv`` to ``benchmarks/results/`` (``results/quick/`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import math
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
    GpuMonitor,
    Measure,
    accelerator_of,
    interleaved,
    precision_of,
    print_table,
    results_dir,
    run_child,
    tool_versions,
    write_child_result,
    write_csv,
)
from bench_scvi import (
    GPU_COLUMNS,
    GPU_TABLE,
    KL_WARMUP_FRACTION,
    VALIDATION_SIZE,
    child_args,
    evaluate,
    last,
    make_split,
    n_obs_of,
)

SCRIPT = Path(__file__).resolve()
TOOLS = ("cellvae", "scvi-tools")
BATCH_SIZE = 256
PROTEIN_KEY = "protein_expression"
DEFAULT_EPOCHS = {"eccite": 50, "citesim20k": 10}
# scvi-tools 1.4's TOTALVAE defaults where cellvae's TOTALVI defaults differ, passed to both
# tools explicitly so that both fit the same model (cellvae: latent library, no decoder dropout)
HPARAMS = {"use_observed_lib_size": True, "dropout_rate_decoder": 0.2}


def warmup_options(tool: str, mode: str, epochs: int, n_train: int, batch_size: int) -> dict:
    if mode == "default":
        return {}
    if tool == "cellvae":
        return {"kl_warmup_fraction": KL_WARMUP_FRACTION, "n_epochs_kl_warmup": None}
    steps = math.ceil(KL_WARMUP_FRACTION * epochs * math.ceil(n_train / batch_size))
    return {"n_epochs_kl_warmup": None, "n_steps_kl_warmup": steps}


def child_train(a) -> dict[str, Any]:
    import anndata as ad

    adata = ad.read_h5ad(a.data)
    split = np.load(a.split)
    train, val = split["train"], split["val"]
    epochs = a.epochs
    n_batches = int(adata.obs["batch"].nunique())
    rec: dict[str, Any] = {
        "n_obs": adata.n_obs,
        "n_vars": adata.n_vars,
        "n_proteins": adata.obsm[PROTEIN_KEY].shape[1],
        "n_batches": n_batches,
        "density": adata.X.nnz / (adata.n_obs * adata.n_vars),
        "n_train": len(train),
        "n_val": len(val),
        "epochs": epochs,
        "batch_size": a.batch_size,
        "kl_warmup": a.warmup,
    }
    warm = warmup_options(a.tool, a.warmup, epochs, len(train), a.batch_size)
    if a.precision != "default":  # Lightning's names: both tools take them in train()
        warm = {**warm, "precision": a.precision}
    batch_key = "batch" if n_batches > 1 else None
    if a.tool == "cellvae":
        import cellvae
        from cellvae.module import TOTALVAE

        with Measure() as m:
            t0 = time.perf_counter()
            cellvae.TOTALVI.setup_anndata(
                adata, protein_expression_obsm_key=PROTEIN_KEY, batch_key=batch_key
            )
            model = cellvae.TOTALVI(adata, **HPARAMS)
            setup_s = time.perf_counter() - t0
            with EpochClock(TOTALVAE) as clock, GpuMonitor(a.device) as gpu:
                model.train(
                    epochs,
                    batch_size=a.batch_size,
                    validation_size=VALIDATION_SIZE,
                    early_stopping=False,
                    seed=a.seed,
                    device=a.device,
                    progress_bar=False,
                    **warm,
                )
        rec["split_matches"] = bool(np.array_equal(np.sort(model.validation_indices_), val))
        hist = model.history_
        rec["final_train_neg_elbo"] = last(hist, "train_elbo")
        rec["final_val_neg_elbo"] = last(hist, "validation_elbo")
        rec["final_kl_weight"] = last(hist, "kl_weight")
        rec["final_lr"] = last(hist, "lr")
    else:
        import scvi

        scvi.settings.seed = a.seed
        with Measure() as m:
            t0 = time.perf_counter()
            scvi.model.TOTALVI.setup_anndata(
                adata, protein_expression_obsm_key=PROTEIN_KEY, batch_key=batch_key
            )
            model = scvi.model.TOTALVI(adata, **HPARAMS)
            setup_s = time.perf_counter() - t0
            with EpochClock(scvi.module.TOTALVAE) as clock, GpuMonitor(a.device) as gpu:
                model.train(
                    max_epochs=epochs,
                    batch_size=a.batch_size,
                    train_size=1.0 - VALIDATION_SIZE,
                    accelerator=accelerator_of(a.device),
                    devices=1,
                    enable_progress_bar=False,
                    early_stopping=False,
                    external_indexing=[train, val, np.array([], dtype=np.int64)],
                    **warm,
                )
        rec["split_matches"] = bool(np.array_equal(np.sort(model.validation_indices), val))
        hist = model.history
        rec["final_train_neg_elbo"] = last(hist, "elbo_train")
        rec["final_val_neg_elbo"] = last(hist, "elbo_validation")
        rec["final_kl_weight"] = last(hist, "kl_weight")
        rec["final_lr"] = last(hist, "lr-Adam")
    rec["precision"] = precision_of(a.tool, model, warm, a.device)
    rec.update(m.record())
    rec.update(clock.summary(epochs, len(train)))
    rec.update(gpu.record(since=clock.steady_start(epochs)))
    rec["device"] = a.device
    rec["setup_s"] = setup_s
    rec["train_s"] = m.seconds - setup_s
    rec["cells_per_s_all"] = len(train) * epochs / rec["train_s"]
    rec.update(evaluate(a.tool, model, val, a.elbo_repeats, 0))
    return rec


COLUMNS = [
    "dataset", "tool", "kl_warmup", "repeat", "status", "n_obs", "n_vars", "n_proteins",
    "n_batches", "n_train", "n_val", "epochs", "batch_size", "precision", "cells_per_s_steady",
    "cells_per_s_all", "first_epoch_s", "steady_epoch_s", "setup_s", "train_s", "peak_delta_mb",
    "peak_mb", "baseline_mb", "ru_maxrss_mb", "heldout_neg_elbo", "heldout_neg_elbo_sd",
    "heldout_reconstruction", "heldout_kl", "get_elbo_raw", "sign_check_ok", "final_val_neg_elbo",
    "final_train_neg_elbo", "final_kl_weight", "final_lr", "split_matches", "mem_method",
    "child_wall_s", "error", *GPU_COLUMNS,
]  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    parser.add_argument("--datasets", nargs="+", default=None, help="default: eccite citesim20k")
    parser.add_argument("--epochs", type=int, default=None, help="override epochs everywhere")
    parser.add_argument(
        "--kl-warmup", nargs="+", default=["matched"], choices=["matched", "default"]
    )
    parser.add_argument("--elbo-repeats", type=int, default=5)
    parser.add_argument(
        "--repeats", type=int, default=1, help="training runs per tool and data set, interleaved"
    )
    parser.add_argument("--tools", nargs="+", default=list(TOOLS), choices=TOOLS)
    parser.add_argument(
        "--precision",
        default="default",
        choices=["default", "32-true", "bf16-mixed"],
        help="training precision of both tools; default: each tool's own",
    )
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--threads", type=int, default=THREADS)
    parser.add_argument(
        "--device", default="cpu", choices=["cpu", "cuda"], help="both tools train here"
    )
    parser.add_argument("--out-dir", type=Path, default=None, help="default benchmarks/results")
    parser.add_argument("--timeout-min", type=float, default=30.0)
    parser.add_argument("--mem-limit-gb", type=float, default=20.0)
    parser.add_argument("--child-json", help=argparse.SUPPRESS)
    parser.add_argument("--tool", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--split", help=argparse.SUPPRESS)
    parser.add_argument("--warmup", default="matched", help=argparse.SUPPRESS)
    a = parser.parse_args(argv)

    if a.child_json:
        from _common import init_child

        init_child(a.threads)
        write_child_result(a.child_json, child_train(a))
        return 0

    from simulate import dataset_path

    datasets = a.datasets or (["eccite", "citesim2k"] if a.quick else ["eccite", "citesim20k"])
    out_dir = a.out_dir or results_dir(a.quick)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="cvbench-totalvi-"))
    print(f"versions: {tool_versions()}; torch threads {a.threads}; device {a.device}", flush=True)
    try:
        import cellvae

        if not hasattr(cellvae, "TOTALVI"):
            raise ImportError("cellvae.TOTALVI is not available yet")
    except ImportError as err:
        print(f"TOTALVI benchmark skipped: {err}")
        write_csv(out_dir / "totalvi.csv", [{"status": "skipped", "error": str(err)}], COLUMNS)
        return 0

    rows = []
    try:
        for name in datasets:
            path = dataset_path(name)
            split = tmp / f"split_{name}.npz"
            make_split(split, n_obs_of(path), a.seed)
            epochs = a.epochs or (3 if a.quick else DEFAULT_EPOCHS.get(name, 10))
            for warm in a.kl_warmup:
                for rep, tool in interleaved(a.tools, a.repeats):
                    rec = run_child(
                        SCRIPT,
                        child_args(
                            tool=tool,
                            data=path,
                            split=split,
                            epochs=epochs,
                            warmup=warm,
                            elbo_repeats=a.elbo_repeats,
                            batch_size=a.batch_size,
                            precision=a.precision,
                            seed=a.seed,
                            threads=a.threads,
                            device=a.device,
                        ),
                        timeout_s=a.timeout_min * 60,
                        mem_limit_gb=a.mem_limit_gb,
                        threads=a.threads,
                        label=f"totalvi {tool} {name} warm-up {warm}"
                        + (f" #{rep + 1}" if a.repeats > 1 else ""),
                    )
                    row = {"dataset": name, "tool": tool, "kl_warmup": warm, "repeat": rep}
                    rows.append(row | rec)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    write_csv(out_dir / "totalvi.csv", rows, COLUMNS)
    print("\nTOTALVI (cells/s over epochs 2..E; negative ELBO per cell on the same held-out cells)")
    print_table(
        rows,
        [
            ("dataset", "data"), ("tool", "tool"), ("status", "status"), ("epochs", "epochs"),
            ("cells_per_s_steady", "cells/s"), ("peak_delta_mb", "peak +MB"),
            ("heldout_neg_elbo", "-ELBO"), ("heldout_reconstruction", "rec"),
            ("final_val_neg_elbo", "tool val -ELBO"),
            *(GPU_TABLE if any(r.get("gpu") for r in rows) else ()),
        ],
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
