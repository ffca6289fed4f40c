"""`python -m bt_jax.convert`: see bt_jax.convert.command."""

from bt_jax import cli
from bt_jax.convert.command import main

if __name__ == "__main__":
    cli.run(main)
