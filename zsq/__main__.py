"""`python -m zsq ...` (what torchrun runs: `torchrun --nproc-per-node N -m zsq synthesize ...`)."""
import sys

from zsq.cli import main

if __name__ == "__main__":
    sys.exit(main())
