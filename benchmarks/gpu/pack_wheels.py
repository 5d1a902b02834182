"""Pack a folder of wheels into carry-sized bins for the GPU machine (each call carries at most 64 MiB, the repo
included): bins .gpu/bins/NN/ of at most --mib MiB; a wheel bigger than that is split into parts
`NAME.whl.part-K-of-N` over consecutive bins, which stage.sh joins and installs once all parts have arrived.

  python benchmarks/gpu/pack_wheels.py WHEEL_DIR [--out .gpu/bins] [--mib 52]
"""

import argparse
import shutil
from pathlib import Path

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("wheels")
p.add_argument("--out", default=".gpu/bins")
p.add_argument("--mib", type=float, default=52)
args = p.parse_args()
cap = int(args.mib * 2**20)
out = Path(args.out)
shutil.rmtree(out, ignore_errors=True)
pieces = []  # (name, bytes)
for w in sorted(Path(args.wheels).glob("*.whl"), key=lambda f: -f.stat().st_size):
    data = w.read_bytes()
    n = -(-len(data) // cap)
    if n == 1:
        pieces.append((w.name, data))
    else:
        pieces += [(f"{w.name}.part-{k + 1}-of-{n}", data[k * cap:(k + 1) * cap]) for k in range(n)]
bins: list[list] = []
for name, data in pieces:  # first fit, largest first
    for b in bins:
        if sum(len(d) for _, d in b) + len(data) <= cap:
            b.append((name, data))
            break
    else:
        bins.append([(name, data)])
for i, b in enumerate(bins):
    d = out / f"{i:02d}"
    d.mkdir(parents=True)
    for name, data in b:
        (d / name).write_bytes(data)
    print(f"{d}: {sum(len(x) for _, x in b) / 2**20:.1f} MiB, {len(b)} files")
