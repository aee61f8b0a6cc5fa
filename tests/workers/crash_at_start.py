"""Broken worker: writes one line to stderr and exits with status 3 before the handshake.

Standalone on purpose (standard library only).
"""

import sys

sys.stderr.write("crash_at_start: cannot load the model\n")
sys.exit(3)
