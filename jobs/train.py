"""Ray job entrypoint: one fold, one configuration, on Ray Train (DDP workers).

    ray job submit --working-dir . -- python jobs/train.py --cache DIR --fold 0 --config demo
"""

import sys

from ptxray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", "--ray", *sys.argv[1:]]))
