import sys

from psd.cli.main import main

sys.exit(main())
