"""Ray job entrypoint: decode the DICOMs once into the Parquet cache (`ptxray prepare`)."""

import sys

from ptxray.cli import main

if __name__ == "__main__":
    sys.exit(main(["prepare", *sys.argv[1:]]))
