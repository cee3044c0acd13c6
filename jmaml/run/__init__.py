"""Layer 3, the run layer: recipes (``runs``: a config dataclass that declares its flags, plus how to train,
evaluate, report and sweep it), the supervised recipe's config and parts (``config``, ``recipes``, ``train``),
meta-RL's (``rl_recipe``), run folders (``rundir``, ``runinfo``), the paper's sinusoid protocol
(``evaluate``), sweeps and their results (``sweep``), plots, and the seed's walk-through.

It imports the engine, the learners and tasks, and the core; nothing below imports it."""
