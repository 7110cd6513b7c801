"""Entry point: see toollmm.cli.inference (also installed as toollmm-infer)."""

from toollmm.cli.inference import main

if __name__ == "__main__":
    main()
