"""The main job (`sana-sr quickstart`): every stage on the embedded default, and its report."""
