#!/usr/bin/env python3
"""`gpu-train` from a checkout, without installing: python scripts/train.py [--dataset ...].

The batch-norm comparison (Ioffe & Szegedy 2015, Fig. 1a) is
`python scripts/train.py --dataset mnist5k --compare-bn --out docs/ --force` (it rewrites the
docs/compare_bn_* files).
"""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from gpu.train import main  # noqa: E402  (after the path fix)

if __name__ == "__main__":
    sys.exit(main())
