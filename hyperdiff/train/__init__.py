"""Training loops (called by the accelerate-launchable scripts in `scripts/`)."""
