"""What to try after ``make demo``: printed by the Makefile's demo target, computed from the build.

    python -m pipelines.demo_next demo_out [--mmdata .venv/bin/mmdata] [--python .venv/bin/python]

Names the first shard to inspect, a search, a one-line Python loader, the brace pattern of *all*
the shards (for webdataset and open_clip's ``--train-data``), whether the model's weights were
random, and last the build's report.html and the ``mmdata serve`` command.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys


def shard_pattern(out: str, names: list[str]) -> str:
    """``OUT/shards/{00000..00004}.tar`` for contiguous numbered shards; a comma list otherwise."""
    stems = sorted(n[: -len(".tar")] for n in names)
    if not stems:
        raise ValueError(f"{out} has no shards")
    width = len(stems[0])
    contiguous = all(s.isdigit() and len(s) == width for s in stems) and \
        [int(s) for s in stems] == list(range(int(stems[0]), int(stems[0]) + len(stems)))
    if len(stems) == 1:
        body = stems[0]
    elif contiguous:
        body = f"{{{stems[0]}..{stems[-1]}}}"
    else:
        body = "{" + ",".join(stems) + "}"
    return f"{out.rstrip('/')}/shards/{body}.tar"


def next_steps(out: str, mmdata: str = "mmdata", python: str = "python") -> str:
    """The closing text of the demo, read from ``out``'s sizes.json and manifest.json."""
    with open(os.path.join(out, "shards", "sizes.json"), encoding="utf-8") as fh:
        sizes = json.load(fh)
    with open(os.path.join(out, "manifest.json"), encoding="utf-8") as fh:
        manifest = json.load(fh)
    first = sorted(sizes)[0]
    q = shlex.quote
    load = (f"from mmdata.loader import make_loader; b = next(iter(make_loader({json.dumps(out)}, batch_size=4, "
            f'num_workers=0))); print({{k: tuple(getattr(v, "shape", [len(v)])) for k, v in b.items()}})')
    lines = [
        "what to try next:",
        f"  inspect a shard:  {mmdata} inspect {q(os.path.join(out, 'shards', first))}",
    ]
    encoder = (manifest.get("embeddings") or {}).get("encoder") or {}
    if manifest.get("index"):
        lines.append(f"  search:           {mmdata} search {q(out)} --text 'a photo of a cat' -k 3")
    lines += [
        f"  load a batch:     {python} -c {q(load)}",
        f"  webdataset / open_clip shards: {shard_pattern(out, list(sizes))}  "
        f"({sum(sizes.values())} samples in {len(sizes)} shards; counts in {os.path.join(out, 'shards', 'sizes.json')})",
    ]
    if encoder.get("weights") == "random":
        lines.append(f"note: the embeddings come from {encoder.get('model')} with random weights (seed "
                     f"{encoder.get('seed')}): search and the index run, but neighbours mean nothing. For real "
                     f"ones: --model ViT-B-32 --pretrained laion2b_s34b_b79k (cached) or a checkpoint path.")
    report = os.path.join(out, "report.html")
    if os.path.exists(report):
        lines.append(f"  report.html:      {report}  (open it in a browser)")
    if manifest.get("index"):
        lines.append(f"  search page:      {mmdata} serve {q(out)}  (then open http://127.0.0.1:8080/)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--mmdata", default="mmdata", help="how to call the mmdata command")
    parser.add_argument("--python", default="python", help="how to call the Python that has mmdata")
    args = parser.parse_args(argv)
    try:
        print(next_steps(args.out, args.mmdata, args.python))
    except (OSError, ValueError) as exc:
        print(f"error: {args.out} is not a finished build: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
