"""``python -m posttrain.launch train cfg.yaml ...``: the ``posttrain`` command line for launchers
that append ``--local_rank`` (``deepspeed --module posttrain.launch ...``).

A module of its own so that nothing below the command line imports it (``distributed`` is
imported by the engine; the command line imports the engine).
"""

import sys

from .cli import main
from .distributed import strip_launcher_args

if __name__ == "__main__":
    sys.exit(main(strip_launcher_args(sys.argv[1:])))
