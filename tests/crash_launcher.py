"""Runs the `sealbox` command in a process that SIGKILLs itself at a named crash point.

`python tests/crash_launcher.py POINT ARGS...` is `sealbox ARGS...`, except that on reaching POINT
(`sealbox.bundler.crashpoints.POINTS`) the process dies by SIGKILL. The shipped command has no such switch.
"""

from __future__ import annotations

import sys

from sealbox.bundler.crashpoints import die_at
from sealbox.cli import main

if __name__ == "__main__":
    die_at(sys.argv[1])
    sys.argv = ["sealbox", *sys.argv[2:]]
    main()
