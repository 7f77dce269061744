"""Readers and writers (io room): :func:`load` any supported file, :func:`save` atomically, xrfnb's HDF5
layout, the Bruker, EMSA, MCA, SPE, npy and text formats.

Imports :mod:`xrfnb.core` only.
"""
