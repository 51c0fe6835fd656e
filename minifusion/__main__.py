"""``python -m minifusion``: this machine, and how its library versions compare with the lock."""

from .utils import environment_report, lock_report

print(environment_report())
print()
print(lock_report())
