"""Our own CLIP text encoder, UNet and VAE, state-dict compatible with diffusers / transformers."""
