"""python -m gpu.bench: the same as gpu-bench."""
import sys

from .cli import main

sys.exit(main())
