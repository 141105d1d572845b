"""Generation: cached decoding of the hybrid model (decoder.py; the caches live with the
modules that carry state, models/cache.py), budgets as views of one set of weights
(budgets.py), and the generator with sampling and elastic budget control (generator.py).
tools/generate.py is the command line."""
