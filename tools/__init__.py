"""Everything that touches a model: loaders, sites, data and the typed tools built on them.

Imports flow one way: ``tools`` knows nothing of ``evals`` or ``agent``.
"""
