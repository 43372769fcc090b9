"""`python -m gpu`: print what this machine can run (see gpu.info); exit status 2 when the
environment is invalid (a bad GPU_BACKEND), after the report."""
import sys

from . import info


def main() -> int:
    facts = info()
    print(facts)
    if facts["backend"].startswith("INVALID"):
        print(f"python -m gpu: error: {facts['backend'].removeprefix('INVALID: ')}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
