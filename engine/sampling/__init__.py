"""NumPy samplers behind :mod:`engine.schedulers`.

Three concerns, one module each: ``schedules`` (betas, timestep spacings, sigma ladders as pure
functions), ``parameterization`` (eps / v / sample prediction to the denoised estimate) and the
solvers (``discrete``, ``karras``, ``multistep``) that turn a ladder into per-step coefficient
tables. ``plan`` holds the tables and the tiny interpreter that applies them in ``step``.
Only numpy and the standard library are imported here.
"""
