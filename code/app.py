"""Entry point: see toollmm.app (the Gradio demo)."""

from toollmm.cli import run

if __name__ == "__main__":
    run("toollmm.app")
