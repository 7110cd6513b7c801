"""Entry point: see toollmm.app (the Gradio demo)."""

from toollmm.app import main

if __name__ == "__main__":
    main()
