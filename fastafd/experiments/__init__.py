"""Experiments over run folders, without torch: ``fastafd sweep`` (``sweep``: the commands; ``plan``: cells and the
manifest ``sweep.json``; ``state``: a cell's state from its files; ``local`` and ``slurm``: the executors),
``fastafd report`` (``report``), the named grids (``grids``), the paper's claims as computed comparisons (``claims``)
and ``fastafd plot`` and the benchmark charts (``plot``)."""
