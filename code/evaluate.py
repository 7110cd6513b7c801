"""Entry point: see toollmm.cli.evaluate (also installed as toollmm-evaluate)."""

from toollmm.cli.evaluate import main

if __name__ == "__main__":
    main()
