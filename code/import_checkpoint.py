"""Entry point: see toollmm.cli.import_checkpoint (also installed as toollmm-import-checkpoint)."""

from toollmm.cli import run

if __name__ == "__main__":
    run("toollmm.cli.import_checkpoint")
