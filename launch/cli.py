"""What the launch commands share: config files with `--config.a.b=v` overrides, and bad input
ending as one `error:` line with exit status 2 (the traceback only with --debug)."""

from __future__ import annotations

import sys
from typing import Callable, Sequence

from dplora_jax import config_files

load_config = config_files.load_with_overrides

OVERRIDE_HELP = ("--config.SECTION.FIELD=VALUE overrides one config field (e.g. "
                 "--config.dp.target_epsilon=4); repeatable")


def split_overrides(argv: Sequence[str]) -> tuple[list[str], dict[str, str]]:
  """(the other arguments, {dotted key: value text}) of `--config.a.b=v` / `--config.a.b v`."""
  rest, overrides = [], {}
  i = 0
  while i < len(argv):
    a = argv[i]
    if a.startswith("--config."):
      key, eq, value = a[len("--config."):].partition("=")
      if not eq:
        if i + 1 >= len(argv):
          raise ValueError(f"{a}: expected {a}=VALUE.")
        value, i = argv[i + 1], i + 1
      overrides[key] = value
    else:
      rest.append(a)
    i += 1
  return rest, overrides


def run(main: Callable[[], int], errors: Sequence[type[BaseException]] = ()):
  """Exits with main()'s status; ValueError, FileNotFoundError, PermissionError and `errors`
  print one line and exit 2, unless --debug is among the arguments (then the traceback)."""
  debug = "--debug" in sys.argv
  try:
    sys.exit(main())
  except (ValueError, FileNotFoundError, PermissionError, *errors) as e:
    if debug:
      raise
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
