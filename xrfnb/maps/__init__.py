"""Maps (maps room): pigment maps of whole scans, streamed in blocks or through dask, and
:class:`PigmentMaps`.

Imports the rooms below it: core, io, physics, fitting, model.
"""
