"""Peak memory of one worker building a long recording with its transcript (issue 11): a silent mono
16 kHz FLAC of ``--hours`` (default 10) with an SRT of ``--cues`` (default 2,000) 3-second cues, built
by ``mmdata build --workers 1`` in a subprocess. Prints the peak RSS as a ratio against the 1 GiB
limit (≤ 1 is the target), the wall time, and the wall time per hour of audio kept (segments written):
a build that decoded the whole recording would grow with ``--hours``, one decoding windows does not.

    python -m bench.audio_memory [--hours 10] [--cues 2000]
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import soundfile as sf

LIMIT = 1 << 30
SR = 16000
CUE_S = 3.0


def write_inputs(root: str, hours: float, cues: int) -> None:
    block, left = np.zeros(SR * 600, np.float32), int(hours * 3600 * SR)
    with sf.SoundFile(os.path.join(root, "talk.flac"), "w", SR, 1, format="FLAC", subtype="PCM_16") as f:
        while left > 0:  # in blocks: the benchmark itself stays small in memory
            f.write(block[:min(left, len(block))])
            left -= len(block)
    every = (hours * 3600 - 2.0) / cues

    def ts(t: float) -> str:
        ms = int(round(t * 1000))
        return f"{ms // 3600000:02d}:{ms // 60000 % 60:02d}:{ms // 1000 % 60:02d},{ms % 1000:03d}"
    with open(os.path.join(root, "talk.srt"), "w") as f:
        for i in range(cues):
            a = 1.0 + i * every
            f.write(f"{i + 1}\n{ts(a)} --> {ts(a + min(CUE_S, every * 0.9))}\ncue number {i}\n\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hours", type=float, default=float(os.environ.get("MMDATA_BENCH_AUDIO_HOURS", 10)))
    ap.add_argument("--cues", type=int, default=2000)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="mmdata-bench-audio-memory-")
    try:
        inp, out = os.path.join(tmp, "in"), os.path.join(tmp, "out")
        os.mkdir(inp)
        write_inputs(inp, args.hours, args.cues)
        code = ("import resource, subprocess, sys\n"
                "p = subprocess.run([sys.executable, '-m', 'mmdata', 'build', *sys.argv[1:]], capture_output=True)\n"
                "sys.stderr.buffer.write(p.stdout[-2000:] + p.stderr[-2000:])\n"
                "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
                "sys.exit(p.returncode)\n")
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", code, "-i", inp, "-o", out, "--workers", "1", "--no-progress",
                               "--require", "audio", "--samples-per-shard", "1000000"],
                              capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"build exited {proc.returncode}: {proc.stderr[-1500:]}")
        peak = int(proc.stdout.split()[-1]) * 1024
        import pyarrow.parquet as pq
        shards = os.path.join(out, "shards")
        written = [r for n in os.listdir(shards) if n.endswith(".parquet")
                   for r in pq.read_table(os.path.join(shards, n), columns=["status", "duration"]).to_pylist()
                   if r["status"] == "written"]
        kept_h = sum(r["duration"] or 0.0 for r in written) / 3600
        print(f"{args.hours:g} h FLAC ({os.path.getsize(os.path.join(inp, 'talk.flac')) / 2**20:.1f} MiB), "
              f"{args.cues} cues: {len(written)} segments written, {kept_h * 3600:.0f} s of audio kept")
        print(f"peak RSS of the build (worker included): {peak / 2**20:.0f} MiB = {peak / LIMIT:.3f} x the 1 GiB limit")
        print(f"wall time: {wall:.1f} s ({wall / max(kept_h, 1e-9):.0f} s per hour kept, "
              f"{wall / args.hours:.2f} s per hour of recording)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
