import sys

from dllama.cli import main

sys.exit(main())
