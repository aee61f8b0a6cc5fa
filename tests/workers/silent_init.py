"""Broken worker: never answers the init ping; just sleeps.

Standalone on purpose (standard library only).
"""

import time

time.sleep(3600)
