"""`python -m launch.train --config FILE [--set KEY=VALUE] [--resume]`: what `ray job submit` and `make run` start.

The same as `zeda train` (`launch.cli`), which owns the driver's command line: its one-line errors (a
refused config, a full disk, Ctrl-C) and exit codes. Where a run writes: `launch.config.load_run_config`.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":
    from launch.cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
