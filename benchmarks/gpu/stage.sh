#!/usr/bin/env bash
# Stage carried folders on a warm GPU machine (each call carries at most 64 MiB, so big payloads travel over
# several calls made within the 30 s a machine stays warm): GGUF halves -> /tmp/gg, wheels -> /tmp/site,
# lighteval data -> /tmp/ldata. Usage: stage.sh .gpu/DIR [.gpu/DIR ...]
set -euo pipefail
mkdir -p /tmp/gg /tmp/py/site-packages
for d in "$@"; do
  case $d in
    *p1|*p2) cp "$d"/* /tmp/gg/ ;;
    *ldata) rm -rf /tmp/ldata && cp -r "$d" /tmp/ldata && cp -r .gpu/data/* /tmp/ldata/ ;;
    *) python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/py/site-packages "$d"/*.whl ;;
  esac
  echo "staged $d"
done
du -sh /tmp/gg /tmp/py/site-packages /tmp/ldata 2>/dev/null || true
