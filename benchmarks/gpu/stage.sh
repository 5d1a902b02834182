#!/usr/bin/env bash
# Stage carried folders on a warm GPU machine (each command carries at most 64 MiB, so big payloads travel over
# several commands made within the 30 s a machine stays warm): GGUF halves -> /tmp/gg, wheels -> /tmp/py/site-packages
# (split wheels from pack_wheels.py are joined first),
# lighteval data -> /tmp/ldata. Usage: stage.sh .gpu/DIR [.gpu/DIR ...]
set -euo pipefail
mkdir -p /tmp/gg /tmp/py/site-packages
for d in "$@"; do
  case $d in
    *p1|*p2) cp "$d"/* /tmp/gg/ ;;
    *ldata) rm -rf /tmp/ldata && cp -r "$d" /tmp/ldata && cp -r .gpu/data/* /tmp/ldata/ ;;
    *) mkdir -p /tmp/parts; cp "$d"/*.part-* /tmp/parts/ 2>/dev/null || true
       whl=$(ls "$d"/*.whl 2>/dev/null || true)
       for first in /tmp/parts/*.part-1-of-*; do  # a split wheel whose parts have all arrived
         [ -e "$first" ] || continue; base=${first%.part-1-of-*}; n=${first##*-of-}
         if [ "$(ls $base.part-*-of-$n | wc -l)" = "$n" ]; then
           for k in $(seq 1 $n); do cat $base.part-$k-of-$n; done > $base && rm $base.part-* && whl="$whl $base"
         fi
       done
       # a folder named site-packages: dill (datasets' hashing) pickles modules elsewhere by value and fails
       [ -z "$whl" ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
         --target /tmp/py/site-packages $whl ;;
  esac
  echo "staged $d"
done
du -sh /tmp/gg /tmp/py/site-packages /tmp/ldata 2>/dev/null || true
