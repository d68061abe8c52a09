"""tilt: align language models by treating fine-tuning as Bayesian inference toward the tilted target

    pi*(y|x) ∝ pi_ref(y|x) · exp(Phi(r(x, y)) / beta).

Layout: ``tilt.math`` (pure tensor math, torch only), ``tilt.rollout`` and ``tilt.target`` (the shared
vocabulary), ``tilt.engine`` (Hugging Face models: sampling and log-probs), ``tilt.lab`` (exact enumerable
worlds), ``tilt.recipes`` (one training loop per method), ``tilt.cli`` (the ``tilt`` command).
"""
__version__ = "0.1.0"
