#!/usr/bin/env bash
# Create .venv and install spikewatch with its dev extras (what the tests and CI need).
# Usage: bash scripts/setup.sh   (idempotent; set PYTHON to pick an interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
bash scripts/install_system.sh  # prometheus + alertmanager for the real-component tests
[[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check \
    -c scripts/constraints.txt -e ".[dev]"
echo "spikewatch is installed in .venv ($(.venv/bin/python -c 'import spikewatch; print(spikewatch.__version__)'))"
