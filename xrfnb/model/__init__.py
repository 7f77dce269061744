"""Model (model room): the network, the pigment model and its identification, the simulated training data
and training.

Imports the rooms below it: core, io, physics, fitting.
"""
