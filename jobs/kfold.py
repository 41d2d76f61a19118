"""Ray job entrypoint: the K-fold x grid experiment (prepares the cache first when it is missing).

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/kfold.py --config demo --images DIR --labels CSV --cache DIR
"""

import sys

from ptxray.cli import main

if __name__ == "__main__":
    sys.exit(main(["kfold", *sys.argv[1:]]))
