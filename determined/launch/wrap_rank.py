"""``python3 -m determined.launch.wrap_rank``: Kiln's ``kiln.launch.wrap_rank``."""

import sys

from kiln.launch.wrap_rank import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
