"""``python -m reformer.bench CONFIG_JSON MEM_LIMIT_GIB``: the worker that measures one configuration."""

import sys

from .sweep import worker_main

sys.exit(worker_main(sys.argv[1:]))
