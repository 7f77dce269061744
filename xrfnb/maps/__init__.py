"""Maps (maps room): pigment maps of whole scans, streamed in blocks or through dask, and
:class:`PigmentMaps`.

Modules, each importing only those listed before it (and the rooms below): :mod:`.storage` (writing maps
safely: the guarded HDF5 writer, free-space checks, the maps file's datasets), :mod:`.pigmentmaps`
(:class:`PigmentMaps`, :class:`MapSummary`, the mask codes), :mod:`.blocks` (one block of pixels
identified), :mod:`.sinks` (results in memory or in ``OUT.partial/`` with resume), :mod:`.daskpath` (the
dask path) and :mod:`.mapping` (:func:`map_pigments`).

Imports the rooms below it: core, io, physics, fitting, model.
"""
