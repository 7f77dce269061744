"""Physics (physics room): materials, X-ray tube, detector response, instrument, paint stacks, the
fundamental-parameter core, the simulator and synthetic scenes, and the pigment library.

Imports :mod:`xrfnb.core` and :mod:`xrfnb.io`.
"""
