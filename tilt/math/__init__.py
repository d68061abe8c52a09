"""The math of tilt: small pure functions over tensors. Imports torch only.

Nothing here sees a model, a tokenizer or a config. Shapes are written in the docstrings;
``B`` is the number of sequences, ``T`` the number of completion tokens, and every ``*_mask``
is True where a token counts.
"""
