"""Model folders on the torch side: validation of diffusers folders, torch wrappers, random presets."""
