"""The synthetic demo world, its scorer and the training of the tiny default.

``world`` (the scenes, subjects and prompts) and ``verdicts`` (what the scorer's outputs mean) are numpy-only contract
modules that the runtime's evaluation imports; ``scorer`` (training the scorer) and the rest need torch and are never
imported by the runtime."""
