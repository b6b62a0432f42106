"""``python3 -m determined.launch.horovod``: Kiln's ``kiln.launch.horovod``."""

import sys

from kiln.launch.horovod import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
