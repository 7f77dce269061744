"""Fitting (fitting room): energy calibration from peaks, element detection and element maps, the expert
element-to-pigment baseline and the fit of a paint stack to a spectrum.

Imports :mod:`xrfnb.core`, :mod:`xrfnb.io` and :mod:`xrfnb.physics`.
"""
