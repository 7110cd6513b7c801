"""Entry point: see toollmm.cli.extract_features (also installed as toollmm-extract-features)."""

from toollmm.cli import run

if __name__ == "__main__":
    run("toollmm.cli.extract_features")
