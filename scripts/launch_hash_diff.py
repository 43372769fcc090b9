"""Compare two launch-hash recordings of the test suite (tests/conftest.py, GPU_LAUNCH_HASH=FILE).

    python scripts/launch_hash_diff.py BEFORE AFTER [--subset]

BEFORE and AFTER are the FILE prefixes of the two runs (their FILE.<worker>.<pid>.json parts are merged).
Tests are matched by name, then by their test function's name and parameters when a test moved to
another file. Prints the launches compared and every difference; exits 1 on any difference or on a
test of BEFORE missing in AFTER (with --subset, AFTER ran a part of the suite: only the tests it
ran are compared).
"""
from __future__ import annotations

import glob
import json
import sys


def load(prefix: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for path in sorted(glob.glob(f"{glob.escape(prefix)}.*.json")):
        with open(path) as f:
            out.update(json.load(f))
    if not out:
        sys.exit(f"no recording at {prefix}.*.json")
    return out


def short(nodeid: str) -> str:
    return nodeid.split("::", 1)[-1]


def main() -> int:
    before, after = load(sys.argv[1]), load(sys.argv[2])
    subset = "--subset" in sys.argv[3:]
    by_short: dict[str, list[str]] = {}
    for k, v in after.items():
        by_short.setdefault(short(k), []).append(k)
    launches = differ = missing = 0
    for test, hashes in sorted(before.items()):
        other = after.get(test)
        if other is None:
            moved = by_short.get(short(test), [])
            other = after[moved[0]] if len(moved) == 1 else None
        if other is None:
            if not subset:
                missing += 1
                print(f"missing after: {test}")
            continue
        launches += len(hashes)
        if other != hashes:
            differ += 1
            print(f"differs: {test} ({len(hashes)} launches before, {len(other)} after)")
    print(f"{len(before)} tests recorded before, {launches} launches compared; {differ} differ, {missing} missing")
    return 1 if differ or missing else 0


if __name__ == "__main__":
    sys.exit(main())
