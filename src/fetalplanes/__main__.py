"""`python -m fetalplanes ...` (also what `torchrun -m fetalplanes train ...` runs)."""

from fetalplanes.cli import app

app(prog_name="fetalplanes")
