"""The run folder's life and the files it writes: its records (``rundir``: config, environment, metrics), the
one-run-per-folder lock (``runlock``), atomic writes (``atomic``), outputs that never overwrite a file fastafd did
not write (``outputs``) and the typed reading of those files back (``readback``)."""
