#!/usr/bin/env python3
"""`gpu-bench` from a checkout, without installing: python scripts/bench.py [--quick | --cpu-check | ...].

The NumPy path's speed check (float32 BN and softmax-CE forward+backward against the seed's
formulas and PyTorch CPU on 2 threads) is `python scripts/bench.py --cpu-check`.
"""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from gpu.bench import main  # noqa: E402  (after the path fix)

if __name__ == "__main__":
    sys.exit(main())
