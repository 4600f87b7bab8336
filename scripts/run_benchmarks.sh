#!/usr/bin/env bash
# Regenerate every committed benchmark result under eval/results/ (about 1.5 h on 2 cores).
# Run on a quiet machine: the tables record wall-clock seconds and tokens/s.
set -euo pipefail
cd "$(dirname "$0")/.."
python eval/bench_pruning.py
python eval/bench_quant.py
python eval/bench_gguf.py
