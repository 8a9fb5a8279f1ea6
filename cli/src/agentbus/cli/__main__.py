"""``python -m agentbus.cli`` is the ``agentbus`` command."""

from .main import main

main()
