"""What this host is, read with the standard library alone (``calibrate.vllm_inproc`` imports it
inside vLLM's python, where servesim's own dependencies may be missing)."""

from __future__ import annotations

import os
import platform


def cpu_name() -> str:
    """The CPU's model name, from ``/proc/cpuinfo`` where there is one."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_device() -> str:
    """``cpu: NAME (N logical cores)``: a CPU device as profiles record it."""
    return f"cpu: {cpu_name()} ({os.cpu_count()} logical cores)"
