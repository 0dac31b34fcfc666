"""``python -m bnfold`` runs the CLI."""

from bnfold.cli import main

main()
