"""``python3 -m determined.launch.deepspeed``: Kiln's ``kiln.launch.deepspeed``."""

import sys

from kiln.launch.deepspeed import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
