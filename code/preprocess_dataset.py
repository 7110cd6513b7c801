"""Entry point: see toollmm.cli.preprocess_dataset."""

from toollmm.cli.preprocess_dataset import main

if __name__ == "__main__":
    main()
