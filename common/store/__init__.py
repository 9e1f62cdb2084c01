"""Everything that talks to Redis: streams and consumer groups, the reaper, idempotent replies, plans."""
