#!/usr/bin/env bash
# One command for the model pipeline (model/pipeline.py --help):
#   model/run.sh train --out DIR --normal FEATURES.csv... [--eval RUN_DIR...]
#   model/run.sh evaluate --model DIR --run RUN_DIR...
#   model/run.sh report|compare|sign|bench ...   (pipeline.py --help)
#   model/run.sh test      the pipeline's unit tests (model/test_pipeline.py)
# Creates a pinned virtual environment (model/requirements.txt) in
# target/model-venv on first use, then runs model/pipeline.py.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="${MODEL_VENV:-$here/../target/model-venv}"
stamp="$venv/.requirements.sha256"
want="$(sha256sum "$here/requirements.txt" | cut -d' ' -f1)"
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    command -v python3 >/dev/null || { echo "train.sh: python3 is missing (apt-get install python3 python3-venv)" >&2; exit 1; }
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$here/requirements.txt"
    echo "$want" > "$stamp"
fi
export PYTHONHASHSEED=0 TF_CPP_MIN_LOG_LEVEL=2 TF_ENABLE_ONEDNN_OPTS=0 CUDA_VISIBLE_DEVICES=""
if [ "${1:-}" = test ]; then
    exec "$venv/bin/python" -m unittest -v "$here/test_pipeline.py"
fi
exec "$venv/bin/python" "$here/pipeline.py" "$@"
