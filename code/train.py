"""Entry point: see toollmm.cli.train (also installed as toollmm-train)."""

from toollmm.cli import run

if __name__ == "__main__":
    run("toollmm.cli.train")
