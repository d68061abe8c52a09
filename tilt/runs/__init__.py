"""Runs: everything between a command and a recipe.

``directory``: run directories that survive (the resolved config, metrics, samples, atomic verified checkpoints).
"""
