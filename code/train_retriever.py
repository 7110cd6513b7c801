"""Entry point: see toollmm.cli.train_retriever."""

from toollmm.cli.train_retriever import main

if __name__ == "__main__":
    main()
