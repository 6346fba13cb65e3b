"""``python -m deq_attacks`` runs the command-line tool."""

from deq_attacks.cli import main

raise SystemExit(main())
