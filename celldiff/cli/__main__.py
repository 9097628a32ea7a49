"""``python -m celldiff.cli ...``: the same as the ``celldiff`` console script."""

from celldiff.cli.main import main

if __name__ == "__main__":
    main()
