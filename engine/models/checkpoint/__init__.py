"""Single-file checkpoints (A1111 / ComfyUI .safetensors or .ckpt, LDM layout) to diffusers weights."""
