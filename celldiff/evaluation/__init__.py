"""Judging generated cells: distances, the judge, the report, masked-region metrics, baselines, the run.

``distances`` (Fréchet and kernel distances with their floors, precision/recall, nearest neighbours,
memorisation), ``judge`` (the classifier checkpoint loaded as a network; how it sees cells),
``report`` (metrics.json / metrics.md), ``masked`` (inpainting metrics inside the mask),
``baselines`` (non-learned fills), ``external`` (LPIPS / Inception from local weights),
``inputs`` (every evaluate input checked first), ``sharding`` (generation split across ranks) and
``run`` (``celldiff evaluate``'s work). Import from the submodules.
"""
