"""``python -m engine.kernels build``: compile the CPU kernels into the cache."""

from engine.kernels import main

raise SystemExit(main())
