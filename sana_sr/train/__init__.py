"""Training of SANA-SR: `python -m sana_sr.train CONFIG [key.sub=value ...]` (see `__main__.py`)."""
