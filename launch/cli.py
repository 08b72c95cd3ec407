"""What the argparse commands share: bad input ends as one `error:` line and exit status 2."""

import sys
from typing import Callable, Sequence


def run(main: Callable[[], int], errors: Sequence[type[BaseException]] = ()):
  """Exits with main()'s status; ValueError, FileNotFoundError and `errors` print one line, exit 2."""
  try:
    sys.exit(main())
  except (ValueError, FileNotFoundError, *errors) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
