"""SCVI quality over several seeds: held-out ELBO and scib-metrics, cellvae vs scvi-tools.

One seed gives one training trajectory per tool; the two tools' scib totals differed by less
than the spread between runs of one tool, so a comparison needs several seeds. For each seed
this runs the quality phase of ``bench_scvi.py`` (same split, initialisation seed and
hyper-parameters for both tools; the split changes with the seed) into
``results/seeds/<seed>/``, then prints the mean and standard deviation of each figure over the
seeds and writes them to ``results/scvi_quality_seeds.csv``.

    .venv/bin/python benchmarks/quality_seeds.py --seeds 0 1 2      # ~12 min a seed, quiet machine
    .venv/bin/python benchmarks/quality_seeds.py --seeds 1 2 --kl-warmup matched   # ~8 min a seed
    .venv/bin/python benchmarks/quality_seeds.py --seeds 0 1 2 --report-only
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from _common import BENCH_DIR, THREADS, fmt, print_table, read_csv, results_dir, write_csv
from run_all import run

SCIB = ("Total", "Batch correction", "Bio conservation")


def seed_rows(seed_dir: Path) -> dict[tuple[str, str], float]:
    """{(figure, embedding): value} of one seed's quality and scib CSVs."""
    out: dict[tuple[str, str], float] = {}
    for r in read_csv(seed_dir / "scvi_quality.csv"):
        if r.get("status") == "ok":
            label = f"{r['tool']} ({r['kl_warmup']} warm-up)"
            out[("held-out -ELBO / cell", label)] = float(r["heldout_neg_elbo"])
            out[("held-out reconstruction / cell", label)] = float(r["heldout_reconstruction"])
    for r in read_csv(seed_dir / "scvi_scib.csv"):
        if r["metric"] in SCIB:
            out[(f"scib {r['metric']}", r["embedding"])] = float(r["value"])
    return out


def summarise(root: Path, seeds: list[int]) -> list[dict]:
    per_seed = {s: seed_rows(root / str(s)) for s in seeds if (root / str(s)).is_dir()}
    keys = sorted({k for rows in per_seed.values() for k in rows})
    table = []
    for key in keys:
        values = [rows[key] for rows in per_seed.values() if key in rows]
        figure, embedding = key
        table.append(
            {
                "figure": figure,
                "embedding": embedding,
                "n_seeds": len(values),
                "mean": statistics.fmean(values),
                "sd": statistics.stdev(values) if len(values) > 1 else float("nan"),
                "min": min(values),
                "max": max(values),
                "values": " ".join(f"{v:.4g}" for v in values),
            }
        )
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--report-only", action="store_true", help="only summarise")
    parser.add_argument("--threads", type=int, default=THREADS)
    parser.add_argument(
        "--kl-warmup", nargs="+", default=None, help="passed to bench_scvi.py (matched, default)"
    )
    a = parser.parse_args()
    out_dir = results_dir(False)
    root = out_dir / "seeds"
    if not a.report_only:
        for seed in a.seeds:
            args = ["--skip", "train", "inference", "--seed", str(seed)]
            args += ["--kl-warmup", *a.kl_warmup] if a.kl_warmup else []
            run("bench_scvi.py", [*args, "--out-dir", str(root / str(seed))], a.threads)
    table = summarise(root, a.seeds)
    write_csv(out_dir / "scvi_quality_seeds.csv", table)
    cols = ("mean", "sd", "min", "max")
    print_table(
        [{**r, **{k: fmt(r[k], digits=4) for k in cols}} for r in table],
        [("figure", "figure"), ("embedding", "embedding"), ("n_seeds", "seeds")]
        + [(k, k) for k in cols],
    )
    print(f"wrote {out_dir / 'scvi_quality_seeds.csv'} (from {BENCH_DIR.name}/results/seeds/)")


if __name__ == "__main__":
    main()
