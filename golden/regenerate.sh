#!/usr/bin/env bash
# Regenerates the committed golden sets from seeded random checkpoints (nothing here is hand-edited).
#
#   golden/camus-seed0: the built-in CAMUS config, `fxpass init --seed 0`, inputs seeded with 0,
#                       t_index 0 and 249 (the ends of the 250-step respaced schedule), batch 1.
#
# Run from anywhere: bash golden/regenerate.sh   (needs `pip install -e .`; about a minute on two cores)
set -euo pipefail
cd "$(dirname "$0")/.."

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

fxpass init "$tmp/camus.pt" --seed 0
fxpass golden "$tmp/camus.pt" -o golden/camus-seed0 --seed 0 --t-index 0 249 --force
