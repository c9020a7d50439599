"""Merge needle runs (``python -m reattention --json ...``) into one table and heatmap.

Long evaluations are split by method or length (exact ``max`` selection costs N^2 on the
CPU, dense attention too); this joins their JSON files, which must share depths and
samples, and prints the table.

    python bench/needle/eval.py a.json b.json --json bench/results/needle_cpu.json \
        --plot bench/results/needle_cpu.png
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from reattention import needle


def merge(runs):
    """One results dict from several :func:`reattention.needle.evaluate` results.

    Lengths and methods are the unions of the runs'; a (method, length) cell measured
    twice keeps the later run's value.
    """
    for key in ("depths", "samples", "trained_length", "settings"):
        values = {json.dumps(r[key]) for r in runs}
        if len(values) > 1:
            raise ValueError(f"runs differ in {key}: {sorted(values)}")
    lengths = sorted({n for r in runs for n in r["lengths"]})
    methods = [m for m in needle.METHODS if any(m in r["methods"] for r in runs)]
    out = {k: runs[0][k] for k in ("trained_length", "depths", "samples", "settings")}
    out.update(lengths=lengths, methods=methods,
               device=" + ".join(sorted({r["device"] for r in runs})),
               dtype=" + ".join(sorted({r["dtype"] for r in runs})),
               accuracy={m: [None] * len(lengths) for m in methods},
               seconds={m: [None] * len(lengths) for m in methods})
    for r in runs:
        for m in r["methods"]:
            for n, acc, sec in zip(r["lengths"], r["accuracy"][m], r["seconds"][m]):
                if acc is not None:
                    out["accuracy"][m][lengths.index(n)] = acc
                    out["seconds"][m][lengths.index(n)] = sec
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="JSON files written by python -m reattention --json")
    p.add_argument("--json", default=None, help="write the merged results here")
    p.add_argument("--plot", default=None, help="write the heatmap PNG here")
    args = p.parse_args(argv)
    runs = []
    for path in args.runs:
        with open(path) as f:
            runs.append(json.load(f))
    res = merge(runs)
    print(needle.format_table(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    if args.plot:
        needle.plot_heatmap(res, args.plot)


if __name__ == "__main__":
    main()
