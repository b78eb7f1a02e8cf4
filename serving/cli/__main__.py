"""``python -m serving.cli``: the same as the ``medimg`` command::

python -m serving.cli --help
"""

import sys

from serving.cli import main

if __name__ == "__main__":
    sys.exit(main())
