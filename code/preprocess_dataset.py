"""Entry point: see toollmm.cli.preprocess_dataset."""

from toollmm.cli import run

if __name__ == "__main__":
    run("toollmm.cli.preprocess_dataset")
