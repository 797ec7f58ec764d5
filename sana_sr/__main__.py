from sana_sr.cli import run

run()
