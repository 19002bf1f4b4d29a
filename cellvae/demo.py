"""The main job, ``python -m cellvae.demo`` (what ``make demo`` runs).

SCVI batch correction of the shipped Kang IFN-β data (control vs stimulated PBMC): 2,000 highly
variable genes, SCVI, latent space to ``obsm``, UMAP before (PCA of log-normalised counts) and
after (SCVI latent), coloured by condition and cell type; the model and the AnnData are saved.
Everything is written under ``--out`` (default ``demo_output/``).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import scanpy as sc
import torch

from . import datasets, pp
from .model import SCVI

logger = logging.getLogger("cellvae.demo")


def select_hvg(adata, n_top_genes: int = 2000, batch_key: str | None = "batch"):
    """Return a copy of ``adata`` restricted to highly variable genes (counts untouched)."""
    norm = adata.copy()
    sc.pp.normalize_total(norm, target_sum=1e4)
    sc.pp.log1p(norm)
    sc.pp.highly_variable_genes(norm, n_top_genes=n_top_genes, batch_key=batch_key)
    return adata[:, norm.var["highly_variable"].to_numpy()].copy(), norm


def umap_panel(adata, rep: str, title: str, axes, colors=("batch", "cell_type")) -> None:
    """Neighbours + UMAP on ``obsm[rep]`` and one scatter per colour key on ``axes``."""
    sc.pp.neighbors(adata, use_rep=rep, random_state=0)
    sc.tl.umap(adata, random_state=0)
    for ax, key in zip(axes, colors):
        sc.pl.umap(adata, color=key, ax=ax, show=False, title=f"{title}: {key}", frameon=False)


def main(argv: list[str] | None = None) -> None:
    """Run the demo; see the module docstring."""
    parser = argparse.ArgumentParser(
        prog="python -m cellvae.demo", description="cellvae demo: SCVI on Kang IFN-β PBMC"
    )
    parser.add_argument("--out", default="demo_output", help="output folder")
    parser.add_argument("--max-epochs", type=int, default=None, help="default: from data size")
    args = parser.parse_args(argv)
    if args.max_epochs is not None and args.max_epochs < 1:
        parser.error(f"--max-epochs must be at least 1, got {args.max_epochs}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a file, or a path through one
        parser.error(f"--out {args.out!r} cannot be a folder: {err.strerror}")
    torch.set_num_threads(min(torch.get_num_threads(), 2) or 1)
    start = time.perf_counter()

    adata = datasets.kang_ifnb()
    adata, norm = select_hvg(adata)
    pp.setup_anndata(adata, batch_key="batch", labels_key="cell_type")
    pp.view_setup(adata)

    model = SCVI(adata)
    model.train(args.max_epochs, early_stopping=True)
    hist = model.history
    logger.info(
        "Trained %d epochs; validation −ELBO %.1f → %.1f per cell (lower is better).",
        len(hist),
        hist["validation_elbo"].iloc[0],
        hist["validation_elbo"].iloc[-1],
    )
    adata.obsm["X_scVI"] = model.get_latent_representation()

    # Before: PCA of log-normalised HVG counts, uncorrected.
    norm = norm[:, adata.var_names].copy()
    if hasattr(norm.X, "toarray"):  # centring densifies it anyway (and scanpy warns that it does)
        norm.X = norm.X.toarray()
    sc.pp.scale(norm, max_value=10)
    sc.tl.pca(norm, n_comps=30, random_state=0)
    adata.obsm["X_pca"] = norm.obsm["X_pca"]

    fig, axes = plt.subplots(2, 2, figsize=(12, 10))
    before = adata.copy()
    umap_panel(before, "X_pca", "PCA (uncorrected)", axes[0])
    umap_panel(adata, "X_scVI", "cellvae SCVI", axes[1])
    fig.tight_layout()
    fig.savefig(out / "umap_before_after.png", dpi=100)
    plt.close(fig)

    tl_hist = model.history[["train_elbo", "validation_elbo"]]
    ax = tl_hist.plot(figsize=(6, 4), title="SCVI training (negative ELBO per cell)")
    ax.set_xlabel("epoch")
    ax.figure.savefig(out / "history.png", dpi=100)
    plt.close(ax.figure)

    model.save(out / "scvi_model", overwrite=True)
    adata.write_h5ad(out / "kang_scvi.h5ad")
    logger.info("Wrote %s (model, h5ad, figures) in %.0f s.", out, time.perf_counter() - start)


if __name__ == "__main__":
    main()
