"""The diffusion maths (layer 1): schedule, samplers and their trajectory, denoiser, loss. No Lightning, no networks."""
