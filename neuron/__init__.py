"""Neuron: batch screening of medical-image archives.

This package is the small torch-free home of what every other package shares: settings, errors, routes and the CLI.
"""

__version__ = "0.1.0"
