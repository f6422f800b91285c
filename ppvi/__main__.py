"""``python -m ppvi ...``: the command line, also as torchrun's module (``torchrun -m ppvi fit ...``)."""

from .cli import run

if __name__ == "__main__":
    run()
