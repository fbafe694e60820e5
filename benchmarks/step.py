"""Training-step throughput benchmark; same as `fastafd bench step` (see fastafd/bench/step.py)."""

import sys

from fastafd.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "step", *sys.argv[1:]]))
