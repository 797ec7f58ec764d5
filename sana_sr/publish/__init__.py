"""Publishing a run to the Hugging Face hub: the hub-ready folder, its model card, the upload (`sana-sr publish`)."""
