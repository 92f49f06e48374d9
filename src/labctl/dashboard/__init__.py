"""`labctl class dashboard`: a read-only live web view of a class for the instructor.

`snapshot` reads the class from the state store (the grid of students by state, lease ends, failures, counts and
cost per hour per site); `page` is the single HTML page that polls it; `server` serves both on 127.0.0.1 behind a
random token. Imported only by that command (werkzeug loads with it).
"""

from labctl.dashboard.server import Dashboard
from labctl.dashboard.snapshot import Prices, snapshot

__all__ = ["Dashboard", "Prices", "snapshot"]
