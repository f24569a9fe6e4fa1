#!/usr/bin/env bash
# Installs the reference Jinja renderer (@huggingface/jinja, pinned in package-lock.json) that
# tests/engine/chat_template_test.cpp compares dilu's chat templates with. Needs node 18+ and npm.
set -euo pipefail
cd "$(dirname "$0")"
npm ci --no-audit --no-fund --loglevel=error
