"""Models as ordered block lists (``zoo``) and re-aligned execution of their fragments (``executor``)."""
