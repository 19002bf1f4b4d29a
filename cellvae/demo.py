"""The main job: ``python -m cellvae.demo`` (what ``make demo`` runs)."""

from __future__ import annotations

import argparse
import logging

from . import datasets, pp


def main(argv: list[str] | None = None) -> None:
    """Register the shipped Kang IFN-β data and print the setup summary."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="demo_output")
    parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    adata = datasets.kang_ifnb()
    pp.setup_anndata(adata, batch_key="batch", labels_key="cell_type")
    pp.view_setup(adata)


if __name__ == "__main__":
    main()
