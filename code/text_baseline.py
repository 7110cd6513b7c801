"""Entry point: see toollmm.cli.text_baseline."""

from toollmm.cli.text_baseline import main

if __name__ == "__main__":
    main()
