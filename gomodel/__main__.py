"""C{python -m gomodel [--listen ...] [--config ...] [--workers N]}: the C{gomodel} command."""

from gomodel.cli import main

main()
