"""``python -m llmc``, and ``torchrun ... -m llmc``: the command line."""

from llmc.cli import main

if __name__ == "__main__":
    main()
