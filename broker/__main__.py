"""`python -m broker`: the same command line as the `polybroker` console script (broker.cli).

Must not import: anything but broker.cli.
"""

from broker.cli import main

raise SystemExit(main())
