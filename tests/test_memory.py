"""The compute slots reuse freed memory for the next frame instead of asking the kernel for fresh pages."""

from __future__ import annotations

import subprocess
import sys

import pytest

_PROBE = """
import sys
import numpy as np
from nightshift.daemon.executor import keep_freed_memory

def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

taken = keep_freed_memory() if sys.argv[1] == "keep" else None
before = rss_mb()
frame = np.ones((3, 2822, 4144), dtype=np.float32)  # a 4k colour frame: 140 MB
del frame
print(taken, rss_mb() - before)
"""


def _after_free(mode: str) -> tuple[str, float]:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True).stdout
    taken, grown = out.split()
    return taken, float(grown)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_frame_memory_stays_with_the_process_for_the_next_frame() -> None:
    taken, kept = _after_free("keep")
    assert taken == "True"
    assert kept > 100, f"a freed 140 MB frame should stay resident for reuse, RSS grew by {kept:.0f} MB"
    _, default = _after_free("default")
    assert default < 20, f"glibc's default gives a freed 140 MB array back at once, RSS grew by {default:.0f} MB"
