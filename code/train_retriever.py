"""Entry point: see toollmm.cli.train_retriever."""

from toollmm.cli import run

if __name__ == "__main__":
    run("toollmm.cli.train_retriever")
