"""`python -m gpu`: print what this machine can run (see gpu.info)."""
from . import info

print(info())
