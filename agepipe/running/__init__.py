"""Running: worker pools and Dask (parallel.py), resumable journals and part files (resume.py), atomic writes
(writes.py), the one output guard (output_guard.py) and its manifest (manifest.py), the terminal (console.py),
notebook kernels that die with their run (kernels.py)."""
