#!/usr/bin/env bash
# Every GPU figure still waiting, in one round of about 10 minutes on one CUDA GPU; each benchmark writes its own
# section of benchmarks/RESULTS.md (date, GPU, precision, command). Run from a checkout whose real data sets are
# reachable: ../shared/data, or a copy named by DEEPSCOPE_SHARED_DATA (e.g. carried inside the checkout as
# .gpu_data/, git-ignored). A step that fails or runs out of its time is reported and the round goes on.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_round: no CUDA GPU here')" || exit 1
python -c "import deepscope" 2>/dev/null || pip install -q -e . || exit 1

step() {  # step SECONDS COMMAND...: run one benchmark with a time limit
    local limit=$1; shift
    echo "== gpu_round: $* (at most ${limit} s)"
    timeout "$limit" "$@" || echo "== gpu_round: '$*' failed or ran past ${limit} s"
}

step 100 python benchmarks/bench_gpu_airbench.py --runs 1                               # airbench94 against the fast net
step 150 python benchmarks/bench_bsd68.py --steps 40000 --methods n2v --no-peer        # BSD68 Noise2Void at 40k steps
step 120 python benchmarks/bench_dsb2018.py --max-minutes 1.5                          # DSB2018 U-Net, full training set
# DSB2018 star-convex nuclei with the planned GPU defaults (32 features, batch 16) for 2 minutes: the first GPU point of the
# curve towards StarDist's 0.86 on fluorescence (convergence needs a longer lease than a round)
step 200 python benchmarks/bench_nuclei.py --minutes 2 --runs stardist
step 120 python benchmarks/bench_detect_pennfudan.py --only deepscope --minutes 1.5 --models fcos centernet  # detection
step 90 python benchmarks/bench_detect_dsb2018.py --minutes 1 --only train             # dense detection (nuclei)
step 45 python benchmarks/bench_tiling.py --dim 2                                      # CUDA tiling against MONAI
step 30 python benchmarks/bench_features.py                                            # filter-bank features on CUDA
# self-supervised: deepscope SimCLR on CIFAR-10 with the standard ResNet-18 (width 64) for 2.5 minutes (the round's budget;
# lightly's 85% kNN took 87 A6000 minutes); the section lists the validation kNN accuracy after each epoch, then the probes
step 240 python benchmarks/bench_ssl_cifar10.py --methods simclr --width 64 --minutes 2.5 --epochs 40 --device cuda
