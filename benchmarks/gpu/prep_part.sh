#!/usr/bin/env bash
# GPU call 1 of 2: stash the first half of the SmolLM2 GGUF in /tmp (it survives while the machine stays warm).
set -euo pipefail
mkdir -p /tmp/gg && cp .gpu/p1/* /tmp/gg/ && ls -la /tmp/gg
