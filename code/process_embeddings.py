"""Entry point: see toollmm.cli.process_embeddings (also installed as toollmm-process-embeddings)."""

from toollmm.cli import run

if __name__ == "__main__":
    run("toollmm.cli.process_embeddings")
