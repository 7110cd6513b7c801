"""Entry point: see toollmm.cli.train (also installed as toollmm-train)."""

from toollmm.cli.train import main

if __name__ == "__main__":
    main()
