"""``python -m neuroada_tools`` runs the CLI."""

from neuroada_tools.cli import main

if __name__ == "__main__":
    main()
