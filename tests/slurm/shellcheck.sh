#!/usr/bin/env bash
# Every launch script (jobs/) and the Slurm test's scripts are clean under shellcheck.
# Usage: shellcheck.sh  (fails when shellcheck is missing: scripts/setup.sh installs it)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"  # the scripts' `# shellcheck source=` paths are relative to the repository root
command -v shellcheck >/dev/null || {
  echo "FAIL: shellcheck is missing: scripts/setup.sh installs it" >&2
  exit 1
}
files=(jobs/*.sh jobs/*.sbatch tests/slurm/*.sh tests/slurm/lib/*.sh)
shellcheck --external-sources "${files[@]}"
echo "shellcheck $(shellcheck --version | sed -n 's/^version: //p'): ${#files[@]} scripts clean: ${files[*]}"
