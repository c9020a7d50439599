"""The parity grid shared by the per-op tests: odd sizes on purpose."""
from reattention.testing import Case

#        b  hq hkv  lq  nmax   d  sink local chunk topk qb
CASES = [
    Case(1, 4, 4, 1, 777, 64, 8, 64, 16, 4, 1),                      # decode, MHA, ragged tail
    Case(2, 4, 1, 63, 1000, 64, 0, 32, 32, 3, 16, lens=(1000, 700)),  # sink 0, 4 blocks, varlen
    Case(1, 7, 1, 5, 523, 128, 4, 40, 8, 8, 2),                      # Hq/Hkv = 7, D 128
    Case(3, 8, 2, 1, 300, 64, 16, 32, 16, 2, 1, lens=(40, 300, 129)),  # batch 3, one with M = 0
    Case(1, 2, 2, 9, 200, 16, 8, 64, 16, 16, 4),                     # M <= topk: dense
    Case(1, 4, 2, 3, 640, 32, 8, 48, 16, 5, 2, rotary=16),           # partial rotary
    Case(2, 4, 2, 3, 100, 64, 64, 16, 8, 2, 2, lens=(10, 100)),      # N < sink: sink only
]
IDS = [c.id for c in CASES]
