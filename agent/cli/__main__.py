"""``python -m autoexplain.agent.cli``: the same as the ``autoexplain`` script."""

from autoexplain.agent.cli import main

main()
