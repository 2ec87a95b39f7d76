"""The ``posttrain`` command and ``python -m posttrain``.

Nothing heavy is imported here, on purpose: a worker process started with ``spawn`` (the math
verifier's) first re-runs its parent's main script, and a script importing ``posttrain.cli`` made
every worker import torch (1.1 s and ~210 MB each) before its first answer. Under ``python -m
posttrain`` the workers skip the main module altogether.
"""

import sys


def main(argv: list[str] | None = None) -> int:
    from .cli import main as run

    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
