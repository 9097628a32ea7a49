"""Networks only: no diffusion schedule, no Lightning (layer 1)."""
