"""``python -m posttrain.launch train cfg.yaml ...``: the ``posttrain`` command line for launchers
that append ``--local_rank`` (``deepspeed --module posttrain.launch ...``).

A module of its own so that nothing below the command line imports it (``distributed`` is
imported by the engine; the command line imports the engine). Its imports wait for ``__main__``:
verifier workers re-import this module first (``__main__.py`` says why).
"""

import sys

if __name__ == "__main__":
    from .cli import main
    from .distributed import strip_launcher_args

    sys.exit(main(strip_launcher_args(sys.argv[1:])))
