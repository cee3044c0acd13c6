"""Layer 0, the core: pure functions and plain data -- types, checks, losses, models and their adapters, the
inner loop (``adapt``, ``inner_step``) and inner optimisers, the meta-objective, the meta-gradient estimators,
the fused kernel, diagnostics, the seed's closed forms (``analytic``) and the flags a config declares.

Nothing here imports another layer (``tests/layers_test.py`` reads the imports)."""
