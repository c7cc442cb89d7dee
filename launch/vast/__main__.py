"""`python -m launch.vast ...`: what `bash launch/vast_cluster.sh` runs."""
import sys

from launch.vast.cli import main
from launch.vast.transport import log

if __name__ == "__main__":
    try:
        code = main()
    finally:
        log.flush()   # a line a signal handler logged during the last write
    sys.exit(code)
