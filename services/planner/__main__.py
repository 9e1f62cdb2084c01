"""``python -m services.planner``: publishes and maintains the plan."""

import sys

from services.lifecycle import run_service
from services.planner.service import main

sys.exit(run_service("planner", main, port_offset=1))
