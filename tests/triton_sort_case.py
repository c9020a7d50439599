"""A Triton kernel for test_select_chunks.py: select_chunks' _sort run both ways on one row.

Imported only where Triton is (a module of its own, so the test file collects without it).
"""
import triton
import triton.language as tl

from reattention.triton_kernels.select_chunks import _sort


@triton.jit
def sort_both_ways_kernel(x_ptr, ranked_ptr, library_ptr, N: tl.constexpr,
                          DESCENDING: tl.constexpr):
    i = tl.arange(0, N)
    x = tl.load(x_ptr + i)
    tl.store(ranked_ptr + i, _sort(x, N, DESCENDING, True))
    tl.store(library_ptr + i, _sort(x, N, DESCENDING, False))
