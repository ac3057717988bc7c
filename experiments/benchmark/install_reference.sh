#!/usr/bin/env bash
# Create the reference venv with scvi-tools 1.5.1 (scvi.external.DIAGVI), idempotently.
#
#   bash experiments/benchmark/install_reference.sh [VENV] [TORCHSPEC]
#
# VENV defaults to .venv-ref, TORCHSPEC to torch==2.13.0 (the CPU build on this machine's
# disk; GPU users pass "torch"). scvi-tools 1.5.1 declares Python >= 3.12 but runs on 3.11,
# so it is installed with --no-deps --ignore-requires-python and its dependencies after it.
set -euo pipefail

VENV="${1:-.venv-ref}"
TORCHSPEC="${2:-torch==2.13.0}"
SCVI="scvi-tools==1.5.1"
DEPS=(anndata docrep joblib lightning ml-collections mudata numba numpy pandas pyro-ppl rich
      scanpy scikit-learn scipy sparse tensorboard torchmetrics tqdm xarray geomloss
      torch-geometric psutil)
STAMP="$VENV/.installed-$(echo "$TORCHSPEC $SCVI" | tr -c 'a-zA-Z0-9.=\n' _)"

if [ -f "$STAMP" ]; then
    echo "reference venv $VENV is ready ($STAMP)"
    exit 0
fi
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
test -x "$VENV/bin/python" || python3 -m venv "$VENV"
"${PIP[@]}" "$TORCHSPEC"
"${PIP[@]}" --no-deps --ignore-requires-python "$SCVI"
# the dependencies resolve against the torch already installed (no CUDA download)
"${PIP[@]}" "$TORCHSPEC" "${DEPS[@]}"
"$VENV/bin/python" -c "import scvi; scvi.external.DIAGVI; print('scvi-tools', scvi.__version__)"
touch "$STAMP"
