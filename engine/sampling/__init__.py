"""NumPy samplers behind :mod:`engine.schedulers`.

Three concerns, one module each: ``schedules`` (betas, timestep spacings, sigma ladders as pure
functions), ``parameterization`` (eps / v / sample prediction to the denoised estimate) and the
solvers (``discrete``, ``karras``, ``multistep``) that turn a ladder into per-step coefficient
tables. ``plan`` holds the tables and the tiny interpreter that applies them in ``step``.
``steps`` decides, before any table is built, which step counts a sampler can run on a config;
``config`` also holds ``migrate_scheduler_config`` (the rewrites diffusers' StableDiffusionPipeline
applies to outdated scheduler configs). Only numpy, the standard library and ``engine.errors`` are
imported here.
"""
