#!/usr/bin/env python3
"""Picks a few representative new seeds from a fuzzer's scratch corpus.

    fuzz/pick_seeds.py TARGET WORK_DIR [MAX_FILES=20] [MAX_BYTES=2048]

Runs the target's libFuzzer binary in merge mode over the committed seeds
(fuzz/corpus/TARGET) and WORK_DIR to learn each input's coverage features,
then greedily takes the WORK_DIR inputs that add the most features not yet
covered by the seeds or the inputs already taken (at most MAX_FILES, each at
most MAX_BYTES), and copies them to fuzz/corpus/TARGET/found-<sha1>. Build
first (cargo +nightly fuzz build).
"""
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile

here = os.path.dirname(os.path.abspath(__file__))
target, work = sys.argv[1], os.path.abspath(sys.argv[2])
max_files = int(sys.argv[3]) if len(sys.argv) > 3 else 20
max_bytes = int(sys.argv[4]) if len(sys.argv) > 4 else 2048
seeds = os.path.join(here, "corpus", target)
binary = os.path.join(here, "target", "x86_64-unknown-linux-gnu", "release", target)

with tempfile.TemporaryDirectory() as tmp:
    out, control = os.path.join(tmp, "out"), os.path.join(tmp, "control")
    os.mkdir(out)
    subprocess.run(
        [binary, "-merge=1", f"-merge_control_file={control}", "-rss_limit_mb=2048", out, seeds, work],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        # As cargo fuzz run: the bundled SQLite trips ASan's ODR check.
        env={**os.environ, "ASAN_OPTIONS": "detect_odr_violation=0"},
    )
    lines = open(control).read().splitlines()

n = int(lines[0])
paths = lines[2 : 2 + n]
features = {}
for line in lines[2 + n :]:
    if line.startswith("FT "):
        parts = line.split()
        features[paths[int(parts[1])]] = set(parts[2:])

covered = set()
for p, f in features.items():
    if p.startswith(seeds + os.sep):
        covered |= f
candidates = {
    p: f for p, f in features.items() if p.startswith(work + os.sep) and os.path.getsize(p) <= max_bytes
}
taken = []
while candidates and len(taken) < max_files:
    # Most new features; the smaller file on a tie.
    p = max(candidates, key=lambda p: (len(candidates[p] - covered), -os.path.getsize(p)))
    gain = len(candidates.pop(p) - covered)
    if gain == 0:
        break
    covered |= features[p]
    taken.append((p, gain))

for p, gain in taken:
    data = open(p, "rb").read()
    name = "found-" + hashlib.sha1(data).hexdigest()[:12]
    shutil.copyfile(p, os.path.join(seeds, name))
    print(f"{name}\t{len(data)} bytes\t+{gain} features")
