"""Kill -9 after acknowledgements: the durability tests' child process."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def killed_after_acks(setup: str, write: str, at: int) -> int:
    """Run ``setup`` then ``write`` for i = 0, 1, ... in a child process that prints i once each
    write returned, and SIGKILL it once ``at`` writes were acknowledged. Returns the last
    acknowledged i: everything up to it must survive."""
    code = textwrap.dedent(f"""
        import sys
        sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / "proto")!r}]
    """) + textwrap.dedent(setup) + textwrap.dedent(f"""
        for i in range(100000):
            {write}
            print(i, flush=True)
    """)
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    acked = -1
    assert child.stdout is not None
    for line in child.stdout:
        acked = int(line)
        if acked >= at:
            break
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    return acked
