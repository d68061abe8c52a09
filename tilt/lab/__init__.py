"""The exact lab: small enumerable worlds where the target and every divergence are computable exactly."""
