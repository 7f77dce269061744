"""Core data types every room shares: :class:`Spectrum`, :class:`Scan`, :class:`EnergyCalibration` and the
X-ray line vocabulary (names, families, energies).

Imports nothing else of xrfnb but :mod:`xrfnb._errors`.
"""
