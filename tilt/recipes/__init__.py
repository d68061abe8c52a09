"""Recipes: one algorithm, one readable loop, importable as ``train(config, ...)``. Only the CLI imports them."""
