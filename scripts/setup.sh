#!/usr/bin/env bash
# Installs what dilu needs to build and test on Debian 12 / Ubuntu 24.04, when it is missing.
# Uses apt-get (as root, or through sudo). Safe to run again: installs nothing when all is there.
set -euo pipefail

packages=(
  build-essential cmake ninja-build pkg-config git python3
  libopenmpi-dev openmpi-bin libhdf5-dev libcli11-dev libyaml-cpp-dev nlohmann-json3-dev
  libgtest-dev libgmock-dev libpcre2-dev
  python3-matplotlib python3-h5py hdf5-tools   # dilu report: plots (scripts/report.py); h5dump reads traces
  slurm-wlm munge shellcheck   # tests/slurm: a throwaway Slurm on localhost runs jobs/; shellcheck lints them
)
# The tokenizer parity test runs a JavaScript reference (tests/tokenizer, see scripts/setup-js.sh).
# A node that is already on PATH (NodeSource, nvm) is kept: Debian's npm conflicts with NodeSource's.
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  packages+=(nodejs npm)
fi

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "setup: all build dependencies are installed"
  exit 0
fi

echo "setup: installing ${missing[*]}"
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null; then sudo="sudo"; else
    echo "setup: need root (or sudo) to install: ${missing[*]}" >&2
    exit 1
  fi
fi
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
