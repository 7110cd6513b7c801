"""Entry point: see toollmm.cli.inference (also installed as toollmm-infer)."""

from toollmm.cli import run

if __name__ == "__main__":
    run("toollmm.cli.inference")
