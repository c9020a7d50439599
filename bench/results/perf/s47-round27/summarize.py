"""Round twenty-seven: summary of stamps.py's raw stamps (the last replay of each case), in us
from the first scoring CTA's entry, p0 / p50 / p100 (count). Usage: python summarize.py X.npz"""
import sys
import numpy as np

z = np.load(sys.argv[1])


def q(col):
    col = col[col >= 0]
    if not len(col):
        return "-"
    return "%6.2f %6.2f %6.2f (%d)" % (np.percentile(col, 0), np.percentile(col, 50),
                                       np.percentile(col, 100), len(col))


for key in z.files:
    raw = z[key]
    s = raw / 1e3
    sc, scr = s[0:16384].reshape(-1, 16), raw[0:16384].reshape(-1, 16)
    keep = sc[:, 0] >= 0
    sc, scr = sc[keep], scr[keep]
    at, atr = s[16384:49152].reshape(-1, 16), raw[16384:49152].reshape(-1, 16)
    keep = at[:, 0] >= 0
    at, atr = at[keep], atr[keep]
    mg = s[49152:].reshape(-1, 16)
    mg = mg[mg[:, 0] >= 0]
    print("==", key, "scoring CTAs", len(sc))
    names = {0: "entry", 1: "rows staged", 2: "stream done", 3: "group atomics back",
             11: "own bound", 12: "filtered", 13: "ranked", 4: "emitted + padded",
             5: "arrived", 6: "last: staged", 7: "last: bound", 8: "last: filter count",
             9: "last: filtered", 10: "last: selection done"}
    for i, n in names.items():
        print("  s%-2d %-22s %s" % (i, n, q(sc[:, i])))
    if (scr[:, 14] > 0).any():
        n = scr[:, 14][scr[:, 14] > 0] - 1
        print("  own candidates n: p0/p50/p90/p100 %d %d %d %d" % tuple(np.percentile(n, [0, 50, 90, 100])))
    last = sc[sc[:, 6] >= 0]
    def d(a, b, x=sc):
        ok = (x[:, a] >= 0) & (x[:, b] >= 0)
        return q(x[ok, b] - x[ok, a])
    print("  per CTA: atomics %s | bound %s | filter %s | rank %s | emit %s | arrive %s" % (
        d(2, 3), d(3, 11), d(11, 12), d(12, 13), d(13, 4), d(4, 5)))
    print("  last: stage %s | bound %s | count %s | filter %s | rank %s" % (
        d(5, 6, last), d(6, 7, last), d(7, 8, last), d(8, 9, last), d(9, 10, last)))
    sel, win = at[at[:, 7] >= 0], at[at[:, 7] < 0]
    for tag, b in (("window", win), ("selected", sel)):
        print("  attn %-8s n=%d entry %s | prologue loads %s | wait back %s | loop start %s"
              % (tag, len(b), q(b[:, 0]), q(b[:, 1]), q(b[:, 7]), q(b[:, 5])))
        print("  %14s first K %s | first V %s | keys done %s | done %s"
              % ("", q(b[:, 2]), q(b[:, 6]), q(b[:, 3]), q(b[:, 4])))
    print("  merge entry %s past wait %s done %s" % (q(mg[:, 0]), q(mg[:, 1]), q(mg[:, 2])))
    if (scr[:, 15] != -1).all() and (atr[:, 15] != -1).all():
        # Attention CTAs on an SM while its scoring CTAs still run. stamps.py subtracted t0
        # from slot 15 (SM id + 1) too: the smallest value is SM 0's.
        lo = min(scr[:, 15].min(), atr[:, 15].min())
        sm_s, sm_a = scr[:, 15] - lo, atr[:, 15] - lo
        # A scoring CTA leaves after its arrival (s5), or after the selection (s10) if last.
        end = {}
        for smid, t in zip(sm_s, np.where(sc[:, 10] >= 0, sc[:, 10], sc[:, 5])):
            end[smid] = max(end.get(smid, 0), t)
        early = sum(1 for smid, t in zip(sm_a, at[:, 0]) if t < end.get(smid, 0) - 0.1)
        print("  attention CTAs entering an SM before its scoring CTAs left: %d of %d;"
              " scoring CTAs per SM: %s" % (early, len(at), np.bincount(np.bincount(sm_s))))
