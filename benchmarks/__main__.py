"""`python -m benchmarks`: list the benchmarks, run one, run the standard set, or assemble the results page."""

import sys

from benchmarks.runner import main

if __name__ == "__main__":  # not when a process started by `multiprocessing` imports it (fsdp_reshard's workers)
    sys.exit(main())
