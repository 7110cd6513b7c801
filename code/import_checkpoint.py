"""Entry point: see toollmm.cli.import_checkpoint (also installed as toollmm-import-checkpoint)."""

from toollmm.cli.import_checkpoint import main

if __name__ == "__main__":
    main()
