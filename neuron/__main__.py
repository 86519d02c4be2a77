from neuron.cli import app

app()
