"""``python -m aapo_app`` (and ``deepspeed --module aapo_app``) runs the ``aapo`` CLI."""

import os
import sys

from aapo_app.cli import main

# The deepspeed launcher inserts --local_rank=N before our own arguments; the rank is also in the
# environment (LOCAL_RANK), so drop it here rather than make every subcommand accept it.
_args = []
for _arg in sys.argv[1:]:
    if _arg.startswith(("--local_rank=", "--local-rank=")):
        os.environ.setdefault("LOCAL_RANK", _arg.split("=", 1)[1])
        continue
    _args.append(_arg)

if __name__ == "__main__":
    main(args=_args, prog_name="aapo")
