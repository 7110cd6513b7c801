"""Entry point: see toollmm.cli.text_baseline."""

from toollmm.cli import run

if __name__ == "__main__":
    run("toollmm.cli.text_baseline")
