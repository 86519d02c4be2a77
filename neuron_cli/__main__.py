from neuron_cli import app

app()
