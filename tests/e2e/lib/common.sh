# Shared start of every e2e script: strict mode, the arguments (DILU_BINARY SCRATCH_DIR), a
# fresh scratch directory, `here` (the tests/e2e folder) and fail(). Source it with "$@".
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 DILU_BINARY SCRATCH_DIR" >&2
  exit 2
fi
dilu=$1
scratch=$2
rm -rf "$scratch"
mkdir -p "$scratch"
here=$(cd "$(dirname "${BASH_SOURCE[1]}")" && pwd)
export dilu scratch here

fail() {
  echo "FAIL: $*" >&2
  exit 1
}
