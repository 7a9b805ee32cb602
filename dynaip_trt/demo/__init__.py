"""The synthetic demo world and the training of the tiny default (never imported by the runtime)."""
