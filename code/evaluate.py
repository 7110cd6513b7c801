"""Entry point: see toollmm.cli.evaluate (also installed as toollmm-evaluate)."""

from toollmm.cli import run

if __name__ == "__main__":
    run("toollmm.cli.evaluate")
