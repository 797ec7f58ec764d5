"""The model: presets, building and loading pipelines (and the classes a pipeline folder may name), the one-step
pipeline, LoRA, prompts, tiling, colour fix; and the commands that use a model as it is (`sana-sr upscale`,
`sana-sr cost`)."""
