#!/usr/bin/env bash
# Refresh constraints.txt: install the newest versions pyproject.toml allows, run the whole test
# suite on them, and pin exactly what passed. Nothing is written if a test fails.
set -euo pipefail
cd "$(dirname "$0")/.."
PMOD_UNPINNED=1 bash scripts/test.sh -p no:cacheprovider
{
  echo "# The exact versions the test suite passed with ($(.venv/bin/python -c 'import platform; print("Python", platform.python_version(), platform.system(), platform.machine())'));"
  echo "# written by scripts/update_constraints.sh. scripts/setup.sh installs with"
  echo "# \`pip install -c constraints.txt\` unless PMOD_UNPINNED=1 (docs/install.md)."
  .venv/bin/pip freeze --exclude-editable | grep -vi '^pmod-cli'
} > constraints.txt.new
mv constraints.txt.new constraints.txt
echo "constraints.txt: $(grep -vc '^#' constraints.txt) packages pinned"
