"""``python -m reattention``: the backend report, a parity check, then the needle demo
(:mod:`reattention.needle.cli`; ``--help`` lists the options)."""
import sys

from .needle.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
