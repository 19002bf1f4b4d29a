#!/usr/bin/env bash
# The GPU figures of #5, on a machine with an NVIDIA GPU whose python3 already has a CUDA torch.
#
#   bash benchmarks/run_gpu.sh check      # versions, nvidia-smi, the test suite with device="auto" = CUDA
#   bash benchmarks/run_gpu.sh scvi       # SCVI side by side on CUDA: Kang, 100k; inference on 100k
#   bash benchmarks/run_gpu.sh 1m         # SCVI side by side on CUDA at 1M x 2,000 (18% nonzero)
#   bash benchmarks/run_gpu.sh totalvi    # TOTALVI side by side on CUDA (CITE-seq simulation, 20k)
#   bash benchmarks/run_gpu.sh profile    # where a training step's time goes (torch.profiler)
#   bash benchmarks/run_gpu.sh graph      # the CUDA-graph prototype (proto_cuda_graph.py)
#   bash benchmarks/run_gpu.sh simulate   # make the 1M data set only (the `1m` stage does it if missing)
#
# The packages that machine lacks (anndata, scanpy, scvi-tools, ...) travel as wheels in .whl/
# (see benchmarks/README.md, "GPU"); the Kang / ECCITE HVG subsets in benchmarks/results/ are
# carried too, so that the simulations are the ones of the CPU runs. Each stage writes its CSVs
# to benchmarks/results/gpu/ and, where $OUT is set, copies them there.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ] && [ ! -d /tmp/site/anndata ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TQDM_DISABLE=1
# pandas 3 (that machine's) makes string columns pd.StringDtype, which anndata 0.12 writes to
# h5ad only with this setting on; pandas 2 (the CI's) is unaffected
export ANNDATA_ALLOW_WRITE_NULLABLE_STRINGS=1
RES=benchmarks/results/gpu
mkdir -p "$RES"
out() { if [ -n "${OUT:-}" ]; then cp "$@" "$OUT"/ 2>/dev/null; fi; return 0; }

for stage in "$@"; do
    case "$stage" in
    check)
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm \
            --format=csv
        python3 - <<'EOF'
import importlib.metadata as md
import torch
print({n: md.version(n) for n in ("torch", "numpy", "scipy", "pandas", "anndata", "scanpy",
                                   "scvi-tools", "h5py")})
print("cuda", torch.cuda.is_available(), torch.version.cuda, torch.cuda.get_device_name())
EOF
        timeout 300 python3 -m pytest -q -p no:cacheprovider -n 8 tests cellvae 2>&1 \
            | tee "$RES/pytest_cuda.log" | tail -40
        out "$RES/pytest_cuda.log"
        ;;
    scvi)
        python3 benchmarks/bench_scvi.py --device cuda --datasets kang sim100k --skip quality \
            --infer-data sim100k --out-dir "$RES" 2>&1 | tee "$RES/scvi.log"
        out "$RES/scvi.log" "$RES/scvi_train.csv" "$RES/scvi_inference.csv"
        ;;
    simulate)
        python3 benchmarks/simulate.py --n-obs 1m --density 0.18
        ;;
    1m)  # one epoch per tool (training + validation pass), each tool in its own run
        while pgrep -f "simulate.py --n-obs 1m" >/dev/null; do sleep 5; done  # a background one
        for tool in cellvae scvi-tools; do
            python3 benchmarks/bench_scvi.py --device cuda --datasets sim1m_d18 --with-1m \
                --scvi-1m --tools "$tool" --epochs 1 --skip quality inference \
                --mem-limit-gb 100 --out-dir "$RES/1m_$tool" 2>&1 | tee "$RES/1m_$tool.log"
            cp "$RES/1m_$tool/scvi_train.csv" "$RES/scvi_train_1m_$tool.csv"
            out "$RES/1m_$tool.log" "$RES/scvi_train_1m_$tool.csv"
        done
        ;;
    totalvi)
        python3 benchmarks/bench_totalvi.py --device cuda --datasets citesim20k --elbo-repeats 1 \
            --out-dir "$RES" 2>&1 | tee "$RES/totalvi.log"
        out "$RES/totalvi.log" "$RES/totalvi.csv"
        ;;
    profile)
        python3 benchmarks/profile_gpu_step.py 2>&1 | tee "$RES/profile.log"
        out "$RES/profile.log"
        ;;
    graph)  # the CUDA-graph prototype: eager vs graphed step time, and their losses
        python3 benchmarks/proto_cuda_graph.py 2>&1 | tee "$RES/graph.log"
        python3 benchmarks/proto_cuda_graph.py --batch-size 512 2>&1 | tee -a "$RES/graph.log"
        out "$RES/graph.log"
        ;;
    *)
        echo "unknown stage $stage (check, scvi, simulate, 1m, totalvi, profile, graph)" >&2
        exit 2
        ;;
    esac
done
