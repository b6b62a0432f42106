"""``python3 -m determined.launch.torch_distributed``: Kiln's ``kiln.launch.torch_distributed``."""

import sys

from kiln.launch.torch_distributed import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
