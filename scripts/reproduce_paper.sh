#!/usr/bin/env bash
# Reproduce the paper's DUCH tables (mAP@20, I->T / T->I / I->I / T->T, 16-128 bits) on UCM or
# RSICD from the original images and captions.
#
#   scripts/reproduce_paper.sh ucm   CAPTIONS IMAGES [WORK_DIR] [-- --set key=value ...]
#   scripts/reproduce_paper.sh rsicd CAPTIONS IMAGES [WORK_DIR] [-- --set key=value ...]
#
# CAPTIONS  the Karpathy-style captions file (UCM: dataset.json of the UCM captions release;
#           RSICD: dataset_rsicd.json), or a directory holding it
# IMAGES    the directory (or s3:// prefix) with the image files it names (UCM: the UC Merced
#           Land Use images, every class folder flattened or not: file names are unique)
# WORK_DIR  where the archive manifest, features, checkpoints, bundles and tables go
#           (default out/paper_<dataset>; use s3://... on a multi-node cluster)
# BITS      code lengths to train, from the environment (default "16 32 64 128")
#
# Needs the hub weights in the local Hugging Face cache (microsoft/resnet-18, bert-base-uncased)
# and, as configured, one GPU (configs/paper_<dataset>.yaml: scaling.use_gpu, features.num_gpus;
# on a CPU-only machine pass: -- --set scaling.use_gpu=false --set features.num_gpus=0).
# Runs against the cluster in RAY_ADDRESS when set, else starts Ray in-process.
#
# Each code length is a separate training run (run.name paper-<dataset>-<bits>); a rerun resumes
# unfinished runs from their last checkpoint and reuses the cached features. Every bundle gets
# evaluation.json / evaluation.md / PR and P@K plots; the summary table is written to
# <WORK_DIR>/paper_<dataset>.md and printed.
set -euo pipefail

usage() { sed -n '2,9p' "$0" >&2; exit 2; }
[ $# -ge 3 ] || usage
dataset=$1 captions=$2 images=$3
shift 3
work="out/paper_${dataset}"
if [ $# -gt 0 ] && [ "$1" != "--" ]; then work=$1; shift; fi
[ "${1:-}" = "--" ] && shift
extra=("$@")
case "$dataset" in
  ucm) labels=ucm ;;
  rsicd) labels=prefix ;;
  *) echo "dataset must be ucm or rsicd, got '$dataset'" >&2; exit 2 ;;
esac
PYTHON=${PYTHON:-python}
BITS=${BITS:-"16 32 64 128"}
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
manifest="$work/archive/manifest.parquet"

"$PYTHON" -m jobs.import_archive "$captions" "$manifest" --image-root "$images" \
  --labels "$labels" --split-seed 42 --require-images

for bits in $BITS; do
  "$PYTHON" jobs/train.py --config "configs/paper_${dataset}.yaml" \
    --set "work_dir=$work" --set "duch.data.archive=$manifest" \
    --set "duch.model.bits=$bits" --set "run.name=paper-${dataset}-${bits}" \
    --set "output=$work/bundles/paper-${dataset}-${bits}" "${extra[@]}"
done

"$PYTHON" - "$work" "$dataset" $BITS <<'PY'
import sys

from duch_core import storage

work, dataset, bits = sys.argv[1], sys.argv[2], sys.argv[3:]
lines = [
    f"# DUCH on {dataset.upper()}: mAP@20 (paper protocol)",
    "",
    "| bits | I→T | T→I | I→I | T→T | mean |",
    "|---:|---:|---:|---:|---:|---:|",
]
for b in bits:
    rep = storage.read_json(storage.join(work, "bundles", f"paper-{dataset}-{b}", "evaluation.json"))
    row = rep["map"]["20"]
    lines.append(f"| {b} | " + " | ".join(f"{row[d]:.3f}" for d in ("i2t", "t2i", "i2i", "t2t", "mean")) + " |")
text = "\n".join(lines) + "\n"
storage.write_text(storage.join(work, f"paper_{dataset}.md"), text)
print(text)
PY
