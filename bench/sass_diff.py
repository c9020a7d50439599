"""Which kernels two builds of the CUDA library compile differently, function by function.

A kernel change that should touch one kernel (or none: a refactor) is checked by comparing the
SASS of the two builds: cuobjdump dumps each library, and every function's instructions (their
text, without addresses and encodings) are compared. Kernels whose instructions are equal run
the same code, so an A/B on the GPU needs to measure only the others. With --usage, each
differing function's registers, stack and static shared memory are printed for both builds
(cuobjdump -res-usage): a register or stack change can move a kernel's occupancy.

Usage: python bench/sass_diff.py OLD.so NEW.so [--usage] [--cuobjdump PATH]
(e.g. two checkouts' reattention/_C_cuda.abi3.so, built with the same REATTENTION_CUDA_ARCHS).
Prints one line per differing or unmatched function and a summary line; exits 0.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys

FUNCTION = re.compile(r"\s*Function : (\S+)")
INSTRUCTION = re.compile(r"\s*/\*[0-9a-f]{4,}\*/\s*(.*?)\s*;")
USAGE = re.compile(r"Function (\S+):\s*(.*)")
# Functions of an anonymous namespace carry a per-build hash of their file in the mangled name
# (with the lengths around it): such names are compared without it.
ANONYMOUS = re.compile(r"\d+_GLOBAL__N__.*?_cu_[0-9a-f]+_\d+")


def key(name: str) -> str:
    return ANONYMOUS.sub("anon::", name)


def run(cuobjdump: str, flag: str, lib: str) -> str:
    return subprocess.run([cuobjdump, flag, lib], check=True, capture_output=True,
                          text=True).stdout


def functions(sass: str) -> dict[str, list[str]]:
    """Function name -> its instructions, in order (one entry per SASS line)."""
    out: dict[str, list[str]] = {}
    current = None
    for line in sass.splitlines():
        m = FUNCTION.match(line)
        if m:
            current = out.setdefault(key(m.group(1)), [])
            continue
        m = INSTRUCTION.match(line)
        if m and current is not None:
            current.append(m.group(1))
    return out


def usage(text: str) -> dict[str, str]:
    """Function name -> its resource line (REG, STACK, SHARED, LOCAL, ...)."""
    out = {}
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = USAGE.match(line.strip())
        if m and i + 1 < len(lines):
            out[key(m.group(1))] = " ".join(lines[i + 1].split())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--usage", action="store_true", help="print each differing kernel's resources")
    ap.add_argument("--cuobjdump", default=shutil.which("cuobjdump") or "cuobjdump")
    args = ap.parse_args()
    for arg in ("old", "new"):
        if not os.path.isfile(getattr(args, arg)):
            sys.exit(f"{arg}: no such file: {getattr(args, arg)}")
    old = functions(run(args.cuobjdump, "-sass", args.old))
    new = functions(run(args.cuobjdump, "-sass", args.new))
    if not old or not new:
        sys.exit("no SASS found: are both files CUDA libraries built with device code?")
    res_old = usage(run(args.cuobjdump, "-res-usage", args.old)) if args.usage else {}
    res_new = usage(run(args.cuobjdump, "-res-usage", args.new)) if args.usage else {}
    same = differ = 0
    for name in sorted(old.keys() | new.keys()):
        if name not in new or name not in old:
            print(f"only in {'old' if name in old else 'new'}: {name}")
        elif old[name] == new[name]:
            same += 1
        else:
            differ += 1
            print(f"differs: {len(old[name])} -> {len(new[name])} instructions: {name}")
            if args.usage:
                print(f"    old: {res_old.get(name, '?')}\n    new: {res_new.get(name, '?')}")
    print(f"{same} functions identical, {differ} differ")


if __name__ == "__main__":
    main()
