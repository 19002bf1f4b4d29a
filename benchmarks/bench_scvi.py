"""SCVI: cellvae vs scvi-tools — training throughput, memory, inference, and quality.

Each (tool, data set, task) runs in its own fresh Python process with torch on 2 threads, the
same data, the same hyper-parameters (scvi-tools' defaults: 128 hidden, 10 latent, 1 layer,
ZINB, Adam 1e-3, batch 128), the same train / validation split (cellvae's seeded 10% split,
handed to scvi-tools as ``external_indexing``), the same number of epochs, no early stopping,
validation every epoch for both, no progress bar.

1. ``train``: throughput (cells per second over the epochs after the first; the first, warm-up
   epoch is reported separately) and peak RSS of ``setup_anndata`` + model + ``train``.
2. ``quality``: held-out negative ELBO and reconstruction error per cell on the same held-out
   cells, each tool evaluating its own model; scib-metrics on the latent spaces of both tools and
   of uncorrected PCA.
3. ``inference``: latent representation and normalised expression of all cells of the
   inference data set (the model trained in step 1), throughput and peak RSS.

    .venv/bin/python benchmarks/bench_scvi.py --quick        # smoke run, ~5 min on 2 cores
    .venv/bin/python benchmarks/bench_scvi.py                # Kang, 10k, 100k; quality on 10k
    .venv/bin/python benchmarks/bench_scvi.py --with-1m      # + cellvae on 1M x 2,000 (18%)
    .venv/bin/python benchmarks/bench_scvi.py --with-1m --scvi-1m   # + scvi-tools (20 GB / 30 min)

Writes ``scvi_train.csv``, ``scvi_inference.csv``, ``scvi_quality.csv`` and ``scvi_scib.csv``
to ``benchmarks/results/`` (``results/quick/`` with ``--quick``).
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

SCRIPT = Path(__file__).resolve()
TOOLS = ("cellvae", "scvi-tools")
BATCH_SIZE = 128
VALIDATION_SIZE = 0.1
DEFAULT_EPOCHS = {"kang": 20, "sim10k": 10, "sim100k": 3, "sim1m_d18": 2}
KL_WARMUP_FRACTION = 0.75  # cellvae's default, used for both tools in "matched" mode


# =========================================================================== shared helpers
def make_split(path: Path, n_obs: int, seed: int) -> None:
    """cellvae's own seeded split (train, validation), saved for both tools."""
    from cellvae._data import split_indices

    train, val = split_indices(n_obs, VALIDATION_SIZE, seed)
    np.savez(path, train=train.numpy(), val=val.numpy())


def n_obs_of(path: Path) -> int:
    import anndata as ad

    backed = ad.read_h5ad(path, backed="r")
    n = backed.n_obs
    backed.file.close()
    return n


def warmup_options(tool: str, mode: str, epochs: int, n_train: int, batch_size: int) -> dict:
    """KL warm-up: each tool's default, or both linear over the first 75% of the steps."""
    if mode == "default":
        return {}
    if tool == "cellvae":
        return {"kl_warmup_fraction": KL_WARMUP_FRACTION}
    steps_per_epoch = math.ceil(n_train / batch_size)
    steps = math.ceil(KL_WARMUP_FRACTION * epochs * steps_per_epoch)
    return {"plan_kwargs": {"n_epochs_kl_warmup": None, "n_steps_kl_warmup": steps}}


def scvi_train_kwargs(epochs, batch_size, train, val, extra=None, device="cpu") -> dict:
    """The scvi-tools ``train`` call used everywhere (the given split, ``device``, quiet)."""
    kwargs = {
        "max_epochs": epochs,
        "batch_size": batch_size,
        "train_size": 1.0 - VALIDATION_SIZE,
        "accelerator": accelerator_of(device),
        "devices": 1,
        "enable_progress_bar": False,
        "early_stopping": False,
        "check_val_every_n_epoch": 1,  # cellvae validates every epoch too
        "datasplitter_kwargs": {"external_indexing": [train, val, np.array([], dtype=np.int64)]},
    }
    kwargs.update(extra or {})
    return kwargs


def last(history, key: str) -> float:
    """Last value of a history column (cellvae dict of lists / scvi-tools dict of frames)."""
    if key not in history:
        return math.nan
    value = history[key]
    if hasattr(value, "iloc"):
        value = value.iloc[:, 0].to_numpy() if value.ndim == 2 else value.to_numpy()
    value = [v for v in np.asarray(value, dtype=float).ravel() if np.isfinite(v)]
    return float(value[-1]) if value else math.nan


def as_float(value) -> float:
    """A tool's metric as a float (dicts of terms are summed)."""
    if isinstance(value, dict):
        return float(sum(as_float(v) for v in value.values()))
    if hasattr(value, "item"):
        return float(value.item())
    return float(value)


# =========================================================================== child tasks
def child_train(a) -> dict[str, Any]:
    """Train one tool on one data set; optionally evaluate, save the latent and the model."""
    import anndata as ad

    adata = ad.read_h5ad(a.data)
    split = np.load(a.split)
    train, val = split["train"], split["val"]
    epochs = a.epochs
    rec: dict[str, Any] = {
        "n_obs": adata.n_obs,
        "n_vars": adata.n_vars,
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
    if a.tool == "cellvae":
        import cellvae
        from cellvae.module import VAE

        with Measure() as m:
            t0 = time.perf_counter()
            cellvae.SCVI.setup_anndata(adata, batch_key="batch")
            model = cellvae.SCVI(adata)
            setup_s = time.perf_counter() - t0
            with EpochClock(VAE) as clock, GpuMonitor(a.device) as gpu:
                model.train(
                    epochs,
                    batch_size=a.batch_size,
                    validation_size=VALIDATION_SIZE,
                    seed=a.seed,
                    device=a.device,
                    progress_bar=False,
                    early_stopping=False,
                    **warm,
                )
        rec["split_matches"] = bool(np.array_equal(np.sort(model.validation_indices_), val))
        hist = model.history_
        rec["final_train_neg_elbo"] = last(hist, "train_elbo")
        rec["final_val_neg_elbo"] = last(hist, "validation_elbo")
        rec["final_kl_weight"] = last(hist, "kl_weight")
    else:
        import scvi

        scvi.settings.seed = a.seed
        with Measure() as m:
            t0 = time.perf_counter()
            scvi.model.SCVI.setup_anndata(adata, batch_key="batch")
            model = scvi.model.SCVI(adata)  # defaults: 128 hidden, 10 latent, 1 layer, zinb
            setup_s = time.perf_counter() - t0
            with EpochClock(scvi.module.VAE) as clock, GpuMonitor(a.device) as gpu:
                model.train(**scvi_train_kwargs(epochs, a.batch_size, train, val, warm, a.device))
        rec["split_matches"] = bool(np.array_equal(np.sort(model.validation_indices), val))
        hist = model.history
        # scvi-tools logs "elbo_*" = reconstruction + KL per cell (the negative ELBO)
        rec["final_train_neg_elbo"] = last(hist, "elbo_train")
        rec["final_val_neg_elbo"] = last(hist, "elbo_validation")
        rec["final_kl_weight"] = last(hist, "kl_weight")
    train_s = m.seconds - setup_s
    rec["precision"] = precision_of(a.tool, model, warm, a.device)
    rec.update(m.record())
    rec.update(clock.summary(epochs, len(train)))
    rec.update(gpu.record(since=clock.steady_start(epochs)))
    rec["device"] = a.device
    rec["setup_s"] = setup_s
    rec["train_s"] = train_s
    rec["cells_per_s_all"] = len(train) * epochs / train_s
    if a.eval:
        rec.update(evaluate(a.tool, model, val, a.elbo_repeats, a.marginal_ll))
    if a.latent_out:
        np.save(a.latent_out, np.asarray(model.get_latent_representation(), dtype=np.float32))
    if a.save:
        model.save(a.save, overwrite=True)
    return rec


def evaluate(tool: str, model, val: np.ndarray, repeats: int, n_mc: int) -> dict[str, Any]:
    """Held-out negative ELBO and reconstruction error per cell, by the tool's own getters.

    Sign conventions: both ``get_elbo`` return the ELBO itself (negative for count data, higher
    is better) — for scvi-tools 1.4 read in its code (``return -compute_elbo(...)``, where
    ``compute_elbo`` sums reconstruction + KL), although older scvi-tools returned the positive
    sum. Both ``get_reconstruction_error`` return −log p(x | z) (positive; both as a
    dict of terms, summed here) and both ``get_marginal_ll`` return log p(x). The negative
    ELBO reported is −get_elbo; ``sign_check_ok`` verifies that it is at least the
    reconstruction term (the KL is non-negative). Both draw one z per cell, so each figure
    is the mean over ``repeats`` evaluations.
    """
    import torch

    idx = np.asarray(val)
    out: dict[str, Any] = {}
    elbos, recs = [], []
    for r in range(repeats):
        # the same seed before both calls: the same z draws, so -ELBO - rec is the KL exactly
        torch.manual_seed(1000 + r)
        raw = as_float(model.get_elbo(indices=idx))
        elbos.append(-raw)
        torch.manual_seed(1000 + r)
        recs.append(as_float(model.get_reconstruction_error(indices=idx)))
        if r == 0:
            out["get_elbo_raw"] = raw
    out["heldout_neg_elbo"] = float(np.mean(elbos))
    out["heldout_neg_elbo_sd"] = float(np.std(elbos))
    out["heldout_reconstruction"] = float(np.mean(recs))
    out["heldout_kl"] = out["heldout_neg_elbo"] - out["heldout_reconstruction"]
    # sanity of the sign convention: the negative ELBO exceeds the reconstruction term
    out["sign_check_ok"] = bool(out["heldout_kl"] > -1e-3 * abs(out["heldout_neg_elbo"]))
    if n_mc:
        torch.manual_seed(0)
        ll = as_float(model.get_marginal_ll(indices=idx, n_mc_samples=n_mc))
        out["heldout_neg_marginal_ll"] = -ll
    return out


def child_infer(a) -> dict[str, Any]:
    """Latent or normalised expression of all cells with a saved (or quickly trained) model."""
    import anndata as ad

    adata = ad.read_h5ad(a.data)
    n = adata.n_obs
    rec: dict[str, Any] = {"n_obs": n, "n_vars": adata.n_vars, "task": a.task}
    have_model = a.load and Path(a.load).exists()
    if a.tool == "cellvae":
        import cellvae

        if have_model:
            model = cellvae.SCVI.load(a.load, adata, device=a.device)
        else:
            cellvae.SCVI.setup_anndata(adata, batch_key="batch")
            model = cellvae.SCVI(adata).train(1, device=a.device, progress_bar=False, seed=a.seed)
        default_bs = "1024 (cellvae default)"
    else:
        import scvi

        scvi.settings.seed = a.seed
        if have_model:
            model = scvi.model.SCVI.load(a.load, adata=adata, accelerator=accelerator_of(a.device))
        else:
            scvi.model.SCVI.setup_anndata(adata, batch_key="batch")
            model = scvi.model.SCVI(adata)
            model.train(
                max_epochs=1,
                accelerator=accelerator_of(a.device),
                devices=1,
                enable_progress_bar=False,
            )
        default_bs = f"{scvi.settings.batch_size} (scvi-tools default)"
    rec["model"] = "loaded" if have_model else "trained 1 epoch in this process"
    kwargs = {} if a.infer_batch_size is None else {"batch_size": a.infer_batch_size}
    rec["infer_batch_size"] = a.infer_batch_size or default_bs
    with Measure() as m, GpuMonitor(a.device) as gpu:
        if a.task == "latent":
            out = model.get_latent_representation(**kwargs)
        else:
            out = model.get_normalized_expression(return_numpy=True, **kwargs)
    out = np.asarray(out)
    assert out.shape[0] == n, out.shape
    rec["output_shape"] = "x".join(map(str, out.shape))
    rec["output_mb"] = out.nbytes / 2**20
    rec.update(m.record())
    rec.update(gpu.record())
    rec["device"] = a.device
    rec["cells_per_s"] = n / m.seconds
    return rec


def child_scib(a) -> dict[str, Any]:
    """scib-metrics on the latent spaces given + uncorrected PCA; see ``scib_scores``."""
    import anndata as ad

    adata = ad.read_h5ad(a.data)
    embeddings = {}
    for item in a.latents:
        name, path = item.split("=", 1)
        embeddings[name] = np.load(path)
    table, method = scib_scores(adata, embeddings, a.scib, drop_label="unknown")
    return {"method": method, "table": table}


def scib_scores(adata, embeddings: dict[str, np.ndarray], how: str, drop_label: str):
    """scib-metrics scores of each embedding and of PCA on log-normalised counts.

    ``how="benchmarker"``: scib-metrics' ``Benchmarker`` with all its default metrics, exact
    sklearn kNN (pynndescent's numba compile costs minutes on 2 cores); falls back to
    ``"individual"`` (the scib-metrics functions one by one) and then to ``"own"`` (NMI/ARI,
    silhouette, graph connectivity and simple kNN iLISI/cLISI written here) if that fails.
    """
    import scanpy as sc

    keep = adata.obs["cell_type"].astype(str).to_numpy() != drop_label
    sub = adata[keep].copy()
    for name, z in embeddings.items():
        sub.obsm[name] = z[keep]
    pca = sub.copy()
    sc.pp.normalize_total(pca)
    sc.pp.log1p(pca)
    sc.pp.pca(pca, n_comps=min(50, pca.n_vars - 1, pca.n_obs - 1))
    sub.obsm["PCA (uncorrected)"] = pca.obsm["X_pca"]
    keys = ["PCA (uncorrected)", *embeddings]
    errors = []
    order = {
        "benchmarker": ["benchmarker", "individual", "own"],
        "individual": ["individual", "own"],
    }
    for method in order.get(how, [how]):
        try:
            if method == "benchmarker":
                return _scib_benchmarker(sub, keys), "scib-metrics Benchmarker (sklearn kNN)"
            if method == "individual":
                return _scib_individual(sub, keys), "scib-metrics functions (sklearn kNN)"
            return _scib_own(sub, keys), "own implementations (fallback)"
        except Exception as err:
            errors.append(f"{method}: {type(err).__name__}: {err}")
            print(f"scib method {method} failed: {errors[-1]}", file=sys.stderr)
    raise RuntimeError("; ".join(errors))


def _knn(X: np.ndarray, k: int):
    from scib_metrics.nearest_neighbors import NeighborsResults
    from sklearn.neighbors import NearestNeighbors

    k = min(k, X.shape[0] - 1)
    dist, idx = NearestNeighbors(n_neighbors=k).fit(X).kneighbors(X)
    return NeighborsResults(indices=idx, distances=dist)


def _scib_benchmarker(adata, keys) -> list[dict]:
    from scib_metrics.benchmark import Benchmarker

    bm = Benchmarker(
        adata,
        batch_key="batch",
        label_key="cell_type",
        embedding_obsm_keys=keys,
        pre_integrated_embedding_obsm_key="PCA (uncorrected)",
        progress_bar=False,
        n_jobs=1,
    )
    bm.prepare(neighbor_computer=_knn)
    bm.benchmark()
    df = bm.get_results(min_max_scale=False)
    types = df.loc["Metric Type"]
    df = df.drop(index="Metric Type")
    rows = []
    for emb in df.index:
        for metric in df.columns:
            rows.append(
                {
                    "embedding": emb,
                    "metric": metric,
                    "type": types[metric],
                    "value": float(df.loc[emb, metric]),
                }
            )
    return rows


def _scib_individual(adata, keys) -> list[dict]:
    import scib_metrics as sm

    batches = adata.obs["batch"].astype("category").cat.codes.to_numpy()
    labels = adata.obs["cell_type"].astype("category").cat.codes.to_numpy()
    rows = []
    for key in keys:
        X = np.asarray(adata.obsm[key], dtype=np.float32)
        nn = _knn(X, 90)
        nmi_ari = sm.nmi_ari_cluster_labels_kmeans(X, labels)
        vals = {
            ("Bio conservation", "KMeans NMI"): nmi_ari["nmi"],
            ("Bio conservation", "KMeans ARI"): nmi_ari["ari"],
            ("Bio conservation", "Silhouette label"): sm.silhouette_label(X, labels),
            ("Bio conservation", "cLISI"): sm.clisi_knn(nn, labels),
            ("Batch correction", "iLISI"): sm.ilisi_knn(nn, batches),
            ("Batch correction", "KBET"): sm.kbet_per_label(nn, batches, labels),
            ("Batch correction", "Graph connectivity"): sm.graph_connectivity(nn, labels),
        }
        for (kind, metric), v in vals.items():
            rows.append({"embedding": key, "metric": metric, "type": kind, "value": float(v)})
    return rows


def _scib_own(adata, keys) -> list[dict]:
    """Transparent stand-ins: sklearn KMeans NMI/ARI, silhouette, kNN graph connectivity,
    and LISI as the inverse Simpson index of the 30 nearest neighbours (unweighted), scaled
    like scib-metrics ((LISI − 1) / (n − 1) for iLISI, (n − LISI) / (n − 1) for cLISI)."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import connected_components
    from sklearn.cluster import KMeans
    from sklearn.metrics import (
        adjusted_rand_score,
        normalized_mutual_info_score,
        silhouette_score,
    )

    batches = adata.obs["batch"].astype("category").cat.codes.to_numpy()
    labels = adata.obs["cell_type"].astype("category").cat.codes.to_numpy()
    n_b, n_l = batches.max() + 1, labels.max() + 1

    def lisi(idx, codes, n_cat):
        counts = np.zeros((idx.shape[0], n_cat))
        np.add.at(counts, (np.repeat(np.arange(idx.shape[0]), idx.shape[1]), codes[idx].ravel()), 1)
        p = counts / counts.sum(1, keepdims=True)
        return float(np.median(1.0 / (p**2).sum(1)))

    rows = []
    for key in keys:
        X = np.asarray(adata.obsm[key], dtype=np.float32)
        nn = _knn(X, 30)
        km = KMeans(n_clusters=n_l, n_init=10, random_state=0).fit_predict(X)
        gc = []
        for lab in range(n_l):
            cells = np.flatnonzero(labels == lab)
            if len(cells) < 2:
                continue
            pos = {c: i for i, c in enumerate(cells)}
            r, c = [], []
            for i, cell in enumerate(cells):
                for j in nn.indices[cell, :15]:
                    if j in pos:
                        r.append(i)
                        c.append(pos[j])
            g = csr_matrix((np.ones(len(r)), (r, c)), shape=(len(cells), len(cells)))
            _, comp = connected_components(g, directed=False)
            gc.append(np.bincount(comp).max() / len(cells))
        vals = {
            ("Bio conservation", "KMeans NMI"): normalized_mutual_info_score(labels, km),
            ("Bio conservation", "KMeans ARI"): adjusted_rand_score(labels, km),
            ("Bio conservation", "Silhouette label"): (silhouette_score(X, labels) + 1) / 2,
            ("Bio conservation", "cLISI"): (n_l - lisi(nn.indices, labels, n_l)) / max(n_l - 1, 1),
            ("Batch correction", "iLISI"): (lisi(nn.indices, batches, n_b) - 1) / max(n_b - 1, 1),
            ("Batch correction", "Graph connectivity"): float(np.mean(gc)),
        }
        for (kind, metric), v in vals.items():
            rows.append({"embedding": key, "metric": metric, "type": kind, "value": float(v)})
    return rows


# =========================================================================== parent
def child_args(**kw) -> list[str]:
    out = []
    for k, v in kw.items():
        if v is None or v is False:
            continue
        flag = "--" + k.replace("_", "-")
        if v is True:
            out.append(flag)
        elif isinstance(v, list | tuple):
            out += [flag, *map(str, v)]
        else:
            out += [flag, str(v)]
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (2k cells)")
    parser.add_argument("--datasets", nargs="+", default=None, help="default: kang sim10k sim100k")
    parser.add_argument("--epochs", type=int, default=None, help="override epochs everywhere")
    parser.add_argument("--with-1m", action="store_true", help="add cellvae on 1M x 2,000 (18%%)")
    parser.add_argument("--big", default="sim1m_d18", help="the --with-1m data set")
    parser.add_argument("--scvi-1m", action="store_true", help="also scvi-tools on the 1M set")
    parser.add_argument(
        "--repeats", type=int, default=1, help="training / inference runs per tool, interleaved"
    )
    parser.add_argument("--quality-data", default=None, help="default sim10k (quick: sim2k)")
    parser.add_argument("--quality-epochs", type=int, default=None, help="default 100 (quick 3)")
    parser.add_argument(
        "--kl-warmup",
        nargs="+",
        default=None,
        choices=["matched", "default"],
        help="quality runs: matched = both tools 75%% of steps; default = each tool's own",
    )
    parser.add_argument("--elbo-repeats", type=int, default=5)
    parser.add_argument("--marginal-ll", type=int, default=0, help="MC samples (0: skip)")
    parser.add_argument("--infer-data", default=None, help="default sim100k (quick: sim2k)")
    parser.add_argument("--infer-batch-size", type=int, default=None, help="default: each tool's")
    parser.add_argument(
        "--scib", default="benchmarker", choices=["benchmarker", "individual", "own", "none"]
    )
    parser.add_argument("--tools", nargs="+", default=list(TOOLS), choices=TOOLS)
    parser.add_argument("--skip", nargs="*", default=[], choices=["train", "quality", "inference"])
    parser.add_argument(
        "--precision",
        default="default",
        choices=["default", "32-true", "bf16-mixed"],
        help="training precision of both tools; default: each tool's own (cellvae 'auto': "
        "bf16-mixed on CPUs with AVX512-BF16 / AMX; scvi-tools '32-true')",
    )
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--threads", type=int, default=THREADS)
    parser.add_argument(
        "--device", default="cpu", choices=["cpu", "cuda"], help="both tools train / infer here"
    )
    parser.add_argument("--out-dir", type=Path, default=None, help="default benchmarks/results")
    parser.add_argument("--timeout-min", type=float, default=30.0, help="per child process")
    parser.add_argument("--mem-limit-gb", type=float, default=20.0, help="per child process")
    # child mode (internal)
    parser.add_argument("--child-json", help=argparse.SUPPRESS)
    parser.add_argument("--task", help=argparse.SUPPRESS)
    parser.add_argument("--tool", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--split", help=argparse.SUPPRESS)
    parser.add_argument("--warmup", default="default", help=argparse.SUPPRESS)
    parser.add_argument("--eval", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--latent-out", help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    parser.add_argument("--load", help=argparse.SUPPRESS)
    parser.add_argument("--latents", nargs="*", default=[], help=argparse.SUPPRESS)
    a = parser.parse_args(argv)

    if a.child_json:
        from _common import init_child

        init_child(a.threads)
        tasks = {
            "train": child_train,
            "latent": child_infer,
            "normalized": child_infer,
            "scib": child_scib,
        }
        fn = tasks[a.task]
        write_child_result(a.child_json, fn(a))
        return 0
    return parent(a)


def parent(a) -> int:
    from simulate import dataset_path

    quick = a.quick
    datasets = a.datasets or (["kang", "sim2k"] if quick else ["kang", "sim10k", "sim100k"])
    if a.with_1m and a.big not in datasets:
        datasets.append(a.big)
    quality_data = a.quality_data or ("sim2k" if quick else "sim10k")
    quality_epochs = a.quality_epochs or (3 if quick else 100)
    warmups = a.kl_warmup or (["matched"] if quick else ["matched", "default"])
    infer_data = a.infer_data or ("sim2k" if quick else "sim100k")
    out_dir = a.out_dir or results_dir(quick)
    out_dir.mkdir(parents=True, exist_ok=True)
    timeout = a.timeout_min * 60
    tmp = Path(tempfile.mkdtemp(prefix="cvbench-scvi-"))
    print(
        f"versions: {tool_versions()}; torch threads {a.threads}; device {a.device}; temp {tmp}",
        flush=True,
    )

    def epochs_for(name: str) -> int:
        if a.epochs:
            return a.epochs
        return 2 if quick else DEFAULT_EPOCHS.get(name, 3)

    paths, splits = {}, {}
    needed = set(datasets) if "train" not in a.skip else set()
    if "quality" not in a.skip:
        needed.add(quality_data)
    if "inference" not in a.skip:
        needed.add(infer_data)
    for name in sorted(needed):
        t0 = time.perf_counter()
        paths[name] = dataset_path(name)
        splits[name] = tmp / f"split_{name}.npz"
        make_split(splits[name], n_obs_of(paths[name]), a.seed)
        print(f"data {name}: {paths[name].name} ready ({time.perf_counter() - t0:.1f} s)")

    common = {"seed": a.seed, "threads": a.threads, "batch_size": a.batch_size, "device": a.device}
    common["precision"] = a.precision
    train_rows, infer_rows, quality_rows, scib_rows = [], [], [], []
    models: dict[str, Path] = {}
    try:
        if "train" not in a.skip:
            print("== training throughput and memory", flush=True)
            for name in datasets:
                for rep, tool in interleaved(a.tools, a.repeats):
                    row = {"dataset": name, "tool": tool, "repeat": rep}
                    if name == a.big and tool == "scvi-tools" and not a.scvi_1m:
                        row.update(status="skipped", error="scvi-tools on 1M needs --scvi-1m")
                        print(f"  [{tool} {name}] skipped (pass --scvi-1m to try it)")
                        train_rows.append(row)
                        continue
                    save = None
                    if name == infer_data and "inference" not in a.skip and rep == 0:
                        save = tmp / f"model_{tool}_{name}"
                    rec = run_child(
                        SCRIPT,
                        child_args(
                            task="train",
                            tool=tool,
                            data=paths[name],
                            split=splits[name],
                            epochs=epochs_for(name),
                            save=save,
                            **common,
                        ),
                        timeout_s=timeout,
                        mem_limit_gb=a.mem_limit_gb,
                        threads=a.threads,
                        label=f"train {tool} {name}" + (f" #{rep + 1}" if a.repeats > 1 else ""),
                    )
                    if name == a.big and tool == "scvi-tools" and rec["status"] != "ok":
                        rec["error"] = (
                            f"scvi-tools did not fit {a.mem_limit_gb:g} GB / "
                            f"{a.timeout_min:g} min: {rec.get('error', '')}"
                        )
                    if save and rec["status"] == "ok":
                        models[tool] = save
                    train_rows.append(row | rec)
            write_csv(out_dir / "scvi_train.csv", train_rows, TRAIN_COLUMNS)

        if "inference" not in a.skip:
            print(f"== inference on {infer_data}", flush=True)
            for tool in a.tools:
                if tool in models:
                    continue
                # no model from the train task: fit one epoch in a separate, unmeasured process
                save = tmp / f"model_{tool}_{infer_data}"
                rec = run_child(
                    SCRIPT,
                    child_args(
                        task="train",
                        tool=tool,
                        data=paths[infer_data],
                        split=splits[infer_data],
                        epochs=1,
                        save=save,
                        **common,
                    ),
                    timeout_s=timeout,
                    mem_limit_gb=a.mem_limit_gb,
                    threads=a.threads,
                    label=f"prepare a 1-epoch {tool} model for inference",
                )
                if rec["status"] == "ok":
                    models[tool] = save
            for task in ("latent", "normalized"):
                for rep, tool in interleaved(a.tools, a.repeats):
                    rec = run_child(
                        SCRIPT,
                        child_args(
                            task=task,
                            tool=tool,
                            data=paths[infer_data],
                            load=models.get(tool),
                            infer_batch_size=a.infer_batch_size,
                            seed=a.seed,
                            threads=a.threads,
                            device=a.device,
                        ),
                        timeout_s=timeout,
                        mem_limit_gb=a.mem_limit_gb,
                        threads=a.threads,
                        label=f"{task} {tool} {infer_data}"
                        + (f" #{rep + 1}" if a.repeats > 1 else ""),
                    )
                    row = {"dataset": infer_data, "tool": tool, "task": task, "repeat": rep}
                    infer_rows.append(row | rec)
            write_csv(out_dir / "scvi_inference.csv", infer_rows, INFER_COLUMNS)

        if "quality" not in a.skip:
            print(f"== quality on {quality_data}, {quality_epochs} epochs", flush=True)
            latents = []
            for warm in warmups:
                for tool in a.tools:
                    lat = tmp / f"latent_{tool}_{warm}.npy"
                    rec = run_child(
                        SCRIPT,
                        child_args(
                            task="train",
                            tool=tool,
                            data=paths[quality_data],
                            split=splits[quality_data],
                            epochs=quality_epochs,
                            warmup=warm,
                            eval=True,
                            elbo_repeats=a.elbo_repeats,
                            marginal_ll=a.marginal_ll or None,
                            latent_out=lat,
                            **common,
                        ),
                        timeout_s=timeout,
                        mem_limit_gb=a.mem_limit_gb,
                        threads=a.threads,
                        label=f"quality {tool} {quality_data} warm-up {warm}",
                    )
                    quality_rows.append({"dataset": quality_data, "tool": tool} | rec)
                    if rec["status"] == "ok":
                        latents.append(f"{tool} ({warm} warm-up)={lat}")
            write_csv(out_dir / "scvi_quality.csv", quality_rows, QUALITY_COLUMNS)
            if a.scib != "none" and latents:
                print("== scib-metrics", flush=True)
                rec = run_child(
                    SCRIPT,
                    child_args(
                        task="scib",
                        data=paths[quality_data],
                        latents=latents,
                        scib=a.scib,
                        threads=a.threads,
                    ),
                    timeout_s=timeout,
                    threads=a.threads,
                    label="scib",
                )
                if rec["status"] == "ok":
                    for r in rec["table"]:
                        scib_rows.append({"dataset": quality_data, "method": rec["method"]} | r)
                else:
                    scib_rows.append(
                        {"dataset": quality_data, "method": "failed", "metric": rec.get("error")}
                    )
                write_csv(out_dir / "scvi_scib.csv", scib_rows)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    report(train_rows, infer_rows, quality_rows, scib_rows)
    return 0


GPU_COLUMNS = [
    "device", "gpu", "gpu_util_steady", "gpu_util_mean", "gpu_samples", "gpu_allocated_peak_mb",
    "gpu_reserved_peak_mb", "gpu_used_peak_mb",
]  # fmt: skip
TRAIN_COLUMNS = [
    "dataset", "tool", "repeat", "status", "n_obs", "n_vars", "density", "n_train", "epochs",
    "batch_size", "precision", "cells_per_s_steady", "cells_per_s_all", "first_epoch_s",
    "steady_epoch_s", "setup_s", "train_s", "peak_delta_mb", "peak_mb", "baseline_mb",
    "ru_maxrss_mb", "mem_method", "final_train_neg_elbo", "final_val_neg_elbo", "final_kl_weight",
    "split_matches", "child_wall_s", "error", *GPU_COLUMNS,
]  # fmt: skip
INFER_COLUMNS = [
    "dataset", "tool", "task", "repeat", "status", "n_obs", "n_vars", "cells_per_s", "seconds",
    "peak_delta_mb", "peak_mb", "baseline_mb", "output_mb", "output_shape", "infer_batch_size",
    "model", "mem_method", "ru_maxrss_mb", "child_wall_s", "error", *GPU_COLUMNS,
]  # fmt: skip
QUALITY_COLUMNS = [
    "dataset", "tool", "kl_warmup", "status", "n_obs", "n_train", "n_val", "epochs",
    "heldout_neg_elbo", "heldout_neg_elbo_sd", "heldout_reconstruction", "heldout_kl",
    "heldout_neg_marginal_ll", "get_elbo_raw", "sign_check_ok", "final_val_neg_elbo",
    "final_train_neg_elbo", "final_kl_weight", "split_matches", "cells_per_s_steady",
    "train_s", "peak_delta_mb", "child_wall_s", "error",
]  # fmt: skip


# the GPU's columns in the console tables, where a row ran on one
GPU_TABLE = [
    ("gpu_util_steady", "GPU util %"), ("gpu_allocated_peak_mb", "GPU alloc MB"),
    ("gpu_used_peak_mb", "GPU used MB"),
]  # fmt: skip


def report(train_rows, infer_rows, quality_rows, scib_rows) -> None:
    if train_rows:
        on_gpu = any(r.get("gpu") for r in train_rows)
        print("\nTraining (cells/s over epochs 2..E; peak RSS above the loaded data)")
        print_table(
            train_rows,
            [
                ("dataset", "data"), ("tool", "tool"), ("status", "status"),
                ("epochs", "epochs"), ("cells_per_s_steady", "cells/s"),
                ("cells_per_s_all", "cells/s all"), ("first_epoch_s", "epoch1 s"),
                ("steady_epoch_s", "epoch s"), ("peak_delta_mb", "peak +MB"),
                ("peak_mb", "peak MB"), *(GPU_TABLE if on_gpu else ()),
            ],
        )  # fmt: skip
    if infer_rows:
        on_gpu = any(r.get("gpu") for r in infer_rows)
        print("\nInference")
        print_table(
            infer_rows,
            [
                ("dataset", "data"), ("task", "task"), ("tool", "tool"), ("status", "status"),
                ("cells_per_s", "cells/s"), ("seconds", "s"), ("peak_delta_mb", "peak +MB"),
                *(GPU_TABLE[1:] if on_gpu else ()),
            ],
        )  # fmt: skip
    if quality_rows:
        print("\nQuality (same held-out cells; negative ELBO per cell, lower is better)")
        print_table(
            quality_rows,
            [
                ("dataset", "data"), ("tool", "tool"), ("kl_warmup", "warm-up"),
                ("epochs", "epochs"), ("heldout_neg_elbo", "-ELBO"),
                ("heldout_reconstruction", "rec"), ("heldout_kl", "KL"),
                ("final_val_neg_elbo", "tool val -ELBO"), ("final_kl_weight", "final beta"),
            ],
        )  # fmt: skip
    if scib_rows:
        print("\nscib-metrics")
        print_table(
            scib_rows, [("embedding", "embedding"), ("metric", "metric"), ("value", "value")]
        )


if __name__ == "__main__":
    sys.exit(main())
