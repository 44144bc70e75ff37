from progan.api import load_generator  # noqa: F401  (the Python API: G = load_generator(path); G.sample(n, seed))
