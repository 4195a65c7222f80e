"""Stage 4: prove nothing changed on the way (logit parity, fingerprint binding)."""
