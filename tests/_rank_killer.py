"""`python -m spacil` for a torchrun worker, except that the rank named by SPACIL_TEST_KILL_RANK exits hard (os._exit, no
cleanup, as a SIGKILL would) right after it has recorded its first batch done. Used by tests/test_extract.py."""

import os
import sys
from pathlib import Path

import spacil.store.extract as extract
from spacil.cli import main

if os.environ.get("RANK") == os.environ.get("SPACIL_TEST_KILL_RANK"):
    record_rows = extract.atomic_write_text

    def record_then_die(path, text):
        record_rows(path, text)
        if Path(path).name.startswith(".progress.rank"):
            os._exit(9)

    extract.atomic_write_text = record_then_die

sys.exit(main(sys.argv[1:]))
