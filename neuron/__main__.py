"""``python -m neuron``: the ``neuron`` command (``neuron_cli``), for hosts where the console script is not on the
PATH. The entry point only: nothing in the shared home imports the command line."""

from neuron_cli import app

app()
