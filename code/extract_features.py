"""Entry point: see toollmm.cli.extract_features (also installed as toollmm-extract-features)."""

from toollmm.cli.extract_features import main

if __name__ == "__main__":
    main()
