#!/usr/bin/env bash
# Set up (if needed) and run the test suite (fast CPU tests; `-m slow` / `-m gpu` for the rest).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
python -m pytest -q "$@"
