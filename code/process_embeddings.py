"""Entry point: see toollmm.cli.process_embeddings (also installed as toollmm-process-embeddings)."""

from toollmm.cli.process_embeddings import main

if __name__ == "__main__":
    main()
