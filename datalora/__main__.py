import sys

from datalora.cli import main

sys.exit(main())
