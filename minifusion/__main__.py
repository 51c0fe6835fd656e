"""``python -m minifusion``: this machine, and how its library versions compare with the lock."""

import argparse

from .utils import environment_report, lock_report

argparse.ArgumentParser(
    prog="python -m minifusion",
    description="Print this machine's report (Python, PyTorch, devices, the compiled CPU scan) "
    "and how the installed library versions compare with requirements/lock.txt. No options; "
    "paste its output into a bug report.",
).parse_args()
print(environment_report())
print()
print(lock_report())
