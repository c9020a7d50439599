"""The commit a benchmark's figures belong to, for the header of every result file.

Imports nothing beyond the standard library, so any script in bench/ can take it (those run
from this folder have it on the path; a script loaded by file puts the folder there first).
"""
from __future__ import annotations

import os
import subprocess


def commit_id() -> str:
    """REATTENTION_COMMIT, else this checkout's short HEAD, marked "+dirty" when tracked files
    differ from it: the figures then belong to a tree that no commit names (a try built on top of
    main, or a copy of a newer tree beside an older .git)."""
    commit = os.environ.get("REATTENTION_COMMIT")
    if commit:
        return commit
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                         cwd=here, stderr=subprocess.DEVNULL).strip()
        diff = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], cwd=here,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if diff == 1 else "" if diff == 0 else "+unknown")
