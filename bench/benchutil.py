"""Helpers shared by the bench/ comparison scripts."""
import platform


def cpu_name():
    """The CPU's model name, for the machine line of bench/RESULTS.md."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()
