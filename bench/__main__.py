"""``python -m bench``: every benchmark → ``bench/RESULTS.md`` and the README's results section."""

from .report import main

raise SystemExit(main())
