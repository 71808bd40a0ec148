"""`python -m doctune ...` (also what `torchrun -m doctune finetune ...` runs)."""

from doctune.cli import main

main()
